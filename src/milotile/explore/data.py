"""Patch-bank access for exploration: resolve the bank, stream row blocks, channel statistics.

The bank (written by the patch stage) is ``patches/<key>/data`` with shape ``(N, S, C, b, b)``
float32: S = 1 + neighbour shifts (index 0 is the original patch), C = 1 (``3d`` slab mode),
2 (``2d3d``, MiLoPYP's layout: channel 0 tilt-sum, channel 1 tomogram slice) or 3 (``2d3d`` with
tilt halves: channels 0 and 1 the even- and odd-tilt sums, channel 2 the tomogram slice). The
model always sees 1 (``3d``) or 2 (``2d3d``: tilt sum, slice) channels; :func:`model_channels`
turns a halves bank into that input (the tilt sum is the min-max of the two halves' sum).
Rows align with ``tables/patches-<key>.parquet``. Nothing here holds more than a few zarr chunks
in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from milotile.errors import InputError
from milotile.ops.stats import block_moments, merge_moments
from milotile.store import as_collection, missing_input

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "PatchBank",
    "PatchLoader",
    "open_bank",
    "channel_stats",
    "minmax_unit",
    "model_channels",
]

#: exploration modes and the number of channels their models see
MODES: dict[str, int] = {"3d": 1, "2d3d": 2}
#: bank layouts: channels of the bank, and the mode of the model trained on it
LAYOUTS: dict[str, tuple[int, str]] = {"3d": (1, "3d"), "2d3d": (2, "2d3d"), "halves": (3, "2d3d")}
PATCHES = "patches"


def bank_layout(modes: Any, channels: int) -> str:
    """``"3d"``, ``"2d3d"`` or ``"halves"`` (``tilthalves`` + one tomogram channel) from a bank's modes and channel count."""
    ms = [str(m) for m in (modes or [])]
    if channels == 3 and ms and ms[0] == "tilthalves" and len(ms) == 2:
        return "halves"
    if channels == 1:
        return "3d"
    if channels == 2 and "tilthalves" not in ms:
        return "2d3d"
    raise InputError(
        f"a patch bank of modes {ms or '?'} with {channels} channels is not an exploration bank; use "
        "slab (3d), tiltsum,slice or tilthalves,slice (2d3d)."
    )


def bank_mode(modes: Any, channels: int) -> str:
    """``"3d"`` or ``"2d3d"``: the model a bank of these modes and channels trains (see :func:`bank_layout`)."""
    return LAYOUTS[bank_layout(modes, channels)][1]


def minmax_unit(x: torch.Tensor) -> torch.Tensor:
    """Min-max of every image of ``(..., h, w)`` to ``[0, 1]`` (a constant image becomes 0)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def model_channels(x: Any, layout: str) -> Any:
    """Bank channels ``(n, C, h, w)`` → the model's input channels (a halves bank: tilt sum, slice).

    Works on numpy arrays and torch tensors (returned as given). Other layouts pass through.
    """
    if layout != "halves":
        return x
    t = torch.as_tensor(x)
    out = torch.cat([minmax_unit(t[:, 0:1] + t[:, 1:2]), t[:, 2:3]], dim=1)
    return out.numpy() if isinstance(x, np.ndarray) else out


def _bank_keys(col: Any) -> list[str]:
    g = col.zarr_group
    if PATCHES not in g:
        return []
    return sorted(
        name for name, node in g[PATCHES].members() if isinstance(node, zarr.Group) and "data" in node
    )


@dataclass
class PatchBank:
    """One patch bank of a collection (lazy: nothing is read until :meth:`read`).

    Attributes
    ----------
    key : str
        The bank key (``patches/<key>``).
    array : zarr.Array
        ``(N, S, C, b, b)`` float32.
    params : dict
        The bank's ``attrs["milotile"]["params"]`` (bbox, shifts, modes, gauss, dog, ...).
    url : str
        Store URL, so workers can re-open the bank.
    """

    key: str
    array: zarr.Array
    params: dict[str, Any]
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of patches (rows)."""
        return int(self.array.shape[0])

    @property
    def n_shifts(self) -> int:
        """S: 1 + the number of neighbour-shifted copies."""
        return int(self.array.shape[1])

    @property
    def channels(self) -> int:
        """C: 1 for ``3d`` banks, 2 for ``2d3d`` banks."""
        return int(self.array.shape[2])

    @property
    def bbox(self) -> int:
        """Patch side in pixels."""
        return int(self.array.shape[-1])

    @property
    def layout(self) -> str:
        """``"3d"``, ``"2d3d"`` (tilt sum, slice) or ``"halves"`` (even tilts, odd tilts, slice)."""
        return bank_layout(self.params.get("modes"), self.channels)

    @property
    def mode(self) -> str:
        """``"3d"`` or ``"2d3d"``: the model a bank trains."""
        return bank_mode(self.params.get("modes"), self.channels)

    @property
    def chunk_rows(self) -> int:
        """Rows per zarr chunk (reads are aligned to it)."""
        return int(self.array.chunks[0])

    @property
    def table_name(self) -> str:
        """The aligned table: ``patches-<key>``."""
        return f"patches-{self.key}"

    def read(self, start: int, stop: int, crop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as float32 ``(n, S, C, b', b')``, centre-cropped to ``crop``."""
        sl: tuple[slice, ...] = (slice(start, stop),)
        if crop is not None and crop != self.bbox:
            o = (self.bbox - crop) // 2
            sl = sl + (slice(None), slice(None), slice(o, o + crop), slice(o, o + crop))
        return np.asarray(self.array[sl], dtype=np.float32)


def _group_mode(grp: Any) -> str | None:
    """The exploration mode of a bank group (None when no model reads it)."""
    meta = dict(grp.attrs.get("milotile", {}) or {})
    try:
        return bank_mode(dict(meta.get("params", {})).get("modes"), int(grp["data"].shape[2]))
    except InputError:
        return None


def open_bank(col: Any, key: str | PatchBank | None = None, mode: str | None = None) -> PatchBank:
    """Find and open the patch bank ``key`` (or the only / the mode-matching one).

    Parameters
    ----------
    col : Collection or path
        The store.
    key : str or PatchBank, optional
        Bank key (or a bank, whose key is used); when omitted the store must hold exactly one bank (or exactly one with the
        channel count of ``mode``).
    mode : {"3d", "2d3d"}, optional
        Checked against the bank's channel count.

    Returns
    -------
    PatchBank
    """
    if isinstance(key, PatchBank):
        key = key.key
    col = as_collection(col)
    if mode is not None and mode not in MODES:
        raise InputError(f"unknown exploration mode {mode!r}; use '3d' or '2d3d'.")
    keys = _bank_keys(col)
    if not keys:
        raise missing_input(col.url, "patches", "patch bank")
    if key is None:
        cand = keys
        if mode is not None and len(keys) > 1:
            cand = [k for k in keys if _group_mode(col.zarr_group[PATCHES][k]) == mode]
        if len(cand) != 1:
            raise InputError(
                f"store {col.url} holds patch banks {keys}; choose one with key=/--key."
            )
        key = cand[0]
    elif key not in keys:
        raise InputError(f"store {col.url} has no patch bank {key!r}; available: {', '.join(keys) or 'none'} "
                         "(`milotile patches` makes them).")
    grp = col.zarr_group[PATCHES][key]
    arr = grp["data"]
    if arr.ndim != 5 or arr.shape[3] != arr.shape[4]:
        raise InputError(
            f"patch bank {key!r} has shape {arr.shape}; expected (N, S, C, bbox, bbox)."
        )
    if arr.shape[2] not in (1, 2, 3):
        raise InputError(f"patch bank {key!r} has {arr.shape[2]} channels; expected 1 (3d), 2 or 3 (2d3d).")
    meta = dict(grp.attrs.get("milotile", {}) or dict(arr.attrs.get("milotile", {})))
    if meta.get("complete") is False:
        raise InputError(f"patch bank {key!r} in {col.url} is incomplete (a previous run stopped); re-run it.")
    if col.output_status(f"{PATCHES}/{key}") == "stale":
        log.warning("patch bank %r in %s is stale: its table or volumes changed since it was cut; "
                    "re-run `milotile patches`", key, col.url)
    # the stage's parameters plus what it recorded while writing (tilt signs, preprocessing, n)
    params = {**dict(meta.get("params", {})),
              **{k: meta[k] for k in ("tilt_sign", "geometry", "preprocess", "n") if k in meta}}
    bank = PatchBank(key, arr, params, str(col.url), dict(getattr(col, "storage_options", {}) or {}))
    bank_layout(params.get("modes"), bank.channels)  # a clear error for banks no model reads
    if mode is not None and bank.mode != mode:
        raise InputError(
            f"patch bank {key!r} holds {bank.channels}-channel ({bank.mode}) patches but mode {mode!r} was requested."
        )
    if bank.n == 0:
        raise InputError(f"patch bank {key!r} in {col.url} is empty (0 patches).")
    return bank


def check_crop(bank: PatchBank, bbox: int | None) -> int:
    """Validate a requested ``bbox`` against the bank (smaller = centre crop) and return it."""
    if bbox is None:
        return bank.bbox
    bbox = int(bbox)
    if bbox < 8:
        raise InputError(f"bbox {bbox} is too small; use at least 8 pixels.")
    if bbox > bank.bbox:
        raise InputError(
            f"bbox {bbox} is larger than the patches of bank {bank.key!r} ({bank.bbox}); re-extract patches."
        )
    return bbox


def channel_stats(bank: PatchBank, crop: int | None = None, rows: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the model's input over the original patches (shift 0), streamed chunk by chunk.

    For a halves bank the tilt channel's statistics are those of the min-maxed halves (what the
    training views hold); one value per model channel.

    Parameters
    ----------
    bank : PatchBank
    crop : int, optional
        Centre crop (what the model sees).
    rows : int, optional
        Rows per read (default: the zarr chunk rows, at least 256).

    Returns
    -------
    mean, std : list of float
        One value per channel.
    """
    step = rows or max(bank.chunk_rows, (256 // bank.chunk_rows + 1) * bank.chunk_rows)
    n_model = MODES[bank.mode]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_model)]
    for start in range(0, bank.n, step):
        x = bank.read(start, min(start + step, bank.n), crop)[:, 0]  # (n, C, b, b)
        if not np.isfinite(x).all():
            raise InputError(f"patch bank {bank.key!r} contains NaN/inf values in rows {start}..{start + len(x)}.")
        if bank.layout == "halves":
            chans = [minmax_unit(torch.from_numpy(x[:, :2])).numpy(), x[:, 2]]
        else:
            chans = [x[:, ch] for ch in range(n_model)]
        for ch, xc in enumerate(chans):  # the one moments accumulator (float64, pairwise merge)
            parts[ch].append(block_moments(xc))
    stats = [merge_moments(p) for p in parts]
    mean = [float(m) for _, m, _ in stats]
    std = [float(np.sqrt(max(v, 0.0))) for _, _, v in stats]
    if any(v <= 1e-12 for v in std):
        raise InputError(f"patch bank {bank.key!r} is constant in some channel (std {std}).")
    return mean, std


class PatchLoader:
    """Stream shuffled batches from a patch bank without loading it.

    Each epoch visits the zarr chunks in a random order, fills a buffer of about ``buffer_rows``
    rows, shuffles inside the buffer and emits batches; the next read is prefetched in a thread.

    Parameters
    ----------
    bank : PatchBank
    batch_size : int
    shuffle : bool
    drop_last : bool
        Drop the final incomplete batch (training).
    seed : int
        Epoch ``e`` uses the generator seeded with ``(seed, e)``, so a resumed run replays the
        same order.
    crop : int, optional
        Centre crop of every patch.
    buffer_rows : int, optional
        Shuffle-buffer size (default ``max(8 * batch_size, 2048)`` rows).
    """

    def __init__(
        self,
        bank: PatchBank,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        crop: int | None = None,
        buffer_rows: int | None = None,
    ) -> None:
        self.bank = bank
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.crop = crop
        self.buffer_rows = int(buffer_rows or max(8 * self.batch_size, 2048))
        cr = bank.chunk_rows
        self.read_rows = max(cr, (min(self.buffer_rows, 4096) // cr) * cr)

    def __len__(self) -> int:
        n = self.bank.n
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[np.ndarray]:
        """Yield batches ``(B, S, C, b, b)`` float32 for ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        starts = np.arange(0, self.bank.n, self.read_rows)
        if self.shuffle:
            starts = rng.permutation(starts)
        pending: list[np.ndarray] = []
        n_pending = 0

        def read(s: int) -> np.ndarray:
            return self.bank.read(int(s), min(int(s) + self.read_rows, self.bank.n), self.crop)

        with ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(read, starts[0]) if len(starts) else None
            for i in range(len(starts)):
                assert fut is not None
                block = fut.result()
                fut = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
                pending.append(block)
                n_pending += len(block)
                last = i + 1 == len(starts)
                if n_pending < self.buffer_rows and not last:
                    continue
                buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
                if self.shuffle:
                    buf = buf[rng.permutation(len(buf))]
                n_full = (len(buf) // self.batch_size) * self.batch_size
                for b in range(0, n_full, self.batch_size):
                    yield buf[b : b + self.batch_size]
                rest = buf[n_full:]
                pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        if n_pending and not self.drop_last:
            yield np.concatenate(pending)


def bank_preprocessing(params: dict[str, Any]) -> dict[str, Any]:
    """Gauss sigma, DoG sigmas and compression the bank's source volumes were made with.

    Reads top-level ``gauss``/``dog``/``compress`` of the bank parameters, else the per-tomogram
    ``preprocess`` records written by the patch stage (one value when all tomograms agree).
    """
    out: dict[str, Any] = {}
    per = params.get("preprocess") or {}
    for name in ("gauss", "dog", "compress", "bin"):
        val = params.get(name)
        if val is None and isinstance(per, dict) and per:
            vals = [v.get(name) for v in per.values() if isinstance(v, dict)]
            uniq = {repr(v) for v in vals}
            val = vals[0] if len(uniq) == 1 else vals
        out[name] = val
    return out
