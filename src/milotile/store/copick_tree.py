"""copick project trees as a *source* of tomograms (read-only; see :mod:`milotile.formats.copick`).

A copick project is a config file (``copick_config.json``) whose ``overlay_root`` and optional
``static_root`` point at folders holding ``ExperimentRuns/<run>/VoxelSpacing<s>/<type>.zarr``
(OME-NGFF multiscale images, Zarr v2 from copick 1.x, v2 or v3 from newer writers). Everything here
opens the tree read-only: ingesting a copick project never writes into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["ZarrImage", "config_roots", "copick_tomograms", "is_copick_config", "read_config", "zarr_image"]

_SPACING_RE = re.compile(r"^VoxelSpacing(\d+(?:\.\d+)?)$")
_UNIT_TO_A = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4, None: 1.0, "": 1.0}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a copick config file (:class:`InputError` when unreadable or not a copick config)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"copick config {path} could not be read ({exc}).") from exc
    if not isinstance(cfg, dict) or "pickable_objects" not in cfg:
        raise InputError(f"{path} is not a copick config (no 'pickable_objects').")
    return cfg


def is_copick_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a JSON file that looks like a copick config."""
    p = Path(path)
    if p.suffix.lower() != ".json" or not p.is_file():
        return False
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "pickable_objects" in doc


def config_roots(path: str | os.PathLike) -> list[Path]:
    """Local overlay and static roots of a copick config; relative roots resolve against its folder.

    Raises
    ------
    InputError
        For a config whose roots are not local (``s3://``, the data portal...).
    """
    path = Path(path)
    cfg = read_config(path)
    if cfg.get("config_type", "filesystem") != "filesystem":
        raise InputError(f"copick config {path} has config_type {cfg.get('config_type')!r}; only 'filesystem' is read.")
    roots = []
    for key in ("overlay_root", "static_root"):
        root = cfg.get(key)
        if not root:
            continue
        root = str(root)
        for prefix in ("local://", "file://"):
            if root.startswith(prefix):
                root = root[len(prefix) :]
                break
        else:
            if "://" in root:
                raise InputError(f"copick config {path}: {key} {root!r} is not a local folder; milotile reads local projects.")
        p = Path(root)
        roots.append(p if p.is_absolute() else (path.parent / p).resolve())
    return roots or [path.parent.resolve()]


@dataclass(frozen=True)
class ZarrImage:
    """Level 0 of an OME-NGFF multiscale image on disk (NGFF 0.4/Zarr v2 or 0.5/Zarr v3)."""

    path: str
    array: str
    shape: tuple[int, int, int]
    voxel_size: float
    size_bytes: int
    mtime_ns: int

    def open(self) -> zarr.Array:
        """The level-0 array, opened read-only."""
        return zarr.open_group(self.path, mode="r")[self.array]


def zarr_image(path: str | os.PathLike) -> ZarrImage:
    """Describe the multiscale image at ``path`` (read-only): level-0 array, shape, voxel size in Å."""
    p = Path(path)
    try:
        grp = zarr.open_group(str(p), mode="r")
    except Exception as exc:
        raise InputError(f"{p} is not a readable Zarr group ({exc}).") from None
    attrs = dict(grp.attrs)
    ms = attrs.get("multiscales") or dict(attrs.get("ome", {})).get("multiscales")
    if not ms:
        raise InputError(f"{p} has no OME-NGFF 'multiscales' metadata.")
    ms0 = ms[0]
    ds0 = ms0["datasets"][0]
    scales = [t["scale"] for t in ds0.get("coordinateTransformations", []) if t.get("type") == "scale"]
    arr = grp[ds0["path"]]
    if arr.ndim != 3:
        raise InputError(f"{p}/{ds0['path']} is {arr.ndim}-dimensional; a tomogram is (z, y, x).")
    if not scales:
        raise InputError(f"{p} gives no scale for level {ds0['path']}; the voxel size is unknown.")
    sz, sy, sx = (float(v) for v in scales[0][-3:])
    if not (abs(sz - sx) < 1e-3 * sx and abs(sy - sx) < 1e-3 * sx):
        raise InputError(f"{p} has anisotropic voxels {scales[0]}; milotile needs isotropic voxels.")
    unit = (ms0.get("axes") or [{}])[-1].get("unit")
    if unit not in _UNIT_TO_A:
        raise InputError(f"{p} has axis unit {unit!r}; expected angstrom or nanometer.")
    size = mtime = 0
    for dirpath, _dirs, files in os.walk(p / ds0["path"]):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    return ZarrImage(str(p), str(ds0["path"]), tuple(int(s) for s in arr.shape), sx * _UNIT_TO_A[unit], size, mtime)


def zarr_fingerprint(path: str | os.PathLike, block: int = 16 << 20) -> str:
    """SHA-1 over every file (relative name and bytes) of a zarr array folder, in sorted order."""
    h = hashlib.sha1(usedforsecurity=False)
    root = Path(path)
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(block):
                h.update(chunk)
    return h.hexdigest()


def copick_tomograms(config: str | os.PathLike, tomo_type: str | None = None) -> list[tuple[str, Path]]:
    """``(run, <type>.zarr path)`` for every run of a local copick project, finest voxel spacing.

    Parameters
    ----------
    config : path
        ``copick_config.json``.
    tomo_type : str, optional
        Tomogram type to take (``wbp``, ``denoised``...); default the only type present, or the
        first in alphabetical order when runs hold several (logged).

    Raises
    ------
    InputError
        When the project holds no tomogram (of that type).
    """
    found: dict[str, list[tuple[float, str, Path]]] = {}
    for root in config_roots(config):
        for run_dir in sorted((root / "ExperimentRuns").glob("*")):
            for vs_dir in run_dir.glob("VoxelSpacing*"):
                m = _SPACING_RE.match(vs_dir.name)
                if not m:
                    continue
                for z in vs_dir.glob("*.zarr"):
                    kind = z.name[: -len(".zarr")]
                    if "_" in kind:  # <type>_<feature>_features.zarr and the like
                        continue
                    found.setdefault(run_dir.name, []).append((float(m.group(1)), kind, z))
    out = []
    for run, items in sorted(found.items()):
        kinds = sorted({k for _, k, _ in items})
        kind = tomo_type or kinds[0]
        if tomo_type is None and len(kinds) > 1:
            log.info("copick run %s holds tomogram types %s; taking %r (choose with tomo_type)", run, kinds, kind)
        sel = sorted((vs, p) for vs, k, p in items if k == kind)
        if sel:
            out.append((run, sel[0][1]))
    if not out:
        what = f" of type {tomo_type!r}" if tomo_type else ""
        raise InputError(f"copick project {config} holds no tomogram{what} (ExperimentRuns/<run>/VoxelSpacing<s>/<type>.zarr).")
    return out
