"""Embedding a patch bank with a trained exploration model, on the Dask cluster when there is one.

Tasks cover chunk-aligned row blocks of the bank and write their own chunk of
``embeddings/<key>`` (N × D float32), so parallel writes never share a zarr chunk. On a
distributed cluster the model is loaded once per worker process (a worker-local cache keyed by
the checkpoint path and its modification time) and tasks ask for ``resources={"GPU": 1}`` only
when GPU workers exist. Normalisation statistics come from the checkpoint's contract; they are
never recomputed on the data being embedded.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr

from milotile.errors import InputError
from milotile.explore.augment import normalize
from milotile.explore.data import (
    LAYOUTS,
    PatchBank,
    bank_preprocessing,
    check_crop,
    model_channels,
    open_bank,
)
from milotile.explore.model import FEATURES, SimSiam
from milotile.nn import cache
from milotile.nn.checkpoint import build_model, load_checkpoint
from milotile.nn.device import autocast, channels_last, pick_device
from milotile.runtime import active_client, adapt_threads, gpu_resources
from milotile.store import as_collection
from milotile.store.stage_output import file_source

log = logging.getLogger(__name__)

__all__ = ["Encoder", "Embeddings", "dihedral", "embed", "load_encoder", "EMBEDDINGS"]

EMBEDDINGS = "embeddings"


@dataclass
class Encoder:
    """A trained exploration model together with its contract.

    Attributes
    ----------
    model : SimSiam
        In eval mode.
    contract : dict
        ``mode, bbox, channels, mean, std, bank_key, gauss, dog, patch_modes, feature, ...``.
    arch, config : the registry name and builder config.
    path : pathlib.Path or None
        The checkpoint file (needed to embed on a distributed cluster), as ``Picker.path``.
    amp : bool
        Mixed precision of the trunk while embedding (CUDA; CPUs with native bf16 unless ``MILOTILE_CPU_BF16=0``);
        False for fp32.
    """

    model: SimSiam
    contract: dict[str, Any]
    arch: str
    config: dict[str, Any]
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device | None = None) -> Encoder:
        """Load an encoder from a checkpoint written by :func:`milotile.explore.train`."""
        ck = load_checkpoint(path)
        if not str(ck["arch"]).startswith("simsiam-") or "mode" not in ck["contract"]:
            raise InputError(f"checkpoint {os.fspath(path)!r} is a {ck['arch']!r} model, not an exploration model.")
        dev = pick_device(device)
        model = channels_last(build_model(ck).to(dev), dev)
        return cls(model, dict(ck["contract"]), ck["arch"], dict(ck["config"]), Path(path), dev)

    @property
    def mode(self) -> str:
        """``"3d"`` or ``"2d3d"``."""
        return str(self.contract["mode"])

    @property
    def bbox(self) -> int:
        """Patch side the model was trained on."""
        return int(self.contract["bbox"])

    @torch.no_grad()
    def transform(self, patches: np.ndarray | torch.Tensor, feature: str | None = None, batch_size: int = 512,
                  tta: bool | None = None) -> np.ndarray:
        """Embed raw patches ``(n, C, bbox, bbox)`` (or bank rows ``(n, S, C, b, b)``, shift 0 used).

        Parameters
        ----------
        patches : array
            Raw (un-normalised) patches; larger ones are centre-cropped to the model's bbox.
        feature : {"pred", "proj", "fc", "trunk", "centre"}, optional
            Default: the contract's.
        batch_size : int
            Patches per forward pass.
        tta : bool, optional
            Average the embedding over the 8 flips/90° rotations of each patch (in-plane orientation
            is a nuisance for particles); default: the contract's (``False`` for older models).

        Returns
        -------
        numpy.ndarray
            ``(n, D)`` float32.
        """
        feature = feature or self.contract.get("feature", "pred")
        tta = bool(self.contract.get("tta", False)) if tta is None else bool(tta)
        x = torch.as_tensor(np.asarray(patches, dtype=np.float32))
        if x.ndim == 5:
            x = x[:, 0]
        n_model = self.model.in_channels
        halves = self.mode == "2d3d" and x.ndim == 4 and x.shape[1] == LAYOUTS["halves"][0]
        if x.ndim != 4 or not (x.shape[1] == n_model or halves):
            raise InputError(
                f"expected patches (n, {self.contract['channels']}, h, w) for a {self.mode} model, got {tuple(x.shape)}."
            )
        if halves:  # even/odd tilt sums + slice: the model embeds the tilt sum (their sum)
            x = model_channels(x, "halves")
        b = self.bbox
        if x.shape[-1] != b:
            if x.shape[-1] < b:
                raise InputError(f"patches of {x.shape[-1]} px are smaller than the model's bbox {b}.")
            o = (x.shape[-1] - b) // 2
            x = x[..., o : o + b, o : o + b]
        self.model.eval()
        out = []
        for i in range(0, x.shape[0], batch_size):
            adapt_threads()
            xb = normalize(x[i : i + batch_size].to(self.device), self.contract["mean"], self.contract["std"])
            views = [channels_last(v, self.device) for v in (dihedral(xb) if tta else [xb])]
            with autocast(self.device, enabled=self.amp, cpu=True):
                f = sum(self.model.features(v, feature).float() for v in views) / len(views)
            out.append(f.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.embedding_dim(feature)), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def embedding_dim(self, feature: str | None = None) -> int:
        """Width of the embedding for ``feature``."""
        feature = feature or self.contract.get("feature", "pred")
        if feature == "trunk":
            return self.model.trunk.out_dim * self.model.in_channels
        if feature == "centre":
            return 2 * self.model.trunk.out_dim * self.model.in_channels
        return self.model.dim

    def embed(self, col: Any, key: str | None = None, batch_size: int = 512, **kwargs: Any) -> Embeddings:
        """Embed a patch bank of ``col``; see :func:`embed`."""
        return embed(col, model=self, key=key, batch_size=batch_size, **kwargs)


@dataclass
class Embeddings:
    """Embeddings written to the store: ``embeddings/<key>`` plus ``tables/embeddings-<key>``."""

    collection: Any
    key: str
    table: pd.DataFrame

    @property
    def array(self) -> zarr.Array:
        """The ``(N, D)`` float32 zarr array."""
        return self.collection.zarr_group[EMBEDDINGS][self.key]

    def values(self) -> np.ndarray:
        """All embeddings as numpy ``(N, D)`` (small: N × 128 floats)."""
        return np.asarray(self.array[:], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.table)


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/90° rotations of a batch ``(n, C, h, w)`` (identity first)."""
    return [torch.rot90(v, k, (-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def load_encoder(model: Encoder | str | os.PathLike[str], device: str | torch.device | None = None) -> Encoder:
    """An :class:`Encoder` from an encoder or a checkpoint path."""
    if isinstance(model, Encoder):
        return model
    return Encoder.from_checkpoint(model, device=device)


def _load_encoder(path: str, device: str) -> Encoder:
    return Encoder.from_checkpoint(path, device=device)


def _embed_block(
    url: str,
    storage_options: dict[str, Any],
    bank_path: str,
    out_path: str,
    start: int,
    stop: int,
    checkpoint: str,
    device: str | None,
    batch_size: int,
    feature: str,
    encoder: Encoder | None = None,
    tta: bool = False,
) -> int:
    """Embed bank rows ``start:stop`` and write them to the output array (one task)."""
    enc = encoder if encoder is not None else cache.cached(_load_encoder, checkpoint, str(pick_device(device)))
    so = storage_options or None
    src = zarr.open_array(url, path=bank_path, mode="r", storage_options=so)
    dst = zarr.open_array(url, path=out_path, mode="r+", storage_options=so)
    x = np.asarray(src[start:stop, 0], dtype=np.float32)  # (n, C, b, b), originals only
    dst[start:stop] = enc.transform(x, feature=feature, batch_size=batch_size, tta=tta)
    return stop - start


def _sources(col: Any, enc: Encoder, bank: PatchBank) -> dict[str, str | None]:
    """What embeddings depend on: the bank and the checkpoint file."""
    out = {f"patches/{bank.key}": col.source_token(f"patches/{bank.key}")}
    if enc.path is not None:
        key, tok = file_source(col, enc.path)
        out[key] = tok
    return out


def _check_bank(enc: Encoder, bank: PatchBank) -> None:
    c = enc.contract
    if bank.mode != enc.mode:
        raise InputError(
            f"patch bank {bank.key!r} is a {bank.mode} bank ({bank.channels}-channel patches) but the model is a "
            f"{c['mode']} model ({c['channels']} channel(s))."
        )
    check_crop(bank, c["bbox"])
    bp = bank_preprocessing(bank.params)
    for name in ("gauss", "dog", "compress"):
        if bp.get(name) is not None and c.get(name) is not None and bp[name] != c[name]:
            log.warning(
                "patch bank %r was made with %s=%r but the model was trained on %s=%r",
                bank.key, name, bp[name], name, c[name],
            )


def embed(
    col: Any,
    *,
    model: Encoder | str | os.PathLike[str],
    key: str | None = None,
    batch_size: int = 512,
    feature: str | None = None,
    out_key: str | None = None,
    device: str | None = None,
    client: Any | None = None,
    rows_per_task: int | None = None,
    overwrite: bool = False,
    tta: bool | None = None,
) -> Embeddings:
    """Embed every patch of a bank and write ``embeddings/<key>`` and ``tables/embeddings-<key>``.

    Parameters
    ----------
    col : Collection or path
        The store holding the patch bank.
    model : Encoder or path
        A trained encoder or its checkpoint; mode, bbox and normalisation come from its contract.
    key : str, optional
        Bank key (default: the bank the model was trained on if present, else the only bank).
    batch_size : int
        Patches per forward pass.
    feature : {"pred", "proj", "fc", "trunk", "centre"}, optional
        Which output is the embedding (default: the contract's; ``"centre"`` for models trained with
        the defaults, ``"pred"`` for models without one, as in MiLoPYP).
    out_key : str, optional
        Output name (default: the bank key).
    device : str, optional
        Torch device (default: CUDA when available).
    client : distributed.Client, optional
        Default: the current client if one exists; otherwise the work runs in this process.
    rows_per_task : int, optional
        Rows per task (rounded up to whole bank chunks; default about 2048).
    overwrite : bool
        Recompute even if a complete output with the same parameters exists.
    tta : bool, optional
        Average each embedding over the 8 flips/90° rotations of its patch (default: the contract's).

    Returns
    -------
    Embeddings
    """
    col = as_collection(col)
    enc = load_encoder(model, device=None if device is None else device)
    feature = feature or enc.contract.get("feature", "pred")
    if feature not in FEATURES:
        raise InputError(f"unknown embedding feature {feature!r}; use one of {', '.join(FEATURES)}.")
    if key is None:
        trained = enc.contract.get("bank_key")
        try:
            bank = open_bank(col, None, enc.mode)
        except InputError:
            if trained is None:
                raise
            bank = open_bank(col, trained, enc.mode)
    else:
        bank = open_bank(col, key, enc.mode)
    _check_bank(enc, bank)
    out_key = out_key or bank.key
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    dim = enc.embedding_dim(feature)
    tta = bool(enc.contract.get("tta", False)) if tta is None else bool(tta)
    params = {"bank": bank.key, "feature": feature, "n": bank.n, "dim": dim, "tta": tta}
    grp = col.zarr_group.require_group(EMBEDDINGS)
    table_name = f"embeddings-{out_key}"
    so = col.stage_output(f"{EMBEDDINGS}/{out_key}", params, _sources(col, enc, bank))
    if not overwrite and enc.path is not None and so.reusable and col.has_table(table_name):
        log.info("embeddings/%s is up to date; skipping (overwrite=True recomputes)", out_key)
        return Embeddings(col, out_key, col.read_table(table_name))
    with so:
        return _embed_into(col, so, enc, bank, grp, out_key, table_name, (feature, tta), dim, batch_size, device,
                           client, rows_per_task)


def _embed_into(col: Any, out: Any, enc: Encoder, bank: PatchBank, grp: Any, out_key: str, table_name: str,
                output: tuple[str, bool], dim: int, batch_size: int, device: str | None, client: Any,
                rows_per_task: int | None) -> Embeddings:
    feature, tta = output
    cr = bank.chunk_rows
    want = int(rows_per_task or 2048)
    step = max(cr, -(-want // cr) * cr)
    arr = grp.create_array(
        out_key, shape=(bank.n, dim), chunks=(min(step, bank.n), dim), dtype="float32", overwrite=True
    )
    out.begin(arr)
    bank_path = f"patches/{bank.key}/data"
    out_path = f"{EMBEDDINGS}/{out_key}"
    starts = list(range(0, bank.n, step))
    stops = [min(s + step, bank.n) for s in starts]
    so = dict(getattr(col, "storage_options", {}) or {})
    t0 = time.perf_counter()
    client = client if client is not None else active_client()
    if client is not None and enc.path is not None:
        gpu = gpu_resources(client) is not None
        kw: dict[str, Any] = {"resources": {"GPU": 1}} if gpu else {}
        dev = device if device is not None else ("cuda" if gpu else "cpu")
        token = uuid.uuid4().hex[:8]
        # partial: Client.map has its own batch_size/key keywords
        fn = functools.partial(
            _embed_block, col.url, so, bank_path, out_path,
            checkpoint=str(enc.path), device=dev, batch_size=batch_size, feature=feature, tta=tta,
        )
        futs = client.map(fn, starts, stops, pure=False, key=[f"embed-{out_key}-{token}-{s}" for s in starts], **kw)
        done = sum(client.gather(futs))
        where = f"{len(starts)} tasks on the cluster" + (" (GPU workers)" if gpu else "")
    else:
        if client is not None:
            log.info("encoder has no checkpoint file; embedding in this process")
        done = 0
        for s, e in zip(starts, stops, strict=True):
            done += _embed_block(col.url, so, bank_path, out_path, s, e, "", None, batch_size, feature, encoder=enc,
                                 tta=tta)
        where = "in process"
    dt = time.perf_counter() - t0
    if done != bank.n:  # pragma: no cover - defensive
        raise RuntimeError(f"embedded {done} of {bank.n} patches")

    if col.has_table(bank.table_name):
        table = col.read_table(bank.table_name)
        if len(table) != bank.n:
            raise InputError(
                f"table {bank.table_name!r} has {len(table)} rows but patch bank {bank.key!r} has {bank.n}."
            )
        table = table.reset_index(drop=True)
    else:
        log.warning("store has no table %r; the embeddings table carries only embedding_index", bank.table_name)
        table = pd.DataFrame(index=range(bank.n))
    table["embedding_index"] = np.arange(bank.n, dtype=np.int64)
    col.write_table(table_name, table, written_only=True)
    out.finish()
    col.consolidate(written_only=True)  # the output's complete flag, for remote readers
    log.info("embedded %d patches (%s, %.1f patches/s) -> %s", bank.n, where, bank.n / max(dt, 1e-9), out_path)
    return Embeddings(col, out_key, table)
