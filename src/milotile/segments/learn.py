"""Training and embedding of the learned shape features, on the Dask workers when a cluster runs.

Inputs come from ``segments features``: the shape cubes (``segments/<name>/crops``, for
``simsiam`` and ``vae``) and the surface points (``segments/<name>/points``, for ``pointae``).
Training runs as one task on a worker (asking for ``{"GPU": 1}`` when GPU workers exist) or in
this process without a cluster; it writes a run folder like the exploration models
(``options.json``, ``log.jsonl``/``log.csv``, ``loss.png``, ``last.pt``, ``checkpoints/``) with a
checkpoint contract (kind, input, cube size / points, volume) and resumes from ``last.pt``.
Embedding splits the objects into row ranges, one task each (the model is loaded once per
worker), and writes ``tables/segment-<kind>.parquet`` (``id``, ``<kind>_0`` ...).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr

from milotile.errors import InputError
from milotile.explore.model import output_std, simsiam_loss
from milotile.nn import registry
from milotile.nn.checkpoint import build_model, load_checkpoint, save_checkpoint
from milotile.nn.device import autocast, pick_device, seed_everything
from milotile.nn.runlog import RunLog
from milotile.segments.features import FEATURES_TABLE
from milotile.segments.models import ARCHS, chamfer, vae_loss
from milotile.segments.volume import open_segments, read_rows, write_rows

log = logging.getLogger(__name__)

__all__ = ["KINDS", "train_model", "embed_objects", "random_rotations", "augment_cubes", "default_run_dir"]

KINDS = tuple(ARCHS)
_DEFAULTS = {
    "simsiam": {"lr": 0.05, "config": {"dim": 32, "pred_dim": 16, "widths": [8, 16, 32]}},
    "vae": {"lr": 2e-3, "config": {"latent": 16, "widths": [8, 16, 32]}},
    "pointae": {"lr": 2e-3, "config": {"latent": 16, "width": 64}},
}


def random_rotations(n: int, g: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` uniformly random 3-D rotation matrices ``(n, 3, 3)`` (from unit quaternions)."""
    q = torch.randn(n, 4, generator=g, device=device)
    q = q / q.norm(dim=1, keepdim=True)
    a, b, c, d = q.unbind(1)
    return torch.stack([
        a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c),
        2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b),
        2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d,
    ], dim=1).view(n, 3, 3)


def augment_cubes(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.85, 1.15),
                  shift: float = 0.06, noise: float = 0.05) -> torch.Tensor:
    """A random view of cubes ``(n, 1, S, S, S)``: rotation (any), isotropic scale, shift, noise."""
    n = x.shape[0]
    dev = x.device
    rot = random_rotations(n, g, dev)
    s = torch.empty(n, 1, 1, device=dev).uniform_(*scale, generator=g)
    t = torch.empty(n, 3, 1, device=dev).uniform_(-shift, shift, generator=g)
    theta = torch.cat([rot / s, t], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if noise:
        out = out + noise * torch.randn(out.shape, generator=g, device=dev)
    return out


def default_run_dir(col: Any, kind: str, name: str) -> Path:
    """``<store>/runs/segments-<kind>-<name>``."""
    root = Path(col.path)
    if not root.exists():
        raise InputError(f"store {col.url} is not a local folder; pass out= for the run folder.")
    return Path(col.runs_dir(f"segments-{kind}-{name}"))  # the opaque runs/ node


def _inputs(col: Any, name: str, kind: str) -> tuple[pd.DataFrame, zarr.Array]:
    vol = open_segments(col, name)
    feats = read_rows(col, FEATURES_TABLE, vol.name)
    key = "points" if kind == "pointae" else "crops"
    if key not in vol.group:
        raise InputError(f"segment volume {vol.name!r} has no {key}; run `milotile segments features` with them first.")
    arr = vol.group[key]
    if arr.shape[0] != len(feats):
        raise InputError(f"{key} hold {arr.shape[0]} rows but the feature table has {len(feats)}; rerun `segments features`.")
    return feats, arr


def _batch_tensor(arr: np.ndarray, kind: str, dev: torch.device) -> torch.Tensor:
    if kind == "pointae":
        return torch.from_numpy(np.asarray(arr, np.float32)).to(dev)
    return torch.from_numpy(np.asarray(arr, np.float32) / 255.0).unsqueeze(1).to(dev)


def _step(model: torch.nn.Module, kind: str, x: torch.Tensor, g: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    if kind == "simsiam":
        p1, p2, z1, z2 = model(augment_cubes(x, g), augment_cubes(x, g))
        loss = simsiam_loss(p1, p2, z1, z2)
        return loss, {"output_std": output_std(p1.detach())}
    if kind == "vae":
        xa = augment_cubes(x, g, scale=(0.95, 1.05), shift=0.02, noise=0.0).clamp(0, 1)
        logits, mu, logvar = model(xa)
        loss, rec, kl = vae_loss(logits, xa, mu, logvar, beta=kl_weight)
        return loss, {"recon": float(rec.detach()), "kl": float(kl.detach())}
    rot = random_rotations(x.shape[0], g, x.device)
    pts = x @ rot.transpose(1, 2)
    rec, _ = model(pts)
    loss = chamfer(rec, pts)
    return loss, {"chamfer": float(loss.detach())}


def train_model(
    store: Any,
    kind: str,
    *,
    name: str | None = None,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str | None = None,
    save_every: int = 10,
    config: dict[str, Any] | None = None,
    local: bool = False,
) -> Path:
    """Train a learned shape model of ``kind`` (``simsiam``, ``vae`` or ``pointae``) on one volume.

    Parameters
    ----------
    store : Collection or path
    kind : str
        Model kind.
    name : str, optional
        Segment volume (default: the only one).
    epochs, batch_size : int
    lr : float, optional
        Learning rate (SGD with momentum for ``simsiam``, Adam for the auto-encoders).
    out : path, optional
        Run folder (default ``<store>/runs/segments-<kind>-<name>``).
    resume : bool
        Continue from ``<out>/last.pt``.
    seed : int
        Seeds initialisation, batch order and augmentations (per epoch, so resume replays them).
    device : str, optional
        Torch device (default: CUDA when available).
    save_every : int
        Also keep ``checkpoints/epoch-NNNN.pt`` every N epochs.
    config : dict, optional
        Architecture options (see :mod:`milotile.segments.models`).
    local : bool
        Train in this process even when a Dask cluster is active.

    Returns
    -------
    pathlib.Path
        The checkpoint ``<out>/last.pt``.
    """
    if kind not in KINDS:
        raise InputError(f"unknown learned feature {kind!r}; use one of {', '.join(KINDS)}.")
    if epochs < 1 or batch_size < 2:
        raise InputError(f"epochs must be >= 1 and batch size >= 2, got {epochs} and {batch_size}.")
    vol = open_segments(store, name)
    col = vol.collection
    run_dir = Path(out) if out is not None else default_run_dir(col, kind, vol.name)
    _inputs(col, vol.name, kind)  # fail early, before any task is submitted
    if (run_dir / "last.pt").is_file() and not resume:
        raise InputError(f"run folder {str(run_dir)!r} already holds a checkpoint; pass --resume or choose another --out.")
    job = functools.partial(
        _train_job, col.url, dict(col.storage_options or {}), vol.name, kind, str(run_dir), epochs, batch_size, lr,
        resume, seed, device, save_every, dict(config or {}),
    )
    from milotile.runtime import active_client, gpu_resources

    client = None if local else active_client()
    if client is None:
        return Path(job())
    res = gpu_resources()
    fut = client.submit(job, pure=False, key=f"segments-train-{kind}-{vol.name}-{os.getpid()}-{time.time_ns()}",
                        **({"resources": res} if res else {}))
    log.info("training %s on the Dask cluster%s", kind, " (GPU worker)" if res else "")
    return Path(fut.result())


def _train_job(url: str, so: dict, name: str, kind: str, run_dir: str, epochs: int, batch_size: int,
               lr: float | None, resume: bool, seed: int, device: str | None, save_every: int,
               config: dict[str, Any]) -> str:
    """The training loop (runs on a worker or in process); returns the checkpoint path."""
    from milotile.store import open_collection

    col = open_collection(url, mode="r+", storage_options=so or None)
    feats, arr = _inputs(col, name, kind)
    data = np.asarray(arr[:])
    dev = pick_device(device)
    rd = Path(run_dir)
    runlog = RunLog(rd)
    arch = ARCHS[kind]
    lr = float(lr if lr is not None else _DEFAULTS[kind]["lr"])
    cfg = {**_DEFAULTS[kind]["config"], **config}
    if kind == "vae":
        cfg["size"] = int(data.shape[-1])
    if kind == "pointae":
        cfg["n_points"] = int(data.shape[1])
    start, ck = 0, None
    if resume:
        if not (rd / "last.pt").is_file():
            raise InputError(f"cannot resume: {str(rd / 'last.pt')!r} does not exist; start without --resume.")
        ck = load_checkpoint(rd / "last.pt")
        if ck["contract"].get("kind") != kind:
            raise InputError(f"cannot resume {str(rd / 'last.pt')!r}: it is a {ck['contract'].get('kind')} model, not {kind}.")
        cfg, start = dict(ck["config"]), int(ck["epoch"] or 0)
        runlog.truncate(start)
    seed_everything(seed)
    model = registry.create(arch, **cfg)
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
    model.to(dev)
    if kind == "simsiam":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    if ck is not None and "optimizer" in ck:
        opt.load_state_dict(ck["optimizer"])
    contract = {
        "kind": kind, "input": "points" if kind == "pointae" else "crops", "volume": name, "store": url,
        "crop_size": None if kind == "pointae" else int(data.shape[-1]),
        "n_points": int(data.shape[1]) if kind == "pointae" else None, "n_train": int(len(data)),
        "embedding": {"simsiam": "fc", "vae": "mu", "pointae": "code"}[kind],
        "embedding_dim": int(cfg.get("dim", cfg.get("latent", 16))),
    }
    options = {"store": url, "volume": name, "kind": kind, "epochs": epochs, "batch_size": batch_size, "lr": lr,
               "seed": seed, "device": str(dev), "arch": arch, "config": cfg}
    runlog.save_options(options)
    bs = min(batch_size, len(data))
    for epoch in range(start, epochs):
        model.train()
        cur = lr * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1))) if kind == "simsiam" else lr
        for grp_ in opt.param_groups:
            grp_["lr"] = cur
        g = torch.Generator(device=dev)
        g.manual_seed(int(seed) * 100003 + epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        kl_w = min(1.0, (epoch + 1) / max(1, epochs // 3))
        t0, tot, seen, extra = time.perf_counter(), 0.0, 0, {}
        for i in range(0, len(order) - bs + 1, bs):
            x = _batch_tensor(data[np.sort(order[i:i + bs])], kind, dev)
            with autocast(dev):
                loss, info = _step(model, kind, x, g, kl_w)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{kind} training diverged at epoch {epoch + 1}; lower the learning rate {lr}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(x)
            seen += len(x)
            for k, v in info.items():
                extra[k] = extra.get(k, 0.0) + v * len(x)
        rec = {"epoch": epoch + 1, "loss": tot / max(seen, 1), "lr": cur, "seconds": time.perf_counter() - t0,
               **{k: v / max(seen, 1) for k, v in extra.items()}}
        runlog.log_epoch(rec)
        log.info("%s epoch %d/%d loss %.4f", kind, epoch + 1, epochs, rec["loss"])
        save_checkpoint(rd / "last.pt", arch=arch, config=cfg, model=model, contract=contract, optimizer=opt,
                        epoch=epoch + 1, extra={"options": options})
        if (epoch + 1) % save_every == 0 or epoch + 1 == epochs:
            save_checkpoint(rd / "checkpoints" / f"epoch-{epoch + 1:04d}.pt", arch=arch, config=cfg, model=model,
                            contract=contract, epoch=epoch + 1)
    if runlog.records():
        runlog.plot([k for k in ("loss", "recon", "kl", "chamfer", "output_std") if k in runlog.records()[-1]],
                    rd / "loss.png")
    return str(rd / "last.pt")


def _load_model(path: str, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    ck = load_checkpoint(path)
    return build_model(ck).to(device).eval(), dict(ck["contract"])


def _cached_model(path: str, device: str | None) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """The checkpoint's model, loaded once per process (worker) and device (:mod:`milotile.nn.cache`)."""
    from milotile.nn.cache import cached

    dev = pick_device(device)
    model, contract = cached(_load_model, path, str(dev))
    return model, contract, dev


def _embed_rows(url: str, so: dict, name: str, kind: str, ckpt: str, device: str | None, start: int, stop: int,
                batch_size: int) -> np.ndarray:
    from milotile.store import open_collection

    col = open_collection(url, mode="r", storage_options=so or None)
    _, arr = _inputs(col, name, kind)
    model, _, dev = _cached_model(ckpt, device)
    out = []
    with torch.no_grad():
        for i in range(start, stop, batch_size):
            x = _batch_tensor(arr[i:min(i + batch_size, stop)], kind, dev)
            with autocast(dev):
                out.append(model.embed(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_objects(
    store: Any,
    kind: str,
    *,
    name: str | None = None,
    model: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int = 256,
    rows_per_task: int = 2048,
) -> pd.DataFrame:
    """Embed every object with a trained model and write ``tables/segment-<kind>``.

    Parameters
    ----------
    store : Collection or path
    kind : str
        ``simsiam``, ``vae`` or ``pointae``.
    name : str, optional
        Segment volume.
    model : path, optional
        Checkpoint (default: ``<store>/runs/segments-<kind>-<name>/last.pt``).
    device : str, optional
    batch_size, rows_per_task : int

    Returns
    -------
    pandas.DataFrame
        ``id`` and ``<kind>_0 .. <kind>_{D-1}``.
    """
    if kind not in KINDS:
        raise InputError(f"unknown learned feature {kind!r}; use one of {', '.join(KINDS)}.")
    vol = open_segments(store, name)
    col = vol.collection
    ckpt = Path(model) if model is not None else default_run_dir(col, kind, vol.name) / "last.pt"
    if not ckpt.is_file():
        raise InputError(f"no model {str(ckpt)!r}; train one with `milotile segments train --kind {kind}`.")
    contract = load_checkpoint(ckpt)["contract"]
    if contract.get("kind") != kind:
        raise InputError(f"checkpoint {str(ckpt)!r} is a {contract.get('kind')!r} model, not {kind!r}.")
    feats, arr = _inputs(col, vol.name, kind)
    want = contract.get("crop_size") if kind != "pointae" else contract.get("n_points")
    have = arr.shape[-1] if kind != "pointae" else arr.shape[1]
    if want is not None and int(want) != int(have):
        raise InputError(f"the model was trained on inputs of size {want} but volume {vol.name!r} has {have}.")
    from milotile.runtime import active_client, gpu_resources

    n = len(feats)
    starts = list(range(0, n, rows_per_task))
    stops = [min(s + rows_per_task, n) for s in starts]
    so = dict(col.storage_options or {})
    client = active_client()
    if client is not None:
        res = gpu_resources()
        dev = device if device is not None else ("cuda" if res else "cpu")
        fn = functools.partial(_embed_rows, col.url, so, vol.name, kind, str(ckpt), dev, batch_size=batch_size)
        futs = client.map(fn, starts, stops, pure=False, **({"resources": res} if res else {}))
        parts = client.gather(futs)
    else:
        parts = [_embed_rows(col.url, so, vol.name, kind, str(ckpt), device, s, e, batch_size)
                 for s, e in zip(starts, stops, strict=True)]
    emb = np.concatenate(parts).astype(np.float32)
    table = pd.DataFrame(emb, columns=[f"{kind}_{i}" for i in range(emb.shape[1])])
    table.insert(0, "id", feats["id"].to_numpy(np.uint64))
    write_rows(col, f"segment-{kind}", vol.name, table,
               params={"stage": f"segments-embed-{kind}", "checkpoint": str(ckpt), "contract": contract})
    log.info("embedded %d objects with %s -> tables/segment-%s (%d dims)", n, kind, kind, emb.shape[1])
    return table
