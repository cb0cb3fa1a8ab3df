"""Lazy, picklable readers for EM / label volumes: MRC, multi-page TIFF, slice folders, HDF5, Zarr.

Every reader is an array-like ``(z, y, x)`` object with ``shape``, ``dtype``, ``ndim`` and
``__getitem__`` that opens the file, reads only the requested region in the file's own dtype and
closes it again — so a dask graph built on it stays tiny and a task reads just its block
(``reference/environment.md`` §6). Slice folders are ordered by a natural sort of the file names
(``z2.png`` before ``z10.png``), not lexicographically as in EManalysis.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["open_volume", "natural_key", "VolumeReader", "SLICE_SUFFIXES"]

SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TIFF = (".tif", ".tiff")
_H5 = (".h5", ".hdf5", ".hdf", ".he5")
_MRC = (".mrc", ".rec", ".map", ".st", ".ali")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``"s2" < "s10"``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _norm_key(key: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
    if not isinstance(key, tuple):
        key = (key,)
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, (int, np.integer)):
            k = slice(int(k), int(k) + 1)
        if not isinstance(k, slice) or k.step not in (None, 1):
            raise TypeError(f"only contiguous slices are supported, got {k!r}")
        out.append(slice(*k.indices(n)[:2]))
    return tuple(out)


class VolumeReader:
    """Base class: a lazily read 3D volume ``(z, y, x)``.

    Attributes
    ----------
    path : str
        Source file or folder.
    shape : tuple of int
    dtype : numpy.dtype
    voxel_size : tuple of float or None
        ``(z, y, x)`` in Å when the file records it (MRC header, OME-Zarr scale), else None.
    """

    ndim = 3
    kind = "volume"

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any, voxel_size: tuple[float, ...] | None = None):
        self.path = path
        if len(shape) != 3:
            raise InputError(f"{path} holds a {len(shape)}-D array of shape {tuple(shape)}; a 3-D (z, y, x) volume is needed.")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.voxel_size = voxel_size

    def _read(self, key: tuple[slice, ...]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._read(_norm_key(key, self.shape)), dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        """Size of the whole volume in memory."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype})"


class MRCReader(VolumeReader):
    """MRC / CCP4 volume in file order ``(z, y, x)`` and native dtype (memory-mapped per read)."""

    kind = "mrc"

    def __init__(self, path: str):
        import mrcfile

        try:
            with mrcfile.mmap(path, mode="r", permissive=False) as m:
                shape, dtype = m.data.shape, m.data.dtype
                vs = m.voxel_size
                vsz = (float(vs.z), float(vs.y), float(vs.x))
        except (ValueError, OSError) as exc:
            raise InputError(f"{path} is not a readable MRC file: {exc}.") from exc
        super().__init__(path, shape, dtype, vsz if all(v > 0 for v in vsz) and vsz != (1.0, 1.0, 1.0) else None)

    def _read(self, key: tuple[slice, ...]) -> np.ndarray:
        import mrcfile

        with mrcfile.mmap(self.path, mode="r", permissive=False) as m:
            return np.array(m.data[key])


class TiffStackReader(VolumeReader):
    """Multi-page TIFF: page i = slice z = i (tifffile), or a single 3-D TIFF series."""

    kind = "tiff"

    def __init__(self, path: str):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = series.shape, series.dtype
                n_pages = len(tif.pages)
        except (tifffile.TiffFileError, OSError) as exc:
            raise InputError(f"{path} is not a readable TIFF file: {exc}.") from exc
        if len(shape) == 2:
            shape = (1, *shape)
        self._paged = n_pages == shape[0]
        super().__init__(path, shape, dtype)

    def _read(self, key: tuple[slice, ...]) -> np.ndarray:
        import tifffile

        zs, ys, xs = key
        if self._paged:
            data = tifffile.imread(self.path, key=range(zs.start, zs.stop))
            data = data.reshape((zs.stop - zs.start, *self.shape[1:]))
            return data[:, ys, xs]
        return tifffile.imread(self.path).reshape(self.shape)[key]


class SliceFolderReader(VolumeReader):
    """Folder of 2-D slice images (PNG/TIFF/...), one per z, ordered by a natural sort of names."""

    kind = "slices"

    def __init__(self, path: str):
        import imageio.v3 as iio

        files = sorted((p.name for p in Path(path).iterdir() if p.suffix.lower() in SLICE_SUFFIXES), key=natural_key)
        if not files:
            raise InputError(f"folder {path} holds no slice images ({', '.join(SLICE_SUFFIXES)}).")
        self.files = files
        first = iio.imread(os.path.join(path, files[0]))
        if first.ndim != 2:
            raise InputError(f"slice {os.path.join(path, files[0])} has shape {first.shape}; grey-level 2-D images are needed.")
        super().__init__(path, (len(files), *first.shape), first.dtype)

    def _read(self, key: tuple[slice, ...]) -> np.ndarray:
        import imageio.v3 as iio

        zs, ys, xs = key
        out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), dtype=self.dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            f = os.path.join(self.path, self.files[z])
            img = iio.imread(f)
            if img.shape != self.shape[1:]:
                raise InputError(f"slice {f} has shape {img.shape} but the first slice has {self.shape[1:]}.")
            out[i] = img[ys, xs]
        return out


class HDF5Reader(VolumeReader):
    """A 3-D dataset of an HDF5 file (h5py); ``dataset`` names it (default: the only 3-D dataset)."""

    kind = "hdf5"

    def __init__(self, path: str, dataset: str | None = None):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if dataset is None:
                    found: list[str] = []
                    f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 3 else None)
                    if len(found) != 1:
                        raise InputError(
                            f"{path} holds {len(found)} 3-D datasets ({', '.join(found[:6]) or 'none'}); name one with --dataset."
                        )
                    dataset = found[0]
                if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                    raise InputError(f"{path} has no dataset {dataset!r}.")
                shape, dtype = f[dataset].shape, f[dataset].dtype
        except OSError as exc:
            raise InputError(f"{path} is not a readable HDF5 file: {exc}.") from exc
        self.dataset = dataset
        super().__init__(path, shape, dtype)

    def _read(self, key: tuple[slice, ...]) -> np.ndarray:
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[self.dataset][key]


class ZarrReader(VolumeReader):
    """A Zarr array, or level 0 of an OME-Zarr multiscale image (its scale gives the voxel size)."""

    kind = "zarr"

    def __init__(self, path: str, dataset: str | None = None):
        import zarr

        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:  # zarr raises several types for a missing / foreign path
            raise InputError(f"{path} is not a readable Zarr array or group: {exc}.") from exc
        voxel = None
        if isinstance(node, zarr.Group):
            grp = node
            if dataset is None:
                ms = _multiscales(grp)
                if not ms:
                    raise InputError(f"{path} is a Zarr group without OME multiscales; name the array with --dataset.")
                dataset = ms[0]["datasets"][0]["path"]
                voxel = _ome_scale(ms[0]["datasets"][0])
            if dataset not in grp:
                raise InputError(f"Zarr group {path} has no array {dataset!r}.")
            node = grp[dataset]
        self.dataset = dataset
        super().__init__(path, node.shape, node.dtype, voxel)

    def _read(self, key: tuple[slice, ...]) -> np.ndarray:
        import zarr

        node = zarr.open(self.path, mode="r")
        if self.dataset is not None:
            node = node[self.dataset]
        return node[key]


def _multiscales(grp: Any) -> list[dict]:
    attrs = dict(grp.attrs)
    ome = attrs.get("ome", attrs)
    return list(ome.get("multiscales", []))


def _ome_scale(ds: dict) -> tuple[float, ...] | None:
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale" and len(t.get("scale", [])) >= 3:
            return tuple(float(v) for v in t["scale"][-3:])
    return None


def open_volume(path: str | os.PathLike[str], dataset: str | None = None) -> VolumeReader:
    """Open a volume for lazy reading, choosing the reader by what ``path`` is.

    Parameters
    ----------
    path : path
        ``.mrc/.rec/.map``, ``.tif/.tiff`` (multi-page), a folder of slice images, ``.h5/.hdf5``,
        or a Zarr array / OME-Zarr image (``.zarr`` folder or any folder with ``zarr.json``/``.zarray``).
    dataset : str, optional
        HDF5 dataset or array path inside a Zarr group.

    Returns
    -------
    VolumeReader
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist.")
    suffix = p.suffix.lower()
    if p.is_dir():
        if suffix == ".zarr" or any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
            return ZarrReader(str(p), dataset)
        return SliceFolderReader(str(p))
    if suffix in _MRC:
        return MRCReader(str(p))
    if suffix in _TIFF:
        return TiffStackReader(str(p))
    if suffix in _H5:
        return HDF5Reader(str(p), dataset)
    raise InputError(
        f"cannot read {p}: use MRC (.mrc/.rec/.map), multi-page TIFF, a folder of PNG/TIFF slices, HDF5 (.h5) or Zarr."
    )
