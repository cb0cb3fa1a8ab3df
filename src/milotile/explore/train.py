"""SimSiam training of the exploration model on a patch bank (MiLoPYP §2.3–2.5, fixed).

Fixes relative to MiLoPYP: augmentation runs in torch on whole batches (CPU or GPU) instead of
a per-sample PIL loop; patches stream from zarr instead of Python lists; normalisation
statistics are computed once on the training bank and stored in the checkpoint; weights start
random (or from a local file), nothing is downloaded; ``resume`` really resumes (epoch,
optimizer, schedule, run log, random streams).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from milotile.errors import InputError
from milotile.explore.augment import default_config, make_views
from milotile.explore.data import (
    PatchBank,
    PatchLoader,
    bank_preprocessing,
    channel_stats,
    check_crop,
    open_bank,
)
from milotile.explore.embed import Encoder
from milotile.explore.model import load_weights, output_std, pair_loss
from milotile.explore.recipe import (
    CPU_WIDTHS,
    FIXED_ON_RESUME,
    GPU_WIDTHS,
    OPTIMIZERS,
    ExploreRecipe,
)
from milotile.nn import ddp, registry
from milotile.nn.checkpoint import load_checkpoint, save_checkpoint
from milotile.nn.device import amp_dtype, autocast, channels_last, pick_device, seed_everything
from milotile.nn.runlog import RunLog
from milotile.runtime import adapt_threads
from milotile.store import as_collection

log = logging.getLogger(__name__)

__all__ = ["CPU_WIDTHS", "GPU_WIDTHS", "OPTIMIZERS", "ExploreRecipe", "checkpoint_recipe", "cosine_lr", "train"]



def cosine_lr(base_lr: float, epoch: int, epochs: int, cosine: bool = True, final_factor: float = 1e-3) -> float:
    """Learning rate of ``epoch`` (0-based): cosine decay from ``base_lr`` to ``base_lr·final_factor``.

    MiLoPYP decays to ``lr·0.1³`` with ``--cosine``; without it the rate stays constant
    (its step schedule starts at epoch 200).
    """
    if not cosine or epochs <= 1:
        return base_lr
    eta_min = base_lr * final_factor
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / (epochs - 1))) / 2


def _optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "sgd-plain":  # MiLoPYP: no momentum, no weight decay
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}.")


def _default_run_dir(col: Any, key: str, mode: str) -> Path:
    root = Path(col.path)
    if not root.exists():
        raise InputError(f"store {col.url} is not a local folder; pass out= for the run folder.")
    return Path(col.runs_dir(f"explore-{mode}-{key}"))  # <store>/runs (an opaque node: zarr never lists it)


def _auto_batch(arch: str, config: dict[str, Any], bank: Any, bbox: int, dev: torch.device, amp: bool) -> int:
    """256 on a GPU; on the CPU the largest batch <= 256 whose saved activations fit the memory budget."""
    from milotile.nn.device import auto_batch_size

    if dev.type != "cpu":
        return 256
    budget = int(float(os.environ.get("MILOTILE_TRAIN_MEMORY_MB", "256")) * 2**20)
    probe_model = registry.create(arch, **config).train()
    c = 1 if bank.mode == "3d" else 2

    def step(n: int) -> torch.Tensor:
        x = torch.zeros(n, c, bbox, bbox)
        with autocast(dev, enabled=amp, cpu=True):
            p1, p2, z1, z2 = probe_model(x, x)
            return pair_loss("simsiam", p1, p2, z1, z2)  # the objectives' activations are the same

    bs, per_sample = auto_batch_size(step, 256, budget)
    log.info("batch size %d (activations %.1f MiB per patch, budget %.0f MiB; MILOTILE_TRAIN_MEMORY_MB)",
             bs, per_sample / 2**20, budget / 2**20)
    return bs


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def train(
    col_or_store: Any,
    bank: PatchBank | str | None = None,
    recipe: ExploreRecipe | None = None,
    *,
    key: str | None = None,
    mode: str | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    device: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> Encoder:
    """Train a SimSiam exploration model on a patch bank of the store.

    Parameters
    ----------
    col_or_store : Collection or path
        The store holding ``patches/<key>`` and ``tables/patches-<key>.parquet``.
    bank : PatchBank or str, optional
        The patch bank (as ``col.patches(...)`` returns it) or its key.
    recipe : ExploreRecipe, optional
        The hyper-parameters (:class:`milotile.explore.recipe.ExploreRecipe`; default: its defaults, the
        recipe chosen on ``benchmarks/explore.py``): patch side ``bbox``, ``epochs``, ``batch_size``,
        trunk ``widths``, ``lr``, ``optimizer``, ``weight_decay``, ``cosine``, ``save_every``, ``seed``,
        embedding ``feature`` and ``tta``, ``strong_aug`` / ``weak_aug``, ``dim``, ``amp``,
        ``model_config``. The resolved recipe is stored in the checkpoint's contract (``"recipe"``).
    key : str, optional
        Patch-bank key (default: ``bank``, else the only bank, or the only one matching ``mode``).
    mode : {"3d", "2d3d"}, optional
        Default: the bank's (1 channel → ``3d``, 2 channels → ``2d3d``).
    out : path, optional
        Run folder (default ``<store>/runs/explore-<mode>-<key>``).
    resume : bool
        Continue from ``<out>/last.pt`` with the recipe stored there; ``epochs``, ``save_every``,
        ``feature``, ``tta`` and ``amp`` may change, a different value of a field the checkpoint fixes
        (:data:`milotile.explore.recipe.FIXED_ON_RESUME`) is an :class:`InputError` naming it.
    device : str, optional
        ``"cpu"``, ``"cuda"``...; default CUDA when available.
    weights : path, optional
        Local weights file for a partial initialisation (no download ever).
    **overrides
        Any recipe field (``train(col, epochs=5, lr=0.1)``), applied with :meth:`ExploreRecipe.replace`;
        an unknown name is an :class:`InputError` that suggests the closest one.

    Returns
    -------
    Encoder
        The trained model (eval mode) with its contract and ``path`` = ``<out>/last.pt``.

    Notes
    -----
    ``batch_size`` ``None``: 256 on a GPU; on the CPU the largest batch up to 256 whose activations fit
    ``MILOTILE_TRAIN_MEMORY_MB`` (256 MiB), which keeps the process under ~1 GiB RSS (see
    :func:`milotile.nn.device.auto_batch_size`); reduced to the bank size for tiny banks. ``widths``
    ``None``: MiLoPYP's ``(64, 128, 256)`` on a GPU, the narrower :data:`CPU_WIDTHS` on the CPU.
    ``feature`` ``centre`` (the backbone's last map pooled over its central third and over the ring
    around it) separates species best on ``benchmarks/explore.py --preset hard``; ``tta`` averages
    embeddings over the 8 flips/90° rotations (0.01-0.03 k-NN accuracy on the hard benchmark, at 8
    forward passes per patch). ``seed`` seeds initialisation, data order and augmentation per epoch,
    so a resumed run replays them.
    """
    recipe = _recipe(recipe, overrides)
    given = {**recipe.changed(), **overrides}
    col = as_collection(col_or_store)
    bank = open_bank(col, key if key is not None else bank, mode)
    mode = bank.mode
    run_dir = Path(out) if out is not None else _default_run_dir(col, bank.key, mode)
    last_path = run_dir / "last.pt"
    if resume and last_path.is_file():
        recipe = _resumed_recipe(last_path, recipe, given)
    bbox = check_crop(bank, recipe.bbox)
    if bank.n < 2:
        raise InputError(f"patch bank {bank.key!r} has {bank.n} patch(es); training needs at least 2.")
    dev = ddp.local_device() if ddp.is_distributed() else pick_device(device)
    main = ddp.is_main()  # only rank 0 writes the run folder
    arch = f"simsiam-{mode}"
    config: dict[str, Any] = recipe.network_config(dev.type)
    batch_size = _batch_size(recipe.batch_size, arch, config, bank, bbox, dev, recipe.amp)
    r = recipe = recipe.resolved(bbox=bbox, batch_size=batch_size, device_type=dev.type)
    runlog = RunLog(run_dir)
    strong, weak = _augment_configs(mode, r.strong_aug, r.weak_aug)
    cast = amp_dtype(dev, cpu=True) if r.amp else None  # what autocast will use in the training loop
    options = {
        "store": col.url, "key": bank.key, "mode": mode, "bbox": bbox, "epochs": r.epochs,
        "batch_size": batch_size, "lr": r.lr, "optimizer": r.optimizer, "weight_decay": r.weight_decay,
        "cosine": r.cosine, "seed": r.seed, "save_every": r.save_every, "device": str(dev),
        "weights": None if weights is None else os.fspath(weights), "arch": arch, "config": config,
        "feature": r.feature, "tta": r.tta, "amp": r.amp, "strong_aug": strong.to_dict(), "weak_aug": weak.to_dict(),
        "autocast": None if cast is None else str(cast).removeprefix("torch."),
        "recipe": r.to_dict(),
    }
    resume_ckpt, start_epoch, mean, std = _start(run_dir, bank, mode, bbox, r.epochs, resume, runlog if main else None)
    if resume_ckpt is not None:
        arch, config = resume_ckpt["arch"], dict(resume_ckpt["config"])
    if main:
        runlog.save_options(options)
    seed_everything(r.seed)
    model, net, opt = _build(arch, config, resume_ckpt, weights, dev, r.optimizer, r.lr, r.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=r.amp and amp_dtype(dev) == torch.float16)
    bp = bank.params
    contract = {
        "mode": mode, "bbox": bbox, "channels": bank.channels, "layout": bank.layout, "mean": mean, "std": std,
        "n_shifts": bank.n_shifts, "bank_key": bank.key, "bank_bbox": bank.bbox,
        **bank_preprocessing(bp), "patch_modes": bp.get("modes"),
        "shifts": bp.get("shifts"), "bank_params": bp, "feature": r.feature, "tta": r.tta,
        "embedding_dim": int(config["dim"]),
        "n_train": bank.n, "store": col.url, "recipe": r.to_dict(),
    }
    loader = PatchLoader(bank, batch_size, shuffle=True, drop_last=True, seed=r.seed, crop=bbox)
    views = (strong, weak, torch.tensor(mean, device=dev), torch.tensor(std, device=dev), bank.layout == "halves")
    epochs = r.epochs
    log.info(
        "training %s on %d patches of bank %r (bbox %d, %d batches of %d per epoch, device %s), epochs %d..%d",
        arch, bank.n, bank.key, bbox, len(loader), batch_size, dev, start_epoch + 1, epochs,
    )
    t_loop = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        cur_lr = cosine_lr(r.lr, epoch, epochs, r.cosine)
        _set_lr(opt, cur_lr)
        rec = _epoch(model, net, opt, scaler, loader, views, epoch, r.seed, dev, r.amp, r.lr, (r.objective, r.temperature))
        rec.update(epoch=epoch + 1, lr=cur_lr)
        if not main:
            continue
        runlog.log_epoch(rec)
        eta = (time.perf_counter() - t_loop) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        log.info("epoch %d/%d loss %.4f output_std %.4f lr %.4g %.1f s (%.0f patches/s)%s",
                 epoch + 1, epochs, rec["loss"], rec["output_std"], cur_lr, rec["seconds"], rec["patches_per_s"],
                 f", ETA {eta:.0f} s" if epoch + 1 < epochs else "")
        extra = {"options": options}
        save_checkpoint(last_path, arch=arch, config=config, model=model, contract=contract,
                        optimizer=opt, epoch=epoch + 1, extra=extra)
        if (epoch + 1) % r.save_every == 0 or epoch + 1 == epochs:
            save_checkpoint(run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}.pt", arch=arch, config=config,
                            model=model, contract=contract, optimizer=None, epoch=epoch + 1, extra=extra)
    if main and runlog.records():
        runlog.plot(["loss", "output_std", "lr"], run_dir / "loss.png")
    model.eval()
    return Encoder(model, contract, arch, config, last_path if last_path.is_file() else None, dev)


def _recipe(recipe: ExploreRecipe | None, overrides: dict[str, Any]) -> ExploreRecipe:
    """The run's recipe: the given one (or the defaults) with the keyword overrides."""
    if recipe is not None and not isinstance(recipe, ExploreRecipe):
        raise InputError(f"recipe must be an ExploreRecipe, got {type(recipe).__name__}.")
    return (recipe or ExploreRecipe()).replace(**overrides)


def checkpoint_recipe(ckpt: dict[str, Any]) -> ExploreRecipe:
    """The (resolved) recipe an exploration checkpoint was trained with.

    Checkpoints written before recipes existed are read from their stored options.
    """
    contract = ckpt.get("contract") or {}
    if contract.get("recipe"):
        return ExploreRecipe.from_dict(contract["recipe"])
    opts = dict((ckpt.get("extra") or {}).get("options") or {})
    cfg = dict(opts.pop("config", None) or ckpt.get("config") or {})
    known = {k: v for k, v in opts.items() if k in ExploreRecipe.field_names() and v is not None}
    known["dim"] = int(cfg.pop("dim", known.get("dim", 128)))
    known["model_config"] = cfg or None
    known.setdefault("bbox", contract.get("bbox"))
    return ExploreRecipe.from_dict(known)


def _resumed_recipe(last_path: Path, recipe: ExploreRecipe, given: dict[str, Any]) -> ExploreRecipe:
    """The stored recipe of the run being resumed, with the given fields the checkpoint does not fix."""
    stored = checkpoint_recipe(load_checkpoint(last_path, map_location="cpu"))
    for name in given:
        value = getattr(recipe, name)
        if name in FIXED_ON_RESUME and value is not None and value != getattr(stored, name):
            raise InputError(
                f"cannot resume {str(last_path)!r} with {name}={value!r}: the run was started with "
                f"{name}={getattr(stored, name)!r}; drop the option or start a new run (another --out)."
            )
    return stored.replace(**{k: getattr(recipe, k) for k in given if k not in FIXED_ON_RESUME})


def _batch_size(batch_size: int | None, arch: str, config: dict[str, Any], bank: PatchBank, bbox: int,
                dev: torch.device, amp: bool) -> int:
    """The batch size: the given one or the memory-bounded automatic one, at most the bank size."""
    auto = batch_size is None
    if auto:
        batch_size = _auto_batch(arch, config, bank, bbox, dev, amp)
    if batch_size > bank.n:
        if not auto:
            log.warning("batch_size %d > %d patches in bank %r; using %d", batch_size, bank.n, bank.key, bank.n)
        return bank.n
    return batch_size


def _augment_configs(mode: str, strong_aug: dict | None, weak_aug: dict | None) -> tuple[Any, Any]:
    """The mode's two view configurations with the given overrides (JSON lists become tuples)."""
    from dataclasses import replace

    def apply(base: Any, over: dict | None) -> Any:
        if not over:
            return base
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in over.items()}
        try:
            return replace(base, **over)
        except TypeError as exc:
            raise InputError(f"invalid augmentation option: {exc}.") from exc

    return apply(default_config(mode, "strong"), strong_aug), apply(default_config(mode, "weak"), weak_aug)


def _start(run_dir: Path, bank: PatchBank, mode: str, bbox: int, epochs: int, resume: bool,
           runlog: RunLog | None) -> tuple[dict | None, int, list[float], list[float]]:
    """``(checkpoint to resume or None, first epoch, channel means, channel stds)``."""
    last_path = run_dir / "last.pt"
    if not resume:
        if last_path.is_file():
            raise InputError(
                f"run folder {str(run_dir)!r} already holds a checkpoint; pass resume=True (--resume) "
                "or choose another --out"
            )
        t = time.perf_counter()
        mean, std = channel_stats(bank, crop=bbox)
        log.info("channel statistics of bank %r: mean %s std %s (%.1f s)", bank.key,
                 np.round(mean, 4).tolist(), np.round(std, 4).tolist(), time.perf_counter() - t)
        return None, 0, mean, std
    if not last_path.is_file():
        raise InputError(f"cannot resume: {str(last_path)!r} does not exist; start without --resume.")
    ckpt = load_checkpoint(last_path)
    prev = ckpt["contract"]
    if prev.get("mode") != mode or prev.get("bank_key") != bank.key or int(prev.get("bbox", -1)) != bbox:
        raise InputError(
            f"cannot resume {str(last_path)!r}: it was trained on bank {prev.get('bank_key')!r} "
            f"mode {prev.get('mode')!r} bbox {prev.get('bbox')}, not {bank.key!r} {mode!r} {bbox}."
        )
    start_epoch = int(ckpt["epoch"] or 0)
    if runlog is not None:  # rank 0 only
        runlog.truncate(start_epoch)
    if start_epoch >= epochs:
        log.info("run %s already finished %d of %d epochs", run_dir, start_epoch, epochs)
    return ckpt, start_epoch, list(prev["mean"]), list(prev["std"])


def _build(arch: str, config: dict, resume_ckpt: dict | None, weights: Any, dev: torch.device, optimizer: str,
           lr: float, weight_decay: float) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """The model, the module to call (DDP-wrapped inside a process group) and the optimizer."""
    model = registry.create(arch, **config)
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
    elif weights is not None:
        load_weights(model, weights)
    channels_last(model.to(dev), dev)
    net = ddp.wrap(model, dev)  # DistributedDataParallel inside a process group
    opt = _optimizer(optimizer, model.parameters(), lr, weight_decay)
    if resume_ckpt is not None and "optimizer" in resume_ckpt:
        opt.load_state_dict(resume_ckpt["optimizer"])
    return model, net, opt


def _epoch(model: torch.nn.Module, net: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any,
           loader: PatchLoader, views: tuple, epoch: int, seed: int, dev: torch.device, amp: bool,
           lr: float, objective: tuple[str, float] = ("simsiam", 0.2)) -> dict[str, Any]:
    """One epoch (two augmented views per patch, ``objective`` = the recipe's objective and temperature); returns
    its record."""
    strong, weak, mean_t, std_t, halves = views
    model.train()
    g = torch.Generator(device=dev)
    g.manual_seed(int(seed) * 100003 + epoch)
    t0 = time.perf_counter()
    tot_loss = tot_std = 0.0
    seen = steps = 0
    for batch in loader.epoch(epoch):
        adapt_threads()
        xb = torch.from_numpy(batch).to(dev, non_blocking=True)
        v1, v2 = make_views(xb, g, strong, weak, mean_t, std_t, halves=halves)
        v1, v2 = ddp.shard(v1), ddp.shard(v2)  # this rank's rows of the global batch
        v1, v2 = channels_last(v1, dev), channels_last(v2, dev)
        with autocast(dev, enabled=amp, cpu=True):
            p1, p2, z1, z2 = net(v1, v2)
            loss = pair_loss(objective[0], p1, p2, z1, z2, objective[1])
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower the learning rate {lr}.")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        b = v1.shape[0]
        tot_loss += float(loss.detach()) * b
        tot_std += output_std(p1.detach()) * b
        seen += b
        steps += 1
    dt = time.perf_counter() - t0
    world = ddp.rank_world()[1]
    return {"loss": ddp.all_mean(tot_loss / max(seen, 1)), "output_std": ddp.all_mean(tot_std / max(seen, 1)),
            "seconds": dt, "patches_per_s": world * seen / max(dt, 1e-9), "steps": steps}
