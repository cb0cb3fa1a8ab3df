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
from milotile.refine.calibration import calibration_epoch, holdout_mask, measure_calibration
from milotile.refine.contract import picker_contract
from milotile.refine.data import CropDataset, VolumeReader
from milotile.refine.labels import (
    class_index,
    is_atlas_selection,
    load_label_table,
    recentre_labels,
    selection_recentred,
)
from milotile.refine.losses import (
    consistency_loss,
    debiased_contrastive_loss,
    pu_focal_loss,
)
from milotile.refine.picker import Picker
from milotile.refine.prior import estimate_prior
from milotile.refine.recipe import (
    ARCH_ALIASES,
    DEFAULT_UNET,
    LABELLED_CROP_BUDGET,
    PickerRecipe,
    default_epochs,
    default_z_context,
)
from milotile.refine.shape import fit_shape_references
from milotile.refine.targets import target_geometry
from milotile.refine.threshold import AUTO_FLOOR, label_records
from milotile.refine.validation import regions_from_labels, split_validation, validate
from milotile.runtime import adapt_threads
from milotile.stages.preprocess import volume_stats
from milotile.store import as_collection

logger = logging.getLogger(__name__)

__all__ = ["ARCH_ALIASES", "DEFAULT_UNET", "LABELLED_CROP_BUDGET", "PickerRecipe", "default_epochs",
           "default_z_context", "train"]

_LOSS_KEYS = ("loss", "hm_loss", "cr_loss", "consis_loss", "neg_loss", "r_pos", "r_neg")
#: Default epochs of a fine-tuning run (``init_from``) as a fraction of a fresh run's default.
FINETUNE_EPOCH_FRACTION = 1.0 / 3.0


def train(
    col: Any,
    labels: pd.DataFrame | str | os.PathLike[str],
    recipe: PickerRecipe | None = None,
    *,
    val_labels: pd.DataFrame | str | os.PathLike[str] | None = None,
    negatives: pd.DataFrame | str | os.PathLike[str] | None = None,
    extra_positives: pd.DataFrame | str | os.PathLike[str] | None = None,
    init_from: str | os.PathLike[str] | Picker | None = None,
    classes: Sequence[str] | bool | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    cache_chunks: int = 8,
    debug_slices: Sequence[int] | None = None,
    **overrides: Any,
) -> Picker:
    """Train a PU picker from sparse labels.

    Parameters
    ----------
    col
        Collection (or its path).
    labels
        Training labels: DataFrame ``tomogram, x, y, z[, class]`` (level-0 voxels) or any file
        :func:`milotile.formats.read_labels` understands. Atlas selections (``explore select``: a table with the
        candidates' ``id`` and ``cluster``, or its parquet) are first moved onto their particles' density centres
        and merged, one per particle (the recipe's ``recentre``; :func:`milotile.refine.labels.recentre_labels`).
    recipe
        The hyper-parameters (:class:`milotile.refine.recipe.PickerRecipe`; default: its defaults, the
        recipe chosen on ``benchmarks/refine_hard.py``). Keyword ``overrides`` (any recipe field, e.g.
        ``bbox=12, epochs=5``) are applied on top; an unknown keyword raises :class:`InputError`.
    val_labels
        Held-out labels; their bounding regions (padded by ``bbox``) are predicted each epoch.
        Without them, ``val_fraction`` of the most-labelled tomogram's labels are held out as a region
        (default 0: a region of sparsely labelled particles counts its unlabelled particles as false
        positives; ``pick`` then chooses the threshold by :mod:`milotile.refine.threshold`).
    negatives
        Coordinates that are *not* the target (another species, junk, gold; any label format): the
        output voxels within the target radius of each are labelled negatives, trained with weight
        ``negative_weight`` next to the PU risk, and crops are drawn around them like around the
        labels. Recorded in the contract (``train_negatives``).
    extra_positives
        More positives (``tomogram, x, y, z[, class]``) trained on like labels but not kept as the
        picker's ``train_labels`` (which choose the automatic threshold): pseudo-labels, or
        candidates chosen in the exploration map.
    init_from
        Fine-tune: start from the weights of this checkpoint (or :class:`Picker`) with a fresh
        optimiser. The checkpoint's recipe is the base (its geometry, network and preprocessing cannot
        change); ``epochs`` defaults to a third of a fresh run's (:data:`FINETUNE_EPOCH_FRACTION`).
    classes
        None: one channel for all labels; True: one channel per ``class`` value; or a list of names.
    out
        Run folder (default ``<store>/runs/refine-<timestamp>`` for a local store; required for a
        remote one).
    resume
        Continue from ``<out>/last.pt`` (weights, optimiser, epoch, best score).
    device
        ``None``/``"auto"``, ``"cpu"``, ``"cuda"``...
    num_workers, cache_chunks
        DataLoader worker processes (0 = read crops in the main process); decompressed storage chunks
        cached per tomogram reader.
    debug_slices
        Level-0 z slices of validation regions to draw as PNGs under ``<out>/debug``.

    Returns
    -------
    Picker
        The best checkpoint (by validation F1; the last one without validation).
    """
    col = as_collection(col)
    init = _init_checkpoint(init_from)
    recipe = _recipe(recipe, overrides, init)
    if int(recipe.self_training) > 0:
        run = {"val_labels": val_labels, "negatives": negatives, "init_from": init_from, "classes": classes,
               "device": device, "num_workers": num_workers, "cache_chunks": cache_chunks,
               "debug_slices": debug_slices}
        if resume:
            raise InputError("resume is not supported with self_training; rerun into a new --out folder.")
        return _self_train(col, labels, out, recipe, run, extra_positives)
    df, vdf, regions, class_names = _labels(col, labels, val_labels, classes, recipe.bbox, recipe.val_fraction)
    recentred = None
    # only an atlas selection records `mined` (the radius `mine` recentred its candidates with)
    mined = selection_recentred(labels) if recipe.recentre == "auto" else None
    if recipe.recentre == "on" or (recipe.recentre == "auto" and mined is None and is_atlas_selection(labels)):
        df, recentred = recentre_labels(col, df, float(recipe.bbox) / 2.0)
        recentred["why"] = recipe.recentre if recipe.recentre == "on" else "auto: an atlas selection"
    elif mined is not None:  # recentre once: a second, smaller window moved centred labels onto lobes
        recentred = {"why": f"auto: an atlas selection of candidates recentred when mined (radius {mined})",
                     "skipped": True, "n_before": int(len(df)), "n_after": int(len(df))}
    neg = _negatives(col, negatives)
    recipe = _epochs(recipe, len(df) + len(neg), init is not None)
    if resume and out is not None and (Path(out) / "last.pt").is_file():  # the run's own defaults, not today's
        recipe = _resumed_recipe(Path(out) / "last.pt", recipe)
    recipe = recipe.resolved(len(df))
    user_df = df
    if extra_positives is not None and len(extra_positives):
        extra, _ = class_index(load_label_table(extra_positives, col, "extra positives"),
                               class_names if classes not in (None, False) else None)
        df = pd.concat([df, extra], ignore_index=True)
    run_dir = _run_dir(col, out, resume)
    dev = pick_device(device)
    seed_everything(recipe.seed)
    names = sorted(set(df["tomogram"]) | set(vdf["tomogram"]) | set(neg["tomogram"]))
    readers = {n: VolumeReader(col[n].data(level=0), n, max_chunks=cache_chunks) for n in names}
    stats = _stats(col, names, recipe.gauss, recipe.compress, recipe.compress_how)
    geom = target_geometry(recipe.bbox, 2, recipe.compress)
    prior_info: dict = {}
    if recipe.tau == "auto":
        tau, prior_info = estimate_prior(col, df, recipe.bbox, geom, float(recipe.thresh))
        recipe = recipe.replace(tau=float(tau))
    def dataset(rows: pd.DataFrame) -> CropDataset:
        return CropDataset(readers, stats, rows, geom, recipe.crop, n_classes=len(class_names), thresh=recipe.thresh,
                           gauss=recipe.gauss, clip=recipe.clip, compress=recipe.compress,
                           compress_how=recipe.compress_how, random_fraction=recipe.random_fraction, seed=recipe.seed,
                           repeats=recipe.repeats, negatives=neg, negative_crops=recipe.negative_crops,
                           random_tomograms=sorted(set(df["tomogram"]) | set(neg["tomogram"])))

    ds = dataset(df)
    cfg = recipe.network_config(len(class_names))
    model = registry.create(recipe.arch, **cfg).to(dev)
    if init is not None:
        _load_init(model, init, cfg, class_names)
    contract = _contract(col, recipe, model, class_names, geom, stats, names, user_df, neg, readers, prior_info, init)
    contract["n_extra_positives"] = len(df) - len(user_df)
    if recentred is not None:
        contract["recentred"] = recentred
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    runlog = RunLog(run_dir)
    options = {**recipe.to_dict(), "classes": class_names, "n_train_labels": len(df), "n_negatives": len(neg),
               "n_val_labels": len(vdf), "recentred": recentred, "val_regions": regions, "store": str(col.url), "device": str(dev),
               "init_from": contract.get("init_from"), "resume": bool(resume), "num_workers": int(num_workers),
               "debug_slices": list(debug_slices) if debug_slices else None,
               "started": _dt.datetime.now().isoformat(timespec="seconds")}
    start_epoch, best_f1 = _resume(run_dir, model, opt, contract, runlog, dev, cfg) if resume else (0, -1.0)
    runlog.save_options(options)
    step = _Step(model, opt, dev, recipe)
    def loader_of(d: CropDataset) -> DataLoader:
        return DataLoader(d, batch_size=int(recipe.batch_size), shuffle=True, drop_last=len(d) > int(recipe.batch_size),
                          num_workers=int(num_workers), generator=step.gen, persistent_workers=False)

    loader = loader_of(ds)
    picker = Picker(model, contract, device=dev)
    picker.contract = contract  # shared: validation updates the suggested threshold
    val_radius = float(contract["match_radius"])
    epochs = int(recipe.epochs)
    # threshold calibration: the first cal_epoch epochs leave the `held` labels out of the loss (user labels only)
    held, cal_epoch = _calibration_plan(user_df, len(df), recipe, epochs)
    first = None
    if cal_epoch > start_epoch:
        ds_held = dataset(df[~held].reset_index(drop=True))
        first = (ds_held, loader_of(ds_held))
    t_loop = time.perf_counter()
    for epoch in range(start_epoch + 1, epochs + 1):
        d_ep, l_ep = first if first is not None and epoch <= cal_epoch else (ds, loader)
        d_ep.set_epoch(epoch)
        rec = step.epoch(l_ep, epoch)
        if epoch == cal_epoch:
            contract["calibration"] = measure_calibration(col, model, contract, user_df, held[:len(user_df)], readers,
                                                          dev, epoch)
            rec["calibration_seconds"] = contract["calibration"]["seconds"]
        improved = not regions
        if regions and (epoch % max(int(recipe.val_every), 1) == 0 or epoch == epochs):
            t_val = time.perf_counter()
            model.eval()
            res = validate(picker, col, stats, regions, vdf, val_radius,
                           debug_dir=run_dir / "debug" if debug_slices else None, debug_slices=debug_slices, epoch=epoch)
            rec.update(res, val_seconds=time.perf_counter() - t_val)
            if res["val_f1"] > best_f1:
                best_f1, improved = res["val_f1"], True
                contract["suggested_threshold"] = res["val_threshold"]
        _checkpoint(run_dir, recipe.arch, cfg, model, contract, opt, epoch, {"best_f1": best_f1, "record": rec}, improved)
        runlog.log_epoch(rec)
        _log_epoch(rec, epochs, _eta(t_loop, epoch - start_epoch, epochs - epoch))
    _plots(runlog, run_dir, bool(regions))
    best = run_dir / "best.pt"
    return Picker.load(best if best.exists() else run_dir / "last.pt", device=dev)


def _calibration_plan(user_df: pd.DataFrame, n_train: int, recipe: PickerRecipe, epochs: int) -> tuple[np.ndarray, int]:
    """The labels (mask over the ``n_train`` training rows, the user's labels first) left out of the loss until
    the threshold calibration, and the epoch after which it is measured (0: no calibration)."""
    held = np.r_[holdout_mask(user_df, float(recipe.calibration_holdout), recipe.seed),
                 np.zeros(n_train - len(user_df), bool)]
    cal_epoch = calibration_epoch(epochs, float(recipe.calibration_epochs)) if held.any() else 0
    if cal_epoch:
        logger.info("threshold calibration: %d of %d labels left out of the loss for %d of %d epochs", int(held.sum()),
                    len(user_df), cal_epoch, epochs)
    return held, cal_epoch


def _recipe(recipe: PickerRecipe | None, overrides: dict, init: dict | None) -> PickerRecipe:
    """The run's recipe: the given one (or the defaults; with ``init_from`` the checkpoint's) plus overrides."""
    if recipe is not None and not isinstance(recipe, PickerRecipe):
        raise InputError(f"recipe must be a PickerRecipe, got {type(recipe).__name__}.")
    if init is None:
        return (recipe or PickerRecipe()).replace(**overrides)
    base = _checkpoint_recipe(init).replace(epochs=None)
    given = {**(recipe.changed() if recipe is not None else {}), **overrides}
    wanted = PickerRecipe().replace(**given)  # validated and normalised like the base
    for key in given:
        value = getattr(wanted, key)
        if key in _FIXED_BY_CHECKPOINT and value is not None and value != getattr(base, key):
            raise InputError(f"Cannot fine-tune {init['path']!r} with {key}={value!r}: the checkpoint was trained "
                             f"with {key}={getattr(base, key)!r}; train a new picker instead.")
    return base.replace(**{k: getattr(wanted, k) for k in given if k not in _FIXED_BY_CHECKPOINT})


#: Recipe fields a fine-tuning run takes from its checkpoint (network, geometry, preprocessing).
_FIXED_BY_CHECKPOINT = ("bbox", "arch", "start_filts", "z_dilation", "arch_config", "crop", "gauss", "compress",
                        "compress_how", "clip")


def _epochs(recipe: PickerRecipe, n_crop_labels: int, finetune: bool) -> PickerRecipe:
    """Fill in the default epochs: the labelled-crop budget over labels and negatives (a third when fine-tuning)."""
    if recipe.epochs is not None:
        return recipe
    n = default_epochs(n_crop_labels, recipe.repeats)
    return recipe.replace(epochs=max(3, int(np.ceil(n * FINETUNE_EPOCH_FRACTION))) if finetune else n)


def _checkpoint_recipe(ck: dict) -> PickerRecipe:
    """The recipe a checkpoint was trained with (rebuilt from the contract for checkpoints before recipes)."""
    contract = ck.get("contract") or {}
    if contract.get("recipe"):
        return PickerRecipe.from_dict(contract["recipe"])
    cfg = ck.get("config") or {}
    return PickerRecipe(bbox=float(contract["bbox"]), arch=str(ck.get("arch", "unet4")), crop=tuple(contract["crop"]),
                        gauss=float(contract.get("gauss", 0.0)), compress=bool(contract.get("compress", False)),
                        clip=tuple(contract.get("clip", (-3.0, 3.0))), thresh=float(contract.get("thresh", 0.8)),
                        tau=float(contract.get("tau", 0.01)), tta=int(contract.get("tta", 4)),
                        start_filts=cfg.get("start_filts"), z_dilation=cfg.get("z_dilation"))


def _init_checkpoint(init_from: Any) -> dict | None:
    """The checkpoint to fine-tune from, loaded on the CPU (``None`` without ``init_from``)."""
    if init_from is None:
        return None
    if isinstance(init_from, Picker):
        if init_from.path is None:
            raise InputError("init_from needs a picker loaded from a checkpoint (Picker.load) or a checkpoint path.")
        init_from = init_from.path
    p = Path(init_from)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
    if not p.is_file():
        raise InputError(f"init_from: no checkpoint at {str(p)!r}.")
    ck = load_checkpoint(p, map_location="cpu")
    if (ck.get("contract") or {}).get("kind") != "refine-picker":
        raise InputError(f"init_from: {str(p)!r} is not a refine picker checkpoint.")
    return {**ck, "path": str(p)}


def _load_init(model: torch.nn.Module, init: dict, cfg: dict, class_names: list[str]) -> None:
    """Copy the weights of the fine-tuning checkpoint into ``model`` (same network and classes)."""
    old = list((init.get("contract") or {}).get("classes") or [])
    if old and len(old) != len(class_names):
        raise InputError(f"Cannot fine-tune {init['path']!r}: it picks {len(old)} class(es) {old}, the labels give "
                         f"{len(class_names)} {class_names}.")
    old_cfg = init.get("config") or {}
    for key, value in cfg.items():
        if key in old_cfg and old_cfg[key] != value:
            raise InputError(f"Cannot fine-tune {init['path']!r}: its network has {key}={old_cfg[key]!r}, now {value!r}.")
    model.load_state_dict(init["state_dict"])
    logger.info("fine-tuning from %s", init["path"])


def _negatives(col: Any, negatives: Any) -> pd.DataFrame:
    """The labelled negatives as ``tomogram, x, y, z`` (empty without them)."""
    if negatives is None:
        return pd.DataFrame({"tomogram": pd.Series(dtype=str), **{a: pd.Series(dtype=float) for a in "xyz"}})
    neg = load_label_table(negatives, col, "negatives")
    return neg[["tomogram", "x", "y", "z"]].reset_index(drop=True)


def _contract(col: Any, recipe: PickerRecipe, model: torch.nn.Module, class_names: list[str], geom: Any, stats: dict,
              names: list[str], user_df: pd.DataFrame, neg: pd.DataFrame, readers: dict, prior_info: dict,
              init: dict | None) -> dict:
    """The picker contract of this run (geometry, preprocessing, labels, negatives, recipe, shape check)."""
    val_radius = float(recipe.val_radius) if recipe.val_radius is not None else recipe.bbox / 4.0
    contract = picker_contract(arch=recipe.arch, model=model, classes=class_names, bbox=recipe.bbox, crop=recipe.crop,
                               gauss=recipe.gauss, compress=recipe.compress, compress_how=recipe.compress_how,
                               clip=recipe.clip, thresh=recipe.thresh, tau=float(recipe.tau), geom=geom,
                               voxel_size=float(col[names[0]].voxel_size), train_stats=stats, val_radius=val_radius)
    contract.update(tta=int(recipe.tta), cpu_bf16=bool(recipe.cpu_bf16), prior=prior_info, train_labels=label_records(user_df, class_names),
                    recipe=recipe.to_dict(),
                    train_negatives=[[str(t), float(x), float(y), float(z)] for t, x, y, z in
                                     neg[["tomogram", "x", "y", "z"]].itertuples(index=False)],
                    init_from=None if init is None else init["path"])
    if recipe.shape_check:
        contract["shape"] = fit_shape_references(readers, {n: volume_stats(col, n)[1] for n in set(user_df["tomogram"])},
                                                 user_df, class_names, recipe.bbox / 2.0)
    return contract


def _self_train(col: Any, labels: Any, out: str | os.PathLike[str] | None, recipe: PickerRecipe, run: dict,
                extra_positives: Any) -> Picker:
    """Rounds of :func:`train` with the previous round's confident picks as extra positives."""
    from milotile.refine.predict import pick
    from milotile.refine.self_training import converged, pseudo_labels

    if extra_positives is not None:
        raise InputError("self_training chooses the extra positives itself; pass extra_positives or self_training, not both.")
    rounds = int(recipe.self_training)
    base = _run_dir(col, out, False)
    table = load_label_table(labels, col, "labels")  # read once; every round trains on the same table
    user, _ = class_index(table, run.get("classes"))
    names = sorted(set(user["tomogram"]))
    previous: pd.DataFrame | None = None
    extra = None
    one_round = recipe.replace(self_training=0)
    if recipe.recentre == "auto":  # decided on the labels as given (the table read above no longer shows where from)
        fresh = selection_recentred(labels) is None and is_atlas_selection(labels)
        one_round = one_round.replace(recentre="on" if fresh else "off")
    for r in range(rounds + 1):
        picker = train(col, table, one_round, out=base / f"round-{r}", extra_positives=extra, **run)
        if r == rounds:
            break
        picks = pick(col, picker, threshold=AUTO_FLOOR, names=names, write_heatmaps=False, table=None)
        mine = user.assign(**{"class": [picker.classes[int(c)] for c in user["cls"]]})
        extra = pseudo_labels(picks, mine, recipe.bbox)
        if converged(previous, extra, recipe.bbox / 4.0):
            logger.info("self-training converged after round %d", r)
            break
        previous = extra
    final = Path(picker.path).parent
    base.mkdir(parents=True, exist_ok=True)
    for f in ("best.pt", "last.pt"):
        if (final / f).exists():
            shutil.copy2(final / f, base / f)
    logger.info("self-training: final picker from %s", final)
    return Picker.load(base / ("best.pt" if (base / "best.pt").exists() else "last.pt"), device=run.get("device"))


def _stats(col: Any, names: Sequence[str], gauss: float, compress: bool, compress_how: str) -> dict:
    """Statistics of every filtered tomogram (the picker contract's normalisation)."""
    t0 = time.perf_counter()
    stats = {n: volume_stats(col, n, gauss=gauss, compress=compress, compress_how=compress_how) for n in names}
    logger.info("statistics of %d filtered tomogram(s) in %.1f s", len(names), time.perf_counter() - t0)
    return stats


def _eta(t_start: float, done: int, left: int) -> float:
    """Seconds the ``left`` epochs will take at the mean pace of the ``done`` ones since ``t_start``."""
    return (time.perf_counter() - t_start) / max(done, 1) * max(left, 0)


def _log_epoch(rec: dict, epochs: int, eta: float | None = None) -> None:
    val = f" val P {rec['val_precision']:.3f} R {rec['val_recall']:.3f} F1 {rec['val_f1']:.3f}" if "val_f1" in rec else ""
    left = f", ETA {eta:.0f} s" if eta is not None and rec["epoch"] < epochs else ""
    logger.info("epoch %d/%d loss %.4f (hm %.4f cr %.4f cons %.4f) %.1f s%s%s", rec["epoch"], epochs, rec["loss"],
                rec["hm_loss"], rec["cr_loss"], rec["consis_loss"], rec["seconds"], left, val)


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


def _resumed_recipe(last: Path, recipe: PickerRecipe) -> PickerRecipe:
    """The z dilation and crop of the run being resumed (the defaults may have changed since it started)."""
    ck = load_checkpoint(last, map_location="cpu")
    old_crop = (ck.get("contract") or {}).get("crop")
    z_dil = (ck.get("config") or {}).get("z_dilation")
    keep = {}
    if recipe.z_dilation is None and z_dil is not None and "z_dilation" not in (recipe.arch_config or {}):
        keep["z_dilation"] = int(z_dil)
    if recipe.crop is None and old_crop:
        keep["crop"] = tuple(int(c) for c in old_crop)
    return recipe.replace(**keep)


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
    if old.get("calibration"):
        contract["calibration"] = old["calibration"]
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

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, dev: torch.device,
                 recipe: PickerRecipe) -> None:
        self.model, self.opt, self.dev, self.r = model, opt, dev, recipe
        self.contrastive = bool(recipe.contrastive)
        # bf16 autocast on a CPU with AMX / AVX512-BF16 when the recipe asks for it (cpu_bf16)
        self.cpu_amp = bool(recipe.cpu_bf16)
        self.use_amp = bool(recipe.amp) and amp_dtype(dev, cpu=self.cpu_amp) is not None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and amp_dtype(dev, cpu=self.cpu_amp) == torch.float16)
        self.seed = int(recipe.seed)
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
                adapt_threads()
                for k, v in self.batch(batch, epoch).items():
                    sums[k] += v
                nb += 1
        except InputError as exc:
            raise InputError(f"Epoch {epoch}: {exc}") from exc
        return {"epoch": epoch, **{k: v / max(nb, 1) for k, v in sums.items()}, "n_batches": nb,
                "lr": self.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}

    def _losses(self, x: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r, tau = self.r, float(self.r.tau)
        pu = {"risk": r.pu_risk, "negative_weight": float(r.negative_weight)}
        if not self.contrastive:
            with autocast(self.dev, enabled=self.use_amp, cpu=self.cpu_amp):
                hm = self.model(x)["hm"].float()
            loss, parts = pu_focal_loss(hm, tgt, tau, **pu)
            return loss, loss, torch.zeros(()), torch.zeros(()), parts
        axis = -1 if self.flip_rng.random() < 0.5 else -2
        with autocast(self.dev, enabled=self.use_amp, cpu=self.cpu_amp):
            outp = self.model(torch.cat([x, torch.flip(x, dims=(axis,))], dim=0))
        b = x.shape[0]
        hm1, hm2 = outp["hm"][:b].float(), torch.flip(outp["hm"][b:], dims=(axis,)).float()
        f1, f2 = outp["feat"][:b], torch.flip(outp["feat"][b:], dims=(axis,))
        l1, parts = pu_focal_loss(hm1, tgt, tau, **pu)
        l2, _ = pu_focal_loss(hm2, tgt, tau, **pu)
        hm_loss = 0.5 * (l1 + l2)
        p1, p2 = torch.sigmoid(hm1), torch.sigmoid(hm2)
        cr = debiased_contrastive_loss(f1, f2, tgt, p1.detach(), p2.detach(), tau=tau, temp=r.temp,
                                       unsup_weight=r.unsup_weight, max_pos=int(r.max_pos),
                                       n_unlabeled=int(r.n_unlabeled), generator=self.gen)
        cons = consistency_loss(p1, p2)
        loss = hm_loss + r.cr_weight * cr + r.consistency_weight * cons
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
                "consis_loss": float(cons.detach()), "neg_loss": parts["neg_loss"], "r_pos": parts["r_pos"],
                "r_neg": parts["r_neg"]}
