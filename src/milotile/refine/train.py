"""Training of the positive-unlabeled picker from sparse labels (MiLoPYP's refinement module).

``train(col, labels, ...)`` streams crops from the Zarr store (one around every labelled particle,
jittered, plus random crops), builds PU targets per crop, and optimises

``loss = PU-focal(hm) + cr_weight · debiased-InfoNCE(feat, subsample) + consistency_weight · MSE(view1, unflip(view2))``

with batches of several crops. Each epoch is logged (losses, seconds, and the validation precision /
recall / F1 / AP of :func:`milotile.refine.validation.validate`, which predicts and decodes exactly as
``pick`` does) and checkpointed (``last.pt``, and ``best.pt`` by validation F1, whose F1-optimal
threshold becomes the checkpoint's ``suggested_threshold``, the default of ``pick``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from milotile.errors import InputError
from milotile.nn import registry
from milotile.nn.checkpoint import load_checkpoint, save_checkpoint
from milotile.nn.device import amp_dtype, autocast, pick_device, seed_everything
from milotile.nn.runlog import RunLog
from milotile.refine.contract import picker_contract
from milotile.refine.data import CropDataset, VolumeReader
from milotile.refine.labels import class_index, load_label_table
from milotile.refine.losses import (
    PU_RISKS,
    consistency_loss,
    debiased_contrastive_loss,
    pu_focal_loss,
)
from milotile.refine.picker import Picker
from milotile.refine.prior import estimate_prior
from milotile.refine.shape import fit_shape_models
from milotile.refine.targets import target_geometry
from milotile.refine.threshold import AUTO_FLOOR, label_records
from milotile.refine.validation import regions_from_labels, split_validation, validate
from milotile.stages.preprocess import volume_stats
from milotile.store import as_collection

logger = logging.getLogger(__name__)

__all__ = ["ARCH_ALIASES", "default_epochs", "default_z_context", "train"]

ARCH_ALIASES = {"unet_4": "unet4", "unet_5": "unet5", "ressmall_18": "ressmall"}
_LOSS_KEYS = ("loss", "hm_loss", "cr_loss", "consis_loss", "r_pos", "r_neg")


#: Network of the default recipe (the one measured on benchmarks/refine_hard.py, issue 15): a 16-filter
#: U-Net; the z dilation of its 3D head (and the crop depth) follow the particle size, see
#: :func:`default_z_context`.
DEFAULT_UNET = {"start_filts": 16}
#: Labelled crops (labels × repeats × epochs) the default number of epochs aims at.
LABELLED_CROP_BUDGET = 600


def train(
    col: Any,
    labels: pd.DataFrame | str | os.PathLike[str],
    *,
    val_labels: pd.DataFrame | str | os.PathLike[str] | None = None,
    bbox: float = 16,
    epochs: int | None = None,
    arch: str = "unet4",
    arch_config: dict[str, Any] | None = None,
    batch_size: int = 4,
    crop: Sequence[int] | None = None,
    lr: float = 1e-3,
    tau: float | str = 0.01,
    pu_risk: str = "clip",
    temp: float = 0.07,
    cr_weight: float = 0.1,
    unsup_weight: float = 0.1,
    consistency_weight: float = 1.0,
    contrastive: bool = False,
    thresh: float = 0.8,
    classes: Sequence[str] | bool | None = None,
    gauss: float = 0.0,
    compress: bool = False,
    compress_how: str = "max",
    clip: Sequence[float] = (-3.0, 3.0),
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    seed: int = 317,
    device: str | torch.device | None = None,
    val_fraction: float | None = None,
    val_radius: float | None = None,
    val_every: int = 1,
    debug_slices: Sequence[int] | None = None,
    num_workers: int = 0,
    random_fraction: float = 0.25,
    repeats: int = 5,
    max_pos: int = 256,
    n_unlabeled: int = 256,
    amp: bool = True,
    cache_chunks: int = 8,
    tta: int = 4,
    extra_positives: pd.DataFrame | None = None,
    self_training: int = 0,
    shape_check: bool = True,
) -> Picker:
    """Train a PU picker from sparse labels.

    Parameters
    ----------
    col
        Collection (or its path).
    labels
        Training labels: DataFrame ``tomogram, x, y, z[, class]`` (level-0 voxels) or any file
        :func:`milotile.formats.read_labels` understands.
    val_labels
        Held-out labels; their bounding regions (padded by ``bbox``) are predicted each epoch.
        Without them, ``val_fraction`` of the most-labelled tomogram's labels (the largest x) are
        held out as a region (default 0: a region of sparsely labelled particles counts its
        unlabelled particles as false positives, so its precision and threshold are wrong; ``pick``
        then chooses the threshold by :mod:`milotile.refine.threshold`).
    bbox
        Particle box (level-0 voxels); sets the target Gaussian (CenterNet radius, ``down_ratio`` 2).
    epochs
        Number of epochs (each visits every labelled particle ``repeats`` times plus random crops).
        Default: a budget of about :data:`LABELLED_CROP_BUDGET` labelled crops,
        ``round(budget / (labels × repeats))`` clipped to 6–20 (20 epochs for 6 labels, 7 for 18:
        on the hard benchmark 20 epochs beat 6 with 6 labels and lost to them with 18).
    arch, arch_config
        ``unet4``, ``unet5`` or ``ressmall`` and extra builder keywords (e.g. ``start_filts``).
    batch_size, crop
        Crops per step and model-input crop ``(z, y, x)`` (z in compressed slices with ``compress``);
        default ``(depth, 64, 64)`` with the depth of :func:`default_z_context`.
    lr
        Adam learning rate.
    pu_risk
        Non-negative correction of the PU risk (:func:`milotile.refine.losses.pu_focal_loss`:
        ``"clip"`` as MiLoPYP, the default; ``"nnpu"``; ``"pn"``).
    tau, temp, cr_weight, unsup_weight, consistency_weight, contrastive
        PU prior (``"auto"``: estimated from the labelled tomograms by
        :func:`milotile.refine.prior.estimate_prior`), InfoNCE temperature and loss weights; ``contrastive=False`` trains the PU focal
        term only (single view).
    thresh
        Target value from which voxels are hard positives.
    classes
        None: one channel for all labels; True: one channel per ``class`` value; or a list of names.
    gauss, compress, compress_how, clip
        Preprocessing (:mod:`milotile.ops.preprocess`): Gaussian sigma (0 = off), pairwise z
        compression (``"max"`` as MiLoPYP, or ``"mean"``), clip range in std of the filtered volume.
    out
        Run folder (default ``<store>/runs/refine-<timestamp>`` for a local store; required for a
        remote one).
    resume
        Continue from ``<out>/last.pt`` (weights, optimiser, epoch, best score).
    seed
        Random seed (crops, augmentation, initialisation).
    device
        ``None``/``"auto"``, ``"cpu"``, ``"cuda"``...
    val_fraction, val_radius, val_every
        Validation split, matching radius (default ``bbox / 4``, half a particle radius) and interval.
    debug_slices
        Level-0 z slices of validation regions to draw as PNGs under ``<out>/debug``.
    num_workers
        DataLoader worker processes (0 = read crops in the main process).
    random_fraction
        Random crops per epoch relative to the number of labelled particles.
    repeats
        Crops per labelled particle and epoch (useful with very few labels).
    max_pos, n_unlabeled
        Per-crop caps of the contrastive voxel subsample.
    amp
        Mixed precision on CUDA.
    cache_chunks
        Decompressed storage chunks cached per tomogram reader.
    tta
        In-plane symmetries averaged at prediction (:mod:`milotile.refine.tta`; 1 = none).
    extra_positives
        More positives (``tomogram, x, y, z[, class]``) trained on like labels but not kept as the
        picker's ``train_labels`` (which choose the automatic threshold): pseudo-labels, or
        candidates chosen in the exploration map.
    self_training
        Rounds of self-training (:mod:`milotile.refine.self_training`): after each round the picks
        that score like the labels in the labelled tomograms become ``extra_positives`` of the next
        round, trained from scratch; stops early when the pseudo-labels stop changing. Round ``r`` is
        written to ``<out>/round-<r>``; the final round's checkpoints are copied to ``<out>``.
    shape_check
        Fit the shape check of :mod:`milotile.refine.shape` to the labels (radial profiles at
        ``bbox / 2``; classes with at least 4 labels) and keep it in the picker's contract, so that
        ``pick`` lowers the scores of peaks unlike the labels.

    Returns
    -------
    Picker
        The best checkpoint (by validation F1; the last one without validation).
    """
    if int(self_training) > 0:
        options = {k: v for k, v in locals().items() if k not in ("col", "labels", "out", "self_training")}
        return _self_train(as_collection(col), labels, out, int(self_training), options)
    col = as_collection(col)
    arch = ARCH_ALIASES.get(arch, arch)
    df, vdf, regions, class_names = _labels(col, labels, val_labels, classes, bbox, val_fraction)
    epochs = default_epochs(len(df), repeats) if epochs is None else epochs
    z_dil, depth = default_z_context(bbox, compress)
    default_crop: tuple[int, ...] = (depth, 64, 64)
    if resume and out is not None and (Path(out) / "last.pt").is_file():  # the run's own defaults, not today's
        z_dil, default_crop = _resumed_z_context(Path(out) / "last.pt", z_dil, default_crop)
    crop = default_crop if crop is None else tuple(int(c) for c in crop)
    _check_options(arch, epochs, batch_size, tau, crop, bbox, pu_risk)
    user_df = df
    if extra_positives is not None and len(extra_positives):
        extra, _ = class_index(load_label_table(extra_positives, col, "extra positives"),
                               class_names if classes not in (None, False) else None)
        df = pd.concat([df, extra], ignore_index=True)
    val_radius = float(val_radius) if val_radius is not None else float(bbox) / 4.0
    run_dir = _run_dir(col, out, resume)
    dev = pick_device(device)
    seed_everything(seed)
    names = sorted(set(df["tomogram"]) | set(vdf["tomogram"]))
    readers = {n: VolumeReader(col[n].data(level=0), n, max_chunks=cache_chunks) for n in names}
    stats = _stats(col, names, gauss, compress, compress_how)
    geom = target_geometry(bbox, 2, compress)
    prior_info: dict = {}
    if tau == "auto":
        tau, prior_info = estimate_prior(col, df, float(bbox), geom, float(thresh))
    tau = float(tau)
    ds = CropDataset(readers, stats, df, geom, crop, n_classes=len(class_names), thresh=thresh, gauss=gauss,
                     clip=tuple(clip), compress=compress, compress_how=compress_how, random_fraction=random_fraction,
                     seed=seed, repeats=repeats)
    defaults = {**(DEFAULT_UNET if arch.startswith("unet") else {}), "z_dilation": z_dil}
    cfg = {"n_classes": len(class_names), **defaults, **(arch_config or {})}
    model = registry.create(arch, **cfg).to(dev)
    contract = picker_contract(arch=arch, model=model, classes=class_names, bbox=bbox, crop=crop, gauss=gauss,
                               compress=compress, compress_how=compress_how, clip=clip, thresh=thresh, tau=tau, geom=geom,
                               voxel_size=float(col[names[0]].voxel_size), train_stats=stats, val_radius=val_radius)
    contract.update(tta=int(tta), prior=prior_info, train_labels=label_records(user_df, class_names),
                    n_extra_positives=len(df) - len(user_df))
    if shape_check:
        contract["shape"] = fit_shape_models(readers, {n: volume_stats(col, n)[1] for n in set(user_df["tomogram"])},
                                             user_df, class_names, float(bbox) / 2.0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    runlog = RunLog(run_dir)
    options = {k: v for k, v in locals().items() if k in _OPTION_KEYS}
    options.update(classes=class_names, n_train_labels=len(df), n_val_labels=len(vdf), val_regions=regions,
                   store=str(col.url), device=str(dev), started=_dt.datetime.now().isoformat(timespec="seconds"))
    start_epoch, best_f1 = _resume(run_dir, model, opt, contract, runlog, dev, cfg) if resume else (0, -1.0)
    runlog.save_options(options)
    step = _Step(model, opt, dev, amp, contrastive, tau=tau, pu_risk=pu_risk, temp=temp, cr_weight=cr_weight, unsup_weight=unsup_weight,
                 consistency_weight=consistency_weight, max_pos=max_pos, n_unlabeled=n_unlabeled, seed=seed)
    loader = DataLoader(ds, batch_size=int(batch_size), shuffle=True, drop_last=len(ds) > int(batch_size),
                        num_workers=int(num_workers), generator=step.gen, persistent_workers=False)
    picker = Picker(model, contract, device=dev)
    picker.contract = contract  # shared: validation updates the suggested threshold
    for epoch in range(start_epoch + 1, int(epochs) + 1):
        ds.set_epoch(epoch)
        rec = step.epoch(loader, epoch)
        improved = not regions
        if regions and (epoch % max(int(val_every), 1) == 0 or epoch == int(epochs)):
            t_val = time.perf_counter()
            model.eval()
            res = validate(picker, col, stats, regions, vdf, val_radius,
                           debug_dir=run_dir / "debug" if debug_slices else None, debug_slices=debug_slices, epoch=epoch)
            rec.update(res, val_seconds=time.perf_counter() - t_val)
            if res["val_f1"] > best_f1:
                best_f1, improved = res["val_f1"], True
                contract["suggested_threshold"] = res["val_threshold"]
        _checkpoint(run_dir, arch, cfg, model, contract, opt, epoch, {"best_f1": best_f1, "record": rec}, improved)
        runlog.log_epoch(rec)
        _log_epoch(rec, epochs)
    _plots(runlog, run_dir, bool(regions))
    best = run_dir / "best.pt"
    return Picker.load(best if best.exists() else run_dir / "last.pt", device=dev)


def default_z_context(bbox: float, compress: bool = False) -> tuple[int, int]:
    """Head z dilation and crop depth of the default recipe for particles of box ``bbox``.

    The 3D head sees ``4 · z_dilation + 3`` slices, so ``z_dilation = clip(round(bbox / 6), 2, 4)``
    lets it cover most of the particle's depth (the missing wedge stretches it further): 2 (11 slices)
    for a 10-voxel box, 4 (19 slices) for a 24-voxel box; the crop depth ``4 · z_dilation + 4`` keeps a
    few slices of it valid. On the hard benchmark (radius-12 species, 18 labels, three seeds, with the
    shape check) z dilation 4 with 20-slice crops gave F1 0.905 / 0.877 / 0.789 against 0.870 / 0.859 /
    0.776 with 2 and 12 slices, at 2.3× the training time. With ``compress`` the box counts in
    compressed slices (half).
    """
    b = float(bbox) / (2.0 if compress else 1.0)
    if not b > 0:
        raise InputError(f"bbox must be positive, got {bbox!r}.")
    zd = int(np.clip(round(b / 6.0), 2, 4))
    return zd, 4 * zd + 4


def default_epochs(n_labels: int, repeats: int) -> int:
    """Epochs of the default recipe: about :data:`LABELLED_CROP_BUDGET` labelled crops, 6–20 epochs."""
    return int(np.clip(round(LABELLED_CROP_BUDGET / max(int(n_labels) * max(int(repeats), 1), 1)), 6, 20))


def _self_train(col: Any, labels: Any, out: str | os.PathLike[str] | None, rounds: int, options: dict) -> Picker:
    """Rounds of :func:`train` with the previous round's confident picks as extra positives."""
    from milotile.refine.predict import pick
    from milotile.refine.self_training import converged, pseudo_labels

    if options.get("resume"):
        raise InputError("resume is not supported with self_training; rerun into a new --out folder.")
    if options.get("extra_positives") is not None:
        raise InputError("self_training chooses the extra positives itself; pass extra_positives or self_training, not both.")
    base = _run_dir(col, out, False)
    table = load_label_table(labels, col, "labels")  # read once; every round trains on the same table
    user, _ = class_index(table, options.get("classes"))
    names = sorted(set(user["tomogram"]))
    previous: pd.DataFrame | None = None
    extra = None
    for r in range(rounds + 1):
        picker = train(col, table, out=base / f"round-{r}", **{**options, "extra_positives": extra})
        if r == rounds:
            break
        picks = pick(col, picker, threshold=AUTO_FLOOR, names=names, write_heatmaps=False, table=None)
        mine = user.assign(**{"class": [picker.classes[int(c)] for c in user["cls"]]})
        extra = pseudo_labels(picks, mine, float(options["bbox"]))
        if converged(previous, extra, float(options["bbox"]) / 4.0):
            logger.info("self-training converged after round %d", r)
            break
        previous = extra
    final = Path(picker.path).parent
    base.mkdir(parents=True, exist_ok=True)
    for f in ("best.pt", "last.pt"):
        if (final / f).exists():
            shutil.copy2(final / f, base / f)
    logger.info("self-training: final picker from %s", final)
    return Picker.load(base / ("best.pt" if (base / "best.pt").exists() else "last.pt"), device=options.get("device"))


def _stats(col: Any, names: Sequence[str], gauss: float, compress: bool, compress_how: str) -> dict:
    """Statistics of every filtered tomogram (the picker contract's normalisation)."""
    t0 = time.perf_counter()
    stats = {n: volume_stats(col, n, gauss=gauss, compress=compress, compress_how=compress_how) for n in names}
    logger.info("statistics of %d filtered tomogram(s) in %.1f s", len(names), time.perf_counter() - t0)
    return stats


def _log_epoch(rec: dict, epochs: int) -> None:
    val = f" val P {rec['val_precision']:.3f} R {rec['val_recall']:.3f} F1 {rec['val_f1']:.3f}" if "val_f1" in rec else ""
    logger.info("epoch %d/%d loss %.4f (hm %.4f cr %.4f cons %.4f) %.1f s%s", rec["epoch"], epochs, rec["loss"],
                rec["hm_loss"], rec["cr_loss"], rec["consis_loss"], rec["seconds"], val)


def _check_options(arch: str, epochs: int, batch_size: int, tau: float | str, crop: Sequence[int], bbox: float,
                   pu_risk: str = "clip") -> None:
    registry.get_builder(arch)  # unknown names -> InputError before any work
    if pu_risk not in PU_RISKS:
        raise InputError(f"pu_risk must be one of {', '.join(PU_RISKS)}, got {pu_risk!r}.")
    if int(epochs) < 1:
        raise InputError(f"epochs must be at least 1, got {epochs!r}.")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size!r}.")
    if tau != "auto" and not (isinstance(tau, (int, float)) and 0.0 < float(tau) < 1.0):
        raise InputError(f"tau (class prior) must lie in (0, 1), got {tau!r}.")
    if len(crop) != 3 or min(int(c) for c in crop) < 1 or min(int(c) for c in crop[1:]) < 16:
        raise InputError(f"crop must be (z, y, x) with y and x at least 16, got {tuple(crop)!r}.")
    if float(bbox) <= 0:
        raise InputError(f"bbox must be positive, got {bbox!r}.")


def _labels(col: Any, labels: Any, val_labels: Any, classes: Any, bbox: float,
            val_fraction: float | None) -> tuple[pd.DataFrame, pd.DataFrame, list[dict], list[str]]:
    """Training labels, validation labels and regions, class names."""
    df, class_names = class_index(load_label_table(labels, col, "labels"), classes)
    if len(df) == 0:
        raise InputError("No labelled particles remain for the requested classes; there are zero positives to train from.")
    shapes = {n: tuple(col[n].shape) for n in col.names}
    if val_labels is not None:
        vdf, _ = class_index(load_label_table(val_labels, col, "validation labels"),
                             class_names if classes not in (None, False) else None)
        return df, vdf, regions_from_labels(vdf, shapes, float(bbox)), class_names
    frac = 0.0 if val_fraction is None else float(val_fraction)
    if frac > 0:
        df, vdf, regions = split_validation(df, frac, shapes, float(bbox))
        return df, vdf, regions, class_names
    return df, df.iloc[:0], [], class_names


def _run_dir(col: Any, out: str | os.PathLike[str] | None, resume: bool) -> Path:
    if out is None:
        if getattr(col.fs, "protocol", "file") not in ("file", "local", ("file", "local")):
            raise InputError(f"the store {col.url} is not a local folder; pass a local run folder with --out.")
        out = Path(col.runs_dir(f"refine-{_dt.datetime.now():%Y%m%d-%H%M%S}"))  # opaque runs/ node
    run_dir = Path(out)
    last = run_dir / "last.pt"
    if last.exists() and not resume:
        raise InputError(f"Run folder {str(run_dir)!r} already holds a checkpoint; pass resume=True (--resume) or choose another --out.")
    if resume and not last.exists():
        raise InputError(f"Cannot resume: {str(last)!r} does not exist.")
    return run_dir


def _resumed_z_context(last: Path, z_dil: int, crop: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Z dilation and crop of the run being resumed (the defaults may have changed since it started)."""
    ck = load_checkpoint(last, map_location="cpu")
    old_crop = (ck.get("contract") or {}).get("crop")
    return (int((ck.get("config") or {}).get("z_dilation", z_dil)),
            tuple(int(c) for c in old_crop) if old_crop else crop)


def _resume(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, contract: dict, runlog: RunLog,
            dev: torch.device, cfg: dict | None = None) -> tuple[int, float]:
    last = run_dir / "last.pt"
    ck = load_checkpoint(last, map_location=dev)
    old = ck.get("contract", {})
    for key in ("arch", "bbox", "classes", "compress", "gauss", "crop", "preprocessing"):
        if old.get(key) != contract.get(key):
            raise InputError(f"Cannot resume {str(last)!r}: its {key} is {old.get(key)!r}, now {contract.get(key)!r}.")
    old_cfg = ck.get("config") or {}
    for key, value in (cfg or {}).items():  # e.g. z dilation: same weight shapes, a different network
        if key in old_cfg and old_cfg[key] != value:
            raise InputError(f"Cannot resume {str(last)!r}: its network has {key}={old_cfg[key]!r}, now {value!r}.")
    model.load_state_dict(ck["state_dict"])
    if "optimizer" in ck:
        opt.load_state_dict(ck["optimizer"])
    start_epoch = int(ck.get("epoch") or 0)
    contract["suggested_threshold"] = old.get("suggested_threshold")
    runlog.truncate(start_epoch)
    logger.info("resuming %s from epoch %d", run_dir, start_epoch)
    return start_epoch, float((ck.get("extra") or {}).get("best_f1", -1.0))


def _checkpoint(run_dir: Path, arch: str, cfg: dict, model: torch.nn.Module, contract: dict, opt: Any, epoch: int,
                extra: dict, improved: bool) -> None:
    save_checkpoint(run_dir / "last.pt", arch=arch, config=cfg, model=model, contract=contract, optimizer=opt,
                    epoch=epoch, extra=extra)
    if improved:
        save_checkpoint(run_dir / "best.pt", arch=arch, config=cfg, model=model, contract=contract, epoch=epoch, extra=extra)


def _plots(runlog: RunLog, run_dir: Path, validated: bool) -> None:
    try:
        runlog.plot(["loss", "hm_loss", "cr_loss", "consis_loss"], run_dir / "losses.png")
        if validated:
            runlog.plot(["val_precision", "val_recall", "val_f1", "val_ap"], run_dir / "validation.png")
    except Exception as exc:  # plotting must never lose a finished run
        logger.warning("could not draw the training plots: %s", exc)


class _Step:
    """One optimisation step of the PU picker (two flipped views, PU focal + contrastive + consistency)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, dev: torch.device, amp: bool,
                 contrastive: bool, *, seed: int, **weights: float) -> None:
        self.model, self.opt, self.dev, self.contrastive, self.w = model, opt, dev, contrastive, weights
        self.use_amp = bool(amp) and amp_dtype(dev) is not None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and amp_dtype(dev) == torch.float16)
        self.seed = int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.flip_rng = np.random.default_rng(self.seed + 1)

    def epoch(self, loader: DataLoader, epoch: int) -> dict[str, Any]:
        """Train one epoch; returns the epoch record (mean losses, batches, lr, seconds)."""
        self.gen.manual_seed(self.seed * 1000 + epoch)
        self.model.train()
        t0 = time.perf_counter()
        sums = dict.fromkeys(_LOSS_KEYS, 0.0)
        nb = 0
        try:
            for batch in loader:
                for k, v in self.batch(batch, epoch).items():
                    sums[k] += v
                nb += 1
        except InputError as exc:
            raise InputError(f"Epoch {epoch}: {exc}") from exc
        return {"epoch": epoch, **{k: v / max(nb, 1) for k, v in sums.items()}, "n_batches": nb,
                "lr": self.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}

    def _losses(self, x: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, tau = self.w, self.w["tau"]
        if not self.contrastive:
            with autocast(self.dev, enabled=self.use_amp):
                hm = self.model(x)["hm"].float()
            loss, parts = pu_focal_loss(hm, tgt, tau, risk=w["pu_risk"])
            return loss, loss, torch.zeros(()), torch.zeros(()), parts
        axis = -1 if self.flip_rng.random() < 0.5 else -2
        with autocast(self.dev, enabled=self.use_amp):
            outp = self.model(torch.cat([x, torch.flip(x, dims=(axis,))], dim=0))
        b = x.shape[0]
        hm1, hm2 = outp["hm"][:b].float(), torch.flip(outp["hm"][b:], dims=(axis,)).float()
        f1, f2 = outp["feat"][:b], torch.flip(outp["feat"][b:], dims=(axis,))
        l1, parts = pu_focal_loss(hm1, tgt, tau, risk=w["pu_risk"])
        l2, _ = pu_focal_loss(hm2, tgt, tau, risk=w["pu_risk"])
        hm_loss = 0.5 * (l1 + l2)
        p1, p2 = torch.sigmoid(hm1), torch.sigmoid(hm2)
        cr = debiased_contrastive_loss(f1, f2, tgt, p1.detach(), p2.detach(), tau=tau, temp=w["temp"],
                                       unsup_weight=w["unsup_weight"], max_pos=int(w["max_pos"]),
                                       n_unlabeled=int(w["n_unlabeled"]), generator=self.gen)
        cons = consistency_loss(p1, p2)
        loss = hm_loss + w["cr_weight"] * cr + w["consistency_weight"] * cons
        return loss, hm_loss, cr, cons, parts

    def batch(self, batch: dict, epoch: int) -> dict[str, float]:
        """One optimiser step on ``batch``; returns its losses."""
        x = batch["input"].to(self.dev, non_blocking=True)
        tgt = batch["target"].to(self.dev, non_blocking=True)
        loss, hm_loss, cr, cons, parts = self._losses(x, tgt)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"The training loss became {float(loss.detach())} in epoch {epoch} on a batch from tomogram(s) "
                f"{', '.join(sorted(set(batch['tomogram'])))} (hm {float(hm_loss.detach()):.4g}, contrastive "
                f"{float(cr.detach()):.4g}, consistency {float(cons.detach()):.4g}); "
                "check the tomogram for extreme values or lower the learning rate."
            )
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return {"loss": float(loss.detach()), "hm_loss": float(hm_loss.detach()), "cr_loss": float(cr.detach()),
                "consis_loss": float(cons.detach()), "r_pos": parts["r_pos"], "r_neg": parts["r_neg"]}


_OPTION_KEYS = {
    "bbox", "epochs", "arch", "arch_config", "batch_size", "crop", "lr", "tau", "pu_risk", "temp", "cr_weight", "unsup_weight",
    "consistency_weight", "contrastive", "shape_check", "thresh", "gauss", "compress", "compress_how", "clip", "seed", "val_fraction",
    "val_radius", "val_every", "debug_slices", "num_workers", "random_fraction", "repeats", "max_pos", "n_unlabeled",
    "amp", "resume",
}
