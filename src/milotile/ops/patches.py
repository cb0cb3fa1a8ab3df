"""Patch extraction by coordinates, grouped by chunk and cut on workers, plus the tilt-geometry check.

Modes (channel order = order of the requested modes)
---------------------------------------------------
``slab``     MiLoPYP ``simsiam3d``: sum of the 3 slices ``z-1, z, z+1``, ``bbox × bbox`` (1 channel).
``slice``    one z slice (1 channel; MiLoPYP ``simsiam2d3d`` 3D branch).
``cube``     ``bbox³`` cube, its depth stored as ``bbox`` channels.
``tiltsum``  MiLoPYP ``simsiam2d3d`` 2D branch: the 3D position is projected onto every tilt inside
             ``window`` degrees with :func:`milotile.ops.geometry.project_points` (tilt axis angle,
             handedness ``sign``, pixel ratio, per-tilt shifts), the crops are cut with *bilinear*
             interpolation (MiLoPYP truncates to int) and summed (1 channel).

Crops are ``[c - bbox//2, c - bbox//2 + bbox)`` around the centre ``c`` (MiLoPYP's convention);
volume modes use the centre rounded to the nearest voxel of the volume grid.

Neighbour shifts: ``shifts`` is a list of ``(dx, dy, dz)`` offsets in voxels of the volume grid;
MiLoPYP's SimSiam positives are :data:`MILOPYP_SHIFTS`. Shift ``s`` is stored at index ``s + 1``.

Normalisation: ``normalize="minmax"`` scales every patch of every mode (and shift) to ``[0, 1]``
(a ``cube`` as one unit); a constant patch becomes 0. ``normalize=None`` keeps the values.

Outside the volume: a patch that would leave the volume (or a tilt crop that would leave its tilt
image) is **reflect-padded** and its row is flagged ``clipped=True``; ``out_of_bounds="drop"``
removes such rows instead (they are then absent from the bank and from ``order``).

Distribution: rows are sorted by the volume chunk that holds their centre; each task handles at most
``chunk_n`` consecutive rows and receives, per chunk group, only the sub-volume (and tilt sub-stack)
covering those patches, never the whole volume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from milotile.errors import InputError
from milotile.ops.filters import bin_volume
from milotile.ops.geometry import project_points, tilt_window

__all__ = [
    "MILOPYP_SHIFTS",
    "MODES",
    "Grid",
    "TiltGeometry",
    "PatchResult",
    "n_channels",
    "extract_patches",
    "check_tilt_geometry",
    "reproject",
]

logger = logging.getLogger(__name__)

MODES = ("slab", "slice", "cube", "tiltsum")
#: MiLoPYP's neighbour offsets ``(dx, dy, dz)`` for SimSiam positive pairs.
MILOPYP_SHIFTS: tuple[tuple[int, int, int], ...] = ((0, 0, 1), (0, 0, -1), (-1, 0, -1), (0, 1, -1))


@dataclass(frozen=True)
class Grid:
    """Mapping from a (compressed/binned) volume grid to full-resolution voxels, per axis ``(z, y, x)``.

    ``full = scale * index + offset``; the identity for level 0.
    """

    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_full(self, zyx: np.ndarray) -> np.ndarray:
        """Grid indices ``(..., 3)`` ``(z, y, x)`` -> full-resolution voxels."""
        return np.asarray(zyx, np.float64) * np.asarray(self.scale) + np.asarray(self.offset)

    def from_full(self, zyx: np.ndarray) -> np.ndarray:
        """Full-resolution voxels ``(..., 3)`` ``(z, y, x)`` -> (fractional) grid indices."""
        return (np.asarray(zyx, np.float64) - np.asarray(self.offset)) / np.asarray(self.scale)


@dataclass
class TiltGeometry:
    """An aligned tilt series and how the tomogram projects onto it (see ``ops/geometry.py``)."""

    data: da.Array
    angles: np.ndarray
    full_shape: tuple[int, int, int]
    tilt_axis_angle: float = 0.0
    sign: int = 1
    pixel_ratio: float = 1.0
    shifts: np.ndarray | None = None
    window: tuple[float, float] = (-20.0, 20.0)

    def project(self, xyz_full: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``(N, len(idx), 2)`` image positions ``(u, v)`` of full-resolution points on tilts ``idx``."""
        return project_points(
            xyz_full,
            np.asarray(self.angles)[idx],
            self.full_shape,
            tuple(self.data.shape[1:]),
            tilt_axis_angle=self.tilt_axis_angle,
            sign=self.sign,
            pixel_ratio=self.pixel_ratio,
            shifts=None if self.shifts is None else np.asarray(self.shifts)[idx],
        )


@dataclass
class PatchResult:
    """Output of :func:`extract_patches`.

    ``data`` is the lazy bank ``(N, S, C, bbox, bbox)`` float32 whose row ``i`` is input row
    ``order[i]``; ``clipped[i]`` says whether row ``i`` needed padding.
    """

    data: da.Array
    order: np.ndarray
    clipped: np.ndarray
    channels: list[str] = field(default_factory=list)


def n_channels(modes: Sequence[str], bbox: int) -> int:
    """Number of channels of a bank with ``modes`` (``cube`` contributes ``bbox``)."""
    return sum(bbox if m == "cube" else 1 for m in modes)


def _check_modes(modes: Sequence[str] | str) -> tuple[str, ...]:
    ms = tuple(m.strip() for m in ([modes] if isinstance(modes, str) else modes))
    if not ms or any(m not in MODES for m in ms) or len(set(ms)) != len(ms):
        raise InputError(f"patch modes {list(ms)!r} must be distinct values of {MODES}")
    return ms


# --------------------------------------------------------------------------- numpy kernels


def _read_padded(region: np.ndarray, origin: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Box ``[lo, hi)`` from ``region`` (placed at ``origin``), reflect-padded where it leaves it."""
    sl, pad = [], []
    for a in range(region.ndim):
        r0, r1 = origin[a], origin[a] + region.shape[a]
        a0, a1 = max(lo[a], r0), min(hi[a], r1)
        if a1 <= a0:
            return np.zeros(tuple(b - a for a, b in zip(lo, hi, strict=True)), region.dtype)
        sl.append(slice(a0 - r0, a1 - r0))
        pad.append((a0 - lo[a], hi[a] - a1))
    out = region[tuple(sl)]
    if any(p != (0, 0) for p in pad):
        # reflect (mirror without repeating the edge voxel); an axis of length 1 can only repeat
        refl = [p if n > 1 else (0, 0) for p, n in zip(pad, out.shape, strict=True)]
        edge = [p if n == 1 else (0, 0) for p, n in zip(pad, out.shape, strict=True)]
        if any(p != (0, 0) for p in refl):
            out = np.pad(out, refl, mode="reflect")
        if any(p != (0, 0) for p in edge):
            out = np.pad(out, edge, mode="edge")
    return out


def _bilinear_crop(img: np.ndarray, origin: tuple[int, int], u: float, v: float, bbox: int) -> np.ndarray:
    """``bbox × bbox`` crop of ``img`` (placed at ``origin`` = (row, col)) at fractional centre (u, v)."""
    x0f, y0f = u - bbox // 2, v - bbox // 2
    x0, y0 = math.floor(x0f), math.floor(y0f)
    fx, fy = x0f - x0, y0f - y0
    w = _read_padded(img, origin, (y0, x0), (y0 + bbox + 1, x0 + bbox + 1)).astype(np.float64)
    return (
        (1 - fy) * (1 - fx) * w[:-1, :-1]
        + (1 - fy) * fx * w[:-1, 1:]
        + fy * (1 - fx) * w[1:, :-1]
        + fy * fx * w[1:, 1:]
    )


def _minmax(p: np.ndarray) -> np.ndarray:
    lo, hi = float(p.min()), float(p.max())
    if hi - lo <= 0:
        return np.zeros_like(p)
    return (p - lo) / (hi - lo)


def _cut_task(groups: list[dict], n_rows: int, n_shifts: int, n_ch: int, bbox: int, modes: tuple[str, ...], normalize: str | None) -> np.ndarray:
    """Cut the patches of one task: ``(n_rows, S, C, bbox, bbox)`` float32."""
    out = np.zeros((n_rows, n_shifts, n_ch, bbox, bbox), np.float32)
    h = bbox // 2
    for g in groups:
        vol, vorigin = g.get("vol"), g.get("vol_origin")
        tilt, torigin = g.get("tilt"), g.get("tilt_origin")
        for k, row in enumerate(g["rows"]):
            for s in range(n_shifts):
                cz, cy, cx = (int(v) for v in g["centres"][k, s])
                c = 0
                for m in modes:
                    if m == "tiltsum":
                        acc = np.zeros((bbox, bbox))
                        for t in range(tilt.shape[0]):
                            u, v = g["uv"][k, s, t]
                            acc += _bilinear_crop(tilt[t], (torigin[1], torigin[2]), float(u), float(v), bbox)
                        p, nc = acc[None], 1
                    elif m == "cube":
                        p = _read_padded(vol, vorigin, (cz - h, cy - h, cx - h), (cz - h + bbox, cy - h + bbox, cx - h + bbox))
                        nc = bbox
                    elif m == "slab":
                        p = _read_padded(vol, vorigin, (cz - 1, cy - h, cx - h), (cz + 2, cy - h + bbox, cx - h + bbox))
                        p, nc = p.astype(np.float64).sum(axis=0)[None], 1
                    else:  # slice
                        p = _read_padded(vol, vorigin, (cz, cy - h, cx - h), (cz + 1, cy - h + bbox, cx - h + bbox))
                        nc = 1
                    if normalize == "minmax":
                        p = _minmax(np.asarray(p, np.float64))
                    out[row, s, c : c + nc] = p
                    c += nc
    return out


# --------------------------------------------------------------------------- planning


def _boxes(centres: np.ndarray, modes: tuple[str, ...], bbox: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (row, shift) volume box ``[lo, hi)`` in (z, y, x) covering every volume mode."""
    h = bbox // 2
    zlo, zhi = 0, 1
    if "slab" in modes:
        zlo, zhi = -1, 2
    if "cube" in modes:
        zlo, zhi = -h, bbox - h
    lo = centres + np.array([zlo, -h, -h])
    hi = centres + np.array([zhi, bbox - h, bbox - h])
    return lo, hi


def extract_patches(
    volume: da.Array,
    xyz: np.ndarray,
    bbox: int,
    modes: Sequence[str] | str = ("slab",),
    *,
    grid: Grid | None = None,
    shifts: Sequence[Sequence[int]] | bool | None = None,
    normalize: str | None = "minmax",
    tilts: TiltGeometry | None = None,
    chunk_n: int = 256,
    out_of_bounds: str = "pad",
) -> PatchResult:
    """Lazily cut patches around full-resolution coordinates of one tomogram.

    Parameters
    ----------
    volume : dask.array.Array
        The (pre-processed) volume ``(z, y, x)`` to cut volume modes from.
    xyz : ndarray, shape (N, 3)
        Centres ``(x, y, z)`` in full-resolution voxels.
    bbox : int
        Patch side in pixels.
    modes : sequence of {"slab", "slice", "cube", "tiltsum"}
        Channels, in this order.
    grid : Grid, optional
        How ``volume`` maps to full resolution (compression/binning); identity by default.
    shifts : sequence of (dx, dy, dz), True or None
        Neighbour offsets in volume-grid voxels; ``True`` means :data:`MILOPYP_SHIFTS`.
    normalize : {"minmax", None}
        Per-patch min-max to ``[0, 1]`` (MiLoPYP) or raw values.
    tilts : TiltGeometry, optional
        Required for ``tiltsum``.
    chunk_n : int
        Rows per task (and per output chunk).
    out_of_bounds : {"pad", "drop"}
        Reflect-pad and flag, or drop rows whose patches leave the volume / tilt images.

    Returns
    -------
    PatchResult
        Lazy bank, row order and clipped flags.
    """
    ms = _check_modes(modes)
    bbox = int(bbox)
    if bbox < 2:
        raise InputError(f"bbox must be at least 2 pixels, got {bbox}")
    if normalize not in ("minmax", None):
        raise InputError(f"normalize must be 'minmax' or None, got {normalize!r}")
    if out_of_bounds not in ("pad", "drop"):
        raise InputError(f"out_of_bounds must be 'pad' or 'drop', got {out_of_bounds!r}")
    if "tiltsum" in ms and tilts is None:
        raise InputError("mode 'tiltsum' needs a tilt series, but none was given for this tomogram")
    grid = grid or Grid()
    sh = list(MILOPYP_SHIFTS) if shifts is True else [tuple(int(v) for v in s) for s in (shifts or [])]
    offsets = np.array([(0, 0, 0)] + [(s[2], s[1], s[0]) for s in sh], dtype=np.int64)  # (dz, dy, dx)
    n_s, n_c = len(offsets), n_channels(ms, bbox)
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    n = len(xyz)
    shape = np.array(volume.shape)
    full_zyx = xyz[:, ::-1]
    centres = np.rint(grid.from_full(full_zyx)).astype(np.int64)  # (N, 3) z, y, x in the grid
    if n and ((centres < 0) | (centres >= shape)).any():
        bad = int(np.flatnonzero(((centres < 0) | (centres >= shape)).any(axis=1))[0])
        raise InputError(f"coordinate row {bad} (x, y, z) = {tuple(xyz[bad])} lies outside the volume of shape {tuple(volume.shape)}")
    allc = centres[:, None, :] + offsets[None, :, :]  # (N, S, 3)
    lo, hi = _boxes(allc, ms, bbox)
    clipped = np.zeros(n, bool)
    vol_modes = any(m != "tiltsum" for m in ms)
    if vol_modes:
        clipped |= ((lo < 0) | (hi > shape)).any(axis=(1, 2))

    uv = None
    tidx = None
    if "tiltsum" in ms:
        assert tilts is not None
        tidx = tilt_window(tilts.angles, *tilts.window)
        full_shift = grid.to_full(allc.reshape(-1, 3).astype(np.float64))[:, ::-1]  # x, y, z
        # the unshifted centre is the exact coordinate, not the rounded grid voxel
        full_shift.reshape(n, n_s, 3)[:, 0] = xyz
        uv = tilts.project(full_shift, tidx).reshape(n, n_s, len(tidx), 2)
        ty, tx = tilts.data.shape[1:]
        x0 = np.floor(uv[..., 0] - bbox // 2)
        y0 = np.floor(uv[..., 1] - bbox // 2)
        clipped |= ((x0 < 0) | (y0 < 0) | (x0 + bbox + 1 > tx) | (y0 + bbox + 1 > ty)).any(axis=(1, 2))

    keep = np.arange(n) if out_of_bounds == "pad" else np.flatnonzero(~clipped)
    if out_of_bounds == "drop" and len(keep) < n:
        logger.info("dropping %d of %d rows whose patches leave the volume", n - len(keep), n)
    # spatial order: by volume chunk of the centre, then by position
    bounds = [np.cumsum(c) for c in volume.chunks]
    ckey = np.stack([np.searchsorted(bounds[a], centres[keep, a], side="right") for a in range(3)], axis=1)
    order = keep[np.lexsort((centres[keep, 2], centres[keep, 1], centres[keep, 0], ckey[:, 2], ckey[:, 1], ckey[:, 0]))]
    ckey_of = dict(zip(keep.tolist(), map(tuple, ckey.tolist()), strict=True))

    pieces = []
    for t0 in range(0, len(order), chunk_n):
        rows = order[t0 : t0 + chunk_n]
        groups = []
        keys = [ckey_of[int(r)] for r in rows]
        start = 0
        while start < len(rows):
            stop = start
            while stop < len(rows) and keys[stop] == keys[start]:
                stop += 1
            sel = rows[start:stop]
            g: dict = {"rows": np.arange(start, stop), "centres": allc[sel]}
            if vol_modes:
                glo = np.maximum(lo[sel].min(axis=(0, 1)), 0)
                ghi = np.minimum(hi[sel].max(axis=(0, 1)), shape)
                g["vol"] = volume[tuple(slice(int(a), int(b)) for a, b in zip(glo, ghi, strict=True))]
                g["vol_origin"] = tuple(int(v) for v in glo)
            if uv is not None:
                assert tilts is not None and tidx is not None
                guv = uv[sel]
                ty, tx = tilts.data.shape[1:]
                u0 = int(max(np.floor(guv[..., 0].min() - bbox // 2), 0))
                v0 = int(max(np.floor(guv[..., 1].min() - bbox // 2), 0))
                u1 = int(min(np.floor(guv[..., 0].max() - bbox // 2) + bbox + 1, tx))
                v1 = int(min(np.floor(guv[..., 1].max() - bbox // 2) + bbox + 1, ty))
                u1, v1 = max(u1, u0 + 1), max(v1, v0 + 1)
                if tidx[-1] - tidx[0] + 1 == len(tidx):
                    tsub = tilts.data[int(tidx[0]) : int(tidx[-1]) + 1, v0:v1, u0:u1]
                else:
                    tsub = tilts.data[tidx][:, v0:v1, u0:u1]
                g["tilt"], g["tilt_origin"], g["uv"] = tsub, (0, v0, u0), guv
            groups.append(g)
            start = stop
        task = dask.delayed(_cut_task, pure=True)(groups, len(rows), n_s, n_c, bbox, ms, normalize)
        pieces.append(da.from_delayed(task, shape=(len(rows), n_s, n_c, bbox, bbox), dtype=np.float32))
    if pieces:
        data = da.concatenate(pieces, axis=0)
    else:
        data = da.zeros((0, n_s, n_c, bbox, bbox), dtype=np.float32, chunks=(1, n_s, n_c, bbox, bbox))
    channels = []
    for m in ms:
        channels += [f"cube{i}" for i in range(bbox)] if m == "cube" else [m]
    return PatchResult(data=data, order=order.astype(np.int64), clipped=clipped[order], channels=channels)


# --------------------------------------------------------------------------- geometry check


def reproject(
    small: np.ndarray,
    small_grid: Grid,
    geom: TiltGeometry,
    tilt_index: int,
    sign: int,
    out_shape: tuple[int, int],
    tilt_bin: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Forward-project a (binned) volume onto one tilt by bilinear splatting.

    Returns the projection and the per-pixel ray weight, both ``out_shape`` in tilt pixels binned by
    ``tilt_bin``.
    """
    zz, yy, xx = np.indices(small.shape).reshape(3, -1)
    full = small_grid.to_full(np.stack([zz, yy, xx], axis=1))[:, ::-1]
    g = TiltGeometry(
        data=geom.data, angles=geom.angles, full_shape=geom.full_shape, tilt_axis_angle=geom.tilt_axis_angle,
        sign=sign, pixel_ratio=geom.pixel_ratio, shifts=geom.shifts,
    )
    uv = g.project(full, np.array([tilt_index]))[:, 0]
    ub = (uv[:, 0] - (tilt_bin - 1) / 2) / tilt_bin
    vb = (uv[:, 1] - (tilt_bin - 1) / 2) / tilt_bin
    ny, nx = out_shape
    x0, y0 = np.floor(ub).astype(np.int64), np.floor(vb).astype(np.int64)
    fx, fy = ub - x0, vb - y0
    vals = small.reshape(-1).astype(np.float64)
    proj = np.zeros(ny * nx)
    wsum = np.zeros(ny * nx)
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        ok = (yi >= 0) & (yi < ny) & (xi >= 0) & (xi < nx)
        lin = yi[ok] * nx + xi[ok]
        proj += np.bincount(lin, weights=w[ok] * vals[ok], minlength=ny * nx)
        wsum += np.bincount(lin, weights=w[ok], minlength=ny * nx)
    return proj.reshape(ny, nx), wsum.reshape(ny, nx)


def _bandpass(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return ndi.gaussian_filter(img, lo, mode="nearest") - ndi.gaussian_filter(img, hi, mode="nearest")


def check_tilt_geometry(
    volume: da.Array,
    geom: TiltGeometry,
    *,
    grid: Grid | None = None,
    name: str = "",
    n_angles: int = 4,
    max_side: int = 128,
    min_correlation: float = 0.3,
) -> dict:
    """Choose the projection handedness by reprojecting the tomogram and correlating with its tilts.

    The volume is mean-binned (chunk by chunk) until its largest side is at most ``max_side`` — so
    memory stays bounded whatever the tomogram size — and forward-projected with both signs onto up
    to ``n_angles`` tilts at large angles (near ±30° and ±50°). Projections and tilt images (binned
    alike) are band-passed and compared by Pearson correlation where the rays are complete.

    Parameters
    ----------
    volume : dask.array.Array
        The tomogram (any pyramid level; ``grid`` maps it to full resolution).
    geom : TiltGeometry
        Tilt series and geometry; its ``sign`` is ignored.
    grid : Grid, optional
        Mapping of ``volume`` to full resolution.
    name : str
        Tomogram name for messages.
    n_angles : int
        Number of tilts to compare.
    max_side : int
        Largest side of the binned volume.
    min_correlation : float
        Below this for both signs the tilt series is declared not to match.

    Returns
    -------
    dict
        ``{"sign", "correlation", "correlation_plus", "correlation_minus", "angles"}``.

    Raises
    ------
    InputError
        If neither sign correlates (the tilt series does not belong to the tomogram).
    """
    grid = grid or Grid()
    f = max(1, int(math.ceil(max(volume.shape) / max_side)))
    small = np.asarray(bin_volume(volume, f).compute(), np.float64) if f > 1 else np.asarray(volume.compute(), np.float64)
    sgrid = Grid(
        scale=tuple(s * f for s in grid.scale),
        offset=tuple(o + s * (f - 1) / 2 for s, o in zip(grid.scale, grid.offset, strict=True)),
    )
    ang = np.asarray(geom.angles, np.float64)
    picks: list[int] = []
    for target in (50.0, -50.0, 30.0, -30.0, 40.0, -40.0, 20.0, -20.0):
        i = int(np.argmin(np.abs(ang - target)))
        if abs(ang[i] - target) <= 12 and abs(ang[i]) >= 10 and i not in picks:
            picks.append(i)
        if len(picks) >= n_angles:
            break
    if not picks:
        picks = [int(np.argmax(np.abs(ang)))]
    tb = max(1, int(round(f * grid.scale[2] * geom.pixel_ratio)))
    ty, tx = geom.data.shape[1:]
    out_shape = (ty // tb, tx // tb)
    tsel = geom.data[np.array(picks)][:, : out_shape[0] * tb, : out_shape[1] * tb]
    timgs = np.asarray(da.coarsen(np.mean, tsel.rechunk((1, -1, -1)), {1: tb, 2: tb}).compute(), np.float64)
    corr = {}
    for sign in (1, -1):
        cs = []
        for k, ti in enumerate(picks):
            proj, w = reproject(small, sgrid, geom, ti, sign, out_shape, tb)
            mask = w >= 0.9 * w.max()
            mask = ndi.binary_erosion(mask, iterations=3)
            if mask.sum() < 16:
                continue
            a = _bandpass(proj, 0.7, 4.0)[mask]
            b = _bandpass(timgs[k], 0.7, 4.0)[mask]
            if a.std() == 0 or b.std() == 0:
                continue
            cs.append(float(np.corrcoef(a, b)[0, 1]))
        corr[sign] = float(np.mean(cs)) if cs else float("nan")
    cp, cm = corr[1], corr[-1]
    label = f"tomogram {name!r}" if name else "the tomogram"
    if not (np.nanmax([cp, cm]) >= min_correlation):
        raise InputError(
            f"the tilt series of {label} does not match it: reprojections correlate at {cp:.3f} (sign +1) "
            f"and {cm:.3f} (sign -1), below {min_correlation}; check the tilt series, its angles and tilt axis"
        )
    sign = 1 if (np.isnan(cm) or cp >= cm) else -1
    if abs(cp - cm) < 0.02:
        logger.warning("%s: tilt handedness is ambiguous (correlation %.3f vs %.3f); using %+d", label, cp, cm, sign)
    logger.info("%s: tilt sign %+d (correlation %.3f, other sign %.3f)", label, sign, max(cp, cm), min(cp, cm))
    return {
        "sign": sign,
        "correlation": corr[sign],
        "correlation_plus": cp,
        "correlation_minus": cm,
        "angles": [float(ang[i]) for i in picks],
    }
