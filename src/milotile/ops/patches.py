"""Patch extraction by coordinates, grouped by chunk and cut on workers.

Modes (channel order = order of the requested modes)
---------------------------------------------------
``slab``     MiLoPYP ``simsiam3d``: sum of the 3 slices ``z-1, z, z+1``, ``bbox × bbox`` (1 channel).
``slice``    one z slice (1 channel; MiLoPYP ``simsiam2d3d`` 3D branch).
``cube``     ``bbox³`` cube, its depth stored as ``bbox`` channels.
``tiltsum``  MiLoPYP ``simsiam2d3d`` 2D branch: the 3D position is projected onto every tilt inside
             ``window`` degrees with :func:`milotile.ops.geometry.project_points` (tilt axis angle,
             handedness ``sign``, pixel ratio, per-tilt shifts), the crops are cut with *bilinear*
             interpolation (MiLoPYP truncates to int) and summed (1 channel).
``tilthalves`` the same tilt sum split in two (2 channels): the even- and the odd-indexed tilts of the
             window (alternating in angle, so both halves span it). The two halves carry independent
             noise: the ``2d3d`` exploration model pairs one half with the other as its SimSiam views
             (matching the views cannot rely on shared noise) and embeds their sum, which is the
             ``tiltsum`` patch.

Crops are ``[c - bbox//2, c - bbox//2 + bbox)`` around the centre ``c`` (MiLoPYP's convention);
volume modes use the centre rounded to the nearest voxel of the volume grid.

Neighbour shifts: ``shifts`` is a list of ``(dx, dy, dz)`` offsets in voxels of the volume grid;
MiLoPYP's SimSiam positives are :data:`MILOPYP_SHIFTS`. Shift ``s`` is stored at index ``s + 1``.

Normalisation: ``normalize="minmax"`` scales every patch of every mode (and shift) to ``[0, 1]``
(a ``cube`` or the two ``tilthalves`` as one unit, so that min-max of their sum is the ``tiltsum``
patch); a constant patch becomes 0. ``normalize=None`` keeps the values.

Outside the volume: a patch that would leave the volume (or a tilt crop that would leave its tilt
image) is padded by repeating the edge voxel (the one boundary convention,
:func:`milotile.ops.blocks.pad_box`) and its row is flagged ``clipped=True``; ``out_of_bounds="drop"``
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

from milotile.errors import InputError
from milotile.ops.blocks import pad_box
from milotile.ops.geometry import TiltGeometry, tilt_window
from milotile.ops.grid import Grid

__all__ = [
    "MILOPYP_SHIFTS",
    "MODES",
    "TILT_MODES",
    "PatchResult",
    "n_channels",
    "extract_patches",
]

logger = logging.getLogger(__name__)

MODES = ("slab", "slice", "cube", "tiltsum", "tilthalves")
#: modes cut from the tilt series
TILT_MODES = ("tiltsum", "tilthalves")
#: MiLoPYP's neighbour offsets ``(dx, dy, dz)`` for SimSiam positive pairs.
MILOPYP_SHIFTS: tuple[tuple[int, int, int], ...] = ((0, 0, 1), (0, 0, -1), (-1, 0, -1), (0, 1, -1))


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
    """Number of channels of a bank with ``modes`` (``cube`` contributes ``bbox``, ``tilthalves`` 2)."""
    return sum(bbox if m == "cube" else 2 if m == "tilthalves" else 1 for m in modes)


def _check_modes(modes: Sequence[str] | str) -> tuple[str, ...]:
    ms = tuple(m.strip() for m in ([modes] if isinstance(modes, str) else modes))
    if not ms or any(m not in MODES for m in ms) or len(set(ms)) != len(ms):
        raise InputError(f"patch modes {list(ms)!r} must be distinct values of {MODES}")
    return ms


# --------------------------------------------------------------------------- numpy kernels


def _bilinear_crop(img: np.ndarray, origin: tuple[int, int], u: float, v: float, bbox: int) -> np.ndarray:
    """``bbox × bbox`` crop of ``img`` (placed at ``origin`` = (row, col)) at fractional centre (u, v)."""
    x0f, y0f = u - bbox // 2, v - bbox // 2
    x0, y0 = math.floor(x0f), math.floor(y0f)
    fx, fy = x0f - x0, y0f - y0
    w = pad_box(img, origin, (y0, x0), (y0 + bbox + 1, x0 + bbox + 1)).astype(np.float64)
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
                    if m in TILT_MODES:
                        nc = 1 if m == "tiltsum" else 2
                        acc = np.zeros((nc, bbox, bbox))
                        for t in range(tilt.shape[0]):
                            u, v = g["uv"][k, s, t]
                            acc[t % nc] += _bilinear_crop(tilt[t], (torigin[1], torigin[2]), float(u), float(v), bbox)
                        p = acc
                    elif m == "cube":
                        p = pad_box(vol, vorigin, (cz - h, cy - h, cx - h), (cz - h + bbox, cy - h + bbox, cx - h + bbox))
                        nc = bbox
                    elif m == "slab":
                        p = pad_box(vol, vorigin, (cz - 1, cy - h, cx - h), (cz + 2, cy - h + bbox, cx - h + bbox))
                        p, nc = p.astype(np.float64).sum(axis=0)[None], 1
                    else:  # slice
                        p = pad_box(vol, vorigin, (cz, cy - h, cx - h), (cz + 1, cy - h + bbox, cx - h + bbox))
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
    modes : sequence of {"slab", "slice", "cube", "tiltsum", "tilthalves"}
        Channels, in this order.
    grid : Grid, optional
        How ``volume`` maps to full resolution (compression/binning); identity by default.
    shifts : sequence of (dx, dy, dz), True or None
        Neighbour offsets in volume-grid voxels; ``True`` means :data:`MILOPYP_SHIFTS`.
    normalize : {"minmax", None}
        Per-patch min-max to ``[0, 1]`` (MiLoPYP) or raw values.
    tilts : TiltGeometry, optional
        Required for ``tiltsum`` and ``tilthalves``.
    chunk_n : int
        Rows per task (and per output chunk).
    out_of_bounds : {"pad", "drop"}
        Edge-pad and flag, or drop rows whose patches leave the volume / tilt images.

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
    tilt_modes = [m for m in ms if m in TILT_MODES]
    if tilt_modes and tilts is None:
        raise InputError(f"mode {tilt_modes[0]!r} needs a tilt series, but none was given for this tomogram")
    grid = grid or Grid()
    sh = list(MILOPYP_SHIFTS) if shifts is True else [tuple(int(v) for v in s) for s in (shifts or [])]
    offsets = np.array([(0, 0, 0)] + [(s[2], s[1], s[0]) for s in sh], dtype=np.int64)  # (dz, dy, dx)
    n_s, n_c = len(offsets), n_channels(ms, bbox)
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    n = len(xyz)
    shape = np.array(volume.shape)
    full_zyx = xyz[:, ::-1]
    centres = np.rint(grid.from_level0(full_zyx)).astype(np.int64)  # (N, 3) z, y, x in the grid
    if n and ((centres < 0) | (centres >= shape)).any():
        bad = int(np.flatnonzero(((centres < 0) | (centres >= shape)).any(axis=1))[0])
        raise InputError(f"coordinate row {bad} (x, y, z) = {tuple(xyz[bad])} lies outside the volume of shape {tuple(volume.shape)}")
    allc = centres[:, None, :] + offsets[None, :, :]  # (N, S, 3)
    lo, hi = _boxes(allc, ms, bbox)
    clipped = np.zeros(n, bool)
    vol_modes = any(m not in TILT_MODES for m in ms)
    if vol_modes:
        clipped |= ((lo < 0) | (hi > shape)).any(axis=(1, 2))

    uv = None
    tidx = None
    if tilt_modes:
        assert tilts is not None
        tidx = tilt_window(tilts.angles, *tilts.window)
        if "tilthalves" in ms and len(tidx) < 2:
            raise InputError(f"mode 'tilthalves' needs at least 2 tilts inside the window {tilts.window}, "
                             f"found {len(tidx)}")
        full_shift = grid.to_level0(allc.reshape(-1, 3).astype(np.float64))[:, ::-1]  # x, y, z
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
