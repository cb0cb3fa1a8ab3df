"""Training of the positive-unlabeled picker from sparse labels (MiLoPYP's refinement module).

``train(col, labels, ...)`` streams crops from the Zarr store (one around every labelled particle,
jittered, plus random crops), builds PU targets per crop, and optimises

``loss = PU-focal(hm) + cr_weight · debiased-InfoNCE(feat, subsample) + consistency_weight · MSE(view1, unflip(view2))``

with batches of several crops. Each epoch is logged (losses, seconds, validation precision / recall /
F1 / AP from Hungarian matching on held-out labelled regions) and checkpointed (``last.pt``, and
``best.pt`` by validation F1), with every preprocessing and geometry parameter in the contract.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from milotile.errors import InputError
from milotile.metrics import average_precision, evaluate, pr_curve
from milotile.nn import registry
from milotile.nn.checkpoint import load_checkpoint, save_checkpoint
from milotile.nn.device import amp_dtype, autocast, pick_device, seed_everything
from milotile.nn.runlog import RunLog
from milotile.refine.data import CropDataset, VolumeReader, model_crop_shape
from milotile.refine.losses import consistency_loss, debiased_contrastive_loss, pu_focal_loss
from milotile.refine.picker import Picker
from milotile.refine.preprocess import gauss_halo, preprocess_block, stored_stats
from milotile.refine.prior import estimate_prior
from milotile.refine.targets import target_geometry
from milotile.refine.threshold import label_records

logger = logging.getLogger(__name__)

__all__ = ["train", "validate", "load_label_table", "predict_region", "decode_peaks", "ARCH_ALIASES"]

ARCH_ALIASES = {"unet_4": "unet4", "unet_5": "unet5", "ressmall_18": "ressmall"}
_VAL_TILE = 256


# --------------------------------------------------------------------------- labels
def load_label_table(labels: pd.DataFrame | str | os.PathLike[str], col: Any, what: str = "labels") -> pd.DataFrame:
    """Read (if a path) and validate a label table against the collection.

    Returns a table ``tomogram, x, y, z, class`` (level-0 voxels). A ``species`` column is used as the
    class when there is no ``class`` column. Raises :class:`InputError` for unknown tomograms, points
    outside the volume, a probable axis-order mix-up or an empty table.
    """
    from milotile import formats

    if isinstance(labels, (str, os.PathLike)):
        df = formats.read_labels(labels, col)
    elif isinstance(labels, pd.DataFrame):
        df = labels.copy()
    else:
        raise InputError(f"{what} must be a DataFrame or a path, got {type(labels).__name__}.")
    if "class" not in df.columns and "species" in df.columns:
        df = df.rename(columns={"species": "class"})
    if len(df) == 0:
        raise InputError(f"The {what} table holds no particles; there are zero positives to train from.")
    df = formats.validate_labels(df, col)
    df["tomogram"] = df["tomogram"].astype(str)
    df["class"] = df["class"].astype(str)
    return df.reset_index(drop=True)


def _class_index(df: pd.DataFrame, classes: Sequence[str] | bool | None) -> tuple[pd.DataFrame, list[str]]:
    if classes is None or classes is False:
        out = df.copy()
        out["cls"] = 0
        names = sorted(set(df["class"]))
        return out, ["+".join(names) if len(names) <= 3 else "particle"]
    if classes is True or classes == "all":
        names = sorted(set(df["class"]))
    else:
        names = [str(c) for c in classes]
        missing = [c for c in names if c not in set(df["class"])]
        if missing:
            raise InputError(f"Class(es) {missing} have no labelled particles (labels have {sorted(set(df['class']))}).")
    out = df[df["class"].isin(names)].copy()
    dropped = len(df) - len(out)
    if dropped:
        logger.warning("ignoring %d labels of classes not in %s", dropped, names)
    out["cls"] = out["class"].map({c: i for i, c in enumerate(names)}).astype(np.int64)
    return out, names


# --------------------------------------------------------------------------- validation
def _regions_from_labels(df: pd.DataFrame, shapes: dict[str, tuple[int, int, int]], pad: float) -> list[dict]:
    regions = []
    for name, g in df.groupby("tomogram", sort=True):
        zyx = g[["z", "y", "x"]].to_numpy(np.float64)
        shp = shapes[str(name)]
        lo = np.maximum(np.floor(zyx.min(0) - pad), 0).astype(int)
        hi = np.minimum(np.ceil(zyx.max(0) + pad) + 1, shp).astype(int)
        regions.append({"tomogram": str(name), "start": tuple(int(v) for v in lo), "stop": tuple(int(v) for v in hi)})
    return regions


def _split_validation(train_df: pd.DataFrame, fraction: float, shapes: dict, pad: float) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Hold out the labelled particles with the largest x of the most-labelled tomogram (a region)."""
    counts = train_df["tomogram"].value_counts()
    name = str(counts.index[0])
    g = train_df[train_df["tomogram"] == name].sort_values("x")
    n_val = max(1, int(round(fraction * len(g))))
    if len(g) - n_val < 1:
        raise InputError(f"Too few labels in tomogram {name!r} ({len(g)}) to hold out a validation region.")
    x_cut = float(g["x"].iloc[len(g) - n_val])
    in_region = (train_df["tomogram"] == name) & (train_df["x"] >= x_cut)
    val = train_df[in_region]
    regions = _regions_from_labels(val, shapes, pad)
    return train_df[~in_region].reset_index(drop=True), val.reset_index(drop=True), regions


def predict_region(picker: Picker, reader: VolumeReader, stats: tuple[float, float], start: Sequence[int],
                   stop: Sequence[int], *, tile: int = _VAL_TILE, max_halo_xy: int | None = 32) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Heatmap of a level-0 region, predicted in xy tiles with a halo.

    Returns the ``(C, Z', Y', X')`` probabilities and the level-0 origin of output voxel 0 (the region
    start, with z rounded down to even when slices are compressed). ``max_halo_xy`` caps the in-plane
    halo for speed during validation (None = the full receptive-field halo).
    """
    c = picker.contract
    zs, ys, xs = (int(v) for v in c["out_stride"])
    hz, hy, hx = picker.halo
    if max_halo_xy is not None:
        al = int(c.get("xy_alignment", 2))
        cap = int(math.ceil(max_halo_xy / al) * al)
        hy, hx = min(hy, cap), min(hx, cap)
    z0 = (start[0] // zs) * zs
    y0, x0 = start[1], start[2]
    nz = stop[0] - z0
    ny, nx = stop[1] - y0, stop[2] - x0
    oz, oy, ox = math.ceil(nz / zs), math.ceil(ny / ys), math.ceil(nx / xs)
    out = np.zeros((picker.n_classes, oz, oy, ox), np.float32)
    tile = max(ys, (tile // ys) * ys)
    for ty in range(0, ny, tile):
        for tx in range(0, nx, tile):
            sy, sx = min(tile, ny - ty), min(tile, nx - tx)
            raw = reader.read((z0 - hz, y0 + ty - hy, x0 + tx - hx), (nz + 2 * hz, sy + 2 * hy, sx + 2 * hx))
            prob = picker.predict_block(raw, stats)
            kz, ky, kx = hz // zs, hy // ys, hx // xs
            py, px = math.ceil(sy / ys), math.ceil(sx / xs)
            out[:, :, ty // ys : ty // ys + py, tx // xs : tx // xs + px] = prob[:, kz : kz + oz, ky : ky + py, kx : kx + px]
    return out, (z0, y0, x0)


def _subvoxel(p: np.ndarray, kk: np.ndarray) -> np.ndarray:
    """Refine integer peak indices to the probability-weighted centroid of their 3×3×3 neighbourhood."""
    offs = np.stack(np.meshgrid(*([np.arange(-1, 2)] * 3), indexing="ij"), -1).reshape(-1, 3)
    idx = kk[:, None, :] + offs[None, :, :]
    valid = np.all((idx >= 0) & (idx < np.asarray(p.shape)), axis=-1)
    idx = np.clip(idx, 0, np.asarray(p.shape) - 1)
    w = p[idx[..., 0], idx[..., 1], idx[..., 2]] * valid
    w = np.clip(w - 0.5 * p[tuple(kk.T)][:, None], 0, None)  # only the upper half of the peak
    tot = w.sum(1, keepdims=True)
    shift = np.where(tot > 0, (w[..., None] * offs[None]).sum(1) / np.maximum(tot, 1e-12), 0.0)
    return kk + shift


def _greedy_nms(pos: np.ndarray, score: np.ndarray, dist: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (best score first, ties by position)."""
    from scipy.spatial import cKDTree

    order = np.lexsort((pos[:, 2], pos[:, 1], pos[:, 0], -score))
    tree = cKDTree(pos)
    removed = np.zeros(len(pos), bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        removed[tree.query_ball_point(pos[i], dist)] = True
    return np.asarray(keep, dtype=np.int64)


def decode_peaks(prob: np.ndarray, picker: Picker, origin: Sequence[int], *, tomogram: str, min_score: float = 0.05) -> pd.DataFrame:
    """Local maxima of a small heatmap (max-filter NMS), in level-0 (x, y, z) with score and class.

    Peak positions are refined to the weighted centroid of the upper half of the peak (sub-voxel).
    """
    c = picker.contract
    zs, ys, _ = (int(v) for v in c["out_stride"])
    r = float(c["bbox"]) / 4.0  # half the particle radius, level-0 voxels
    nxy = 2 * max(1, int(round(r / ys))) + 1
    nz = 2 * max(1, int(round(r / zs))) + 1
    rows = []
    classes = picker.classes
    for ch in range(prob.shape[0]):
        p = prob[ch]
        mf = ndimage.maximum_filter(p, size=(nz, nxy, nxy), mode="constant", cval=0.0)
        kk = np.argwhere((p == mf) & (p >= min_score))
        if len(kk) == 0:
            continue
        pos = picker.out_to_level0(_subvoxel(p, kk), origin)
        score = p[tuple(kk.T)]
        keep = _greedy_nms(pos, score, r)  # plateaus (e.g. saturated 1.0 voxels) give several maxima
        rows.append(pd.DataFrame({"tomogram": tomogram, "x": pos[keep, 2], "y": pos[keep, 1], "z": pos[keep, 0],
                                  "score": score[keep], "class": classes[ch]}))
    if not rows:
        return pd.DataFrame({"tomogram": [], "x": [], "y": [], "z": [], "score": [], "class": []})
    return pd.concat(rows, ignore_index=True)


def _inside(d: pd.DataFrame, lo: np.ndarray, hi: np.ndarray) -> pd.DataFrame:
    zyx = d[["z", "y", "x"]].to_numpy()
    return d[(zyx >= lo).all(1) & (zyx < hi).all(1)]


def validate(picker: Picker, readers: dict[str, VolumeReader], stats: dict[str, tuple[float, float]],
             regions: list[dict], val_df: pd.DataFrame, radius: float, *, debug_dir: Path | None = None,
             debug_slices: Sequence[int] | None = None, epoch: int = 0) -> dict[str, float]:
    """Predict every validation region, decode peaks and match them to the labels inside.

    Returns ``val_precision, val_recall, val_f1`` at the F1-optimal score threshold
    (``val_threshold``), ``val_ap`` (average precision) and ``val_f1_at_0.5``.
    """
    picks, truth = [], []
    multi = picker.n_classes > 1
    for reg in regions:
        name = reg["tomogram"]
        prob, origin = predict_region(picker, readers[name], stats[name], reg["start"], reg["stop"])
        pk = decode_peaks(prob, picker, origin, tomogram=name)
        lo, hi = np.asarray(reg["start"]), np.asarray(reg["stop"])
        pk = _inside(pk, lo, hi)
        tr = _inside(val_df[val_df["tomogram"] == name], lo, hi)
        picks.append(pk)
        truth.append(tr)
        if debug_dir is not None and debug_slices:
            _debug_png(debug_dir, epoch, name, readers[name], stats[name], picker, prob, origin, reg, pk, tr, debug_slices)
    pred = pd.concat(picks, ignore_index=True)
    true = pd.concat(truth, ignore_index=True)
    key = "tomogram"
    if multi:  # matches must not cross classes
        pred = pred.assign(group=pred["tomogram"] + "/" + pred["class"].astype(str))
        true = true.assign(group=true["tomogram"] + "/" + true["class"].astype(str))
        key = "group"
    res = {"val_precision": 0.0, "val_recall": 0.0, "val_f1": 0.0, "val_ap": 0.0, "val_threshold": 0.5,
           "val_f1_at_0.5": 0.0, "val_n_true": int(len(true))}
    if len(pred) == 0 or len(true) == 0:
        return res
    curve = pr_curve(pred, true, radius, by=key)
    best = curve.iloc[int(np.argmax(curve["f1"].to_numpy()))]
    at05 = evaluate(pred, true, radius, by=key, threshold=0.5).iloc[-1]
    res.update(val_precision=float(best["precision"]), val_recall=float(best["recall"]), val_f1=float(best["f1"]),
               val_ap=average_precision(curve), val_threshold=float(best["threshold"]), **{"val_f1_at_0.5": float(at05["f1"])})
    return res


def _debug_png(debug_dir: Path, epoch: int, name: str, reader: VolumeReader, stats: tuple[float, float], picker: Picker,
               prob: np.ndarray, origin: Sequence[int], reg: dict, picks: pd.DataFrame, truth: pd.DataFrame,
               slices: Sequence[int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    debug_dir.mkdir(parents=True, exist_ok=True)
    zs, ys, xs = picker.contract["out_stride"]
    thr = float(picker.contract.get("suggested_threshold", 0.5))
    for z in slices:
        if not reg["start"][0] <= z < reg["stop"][0]:
            continue
        y0, x0 = reg["start"][1], reg["start"][2]
        ny, nx = reg["stop"][1] - y0, reg["stop"][2] - x0
        raw = reader.read((z, y0, x0), (1, ny, nx))[0]
        img = preprocess_block(raw[None], mean=stats[0], std=stats[1], clip=tuple(picker.contract["clip"]))[0]
        k = int((z - origin[0] - picker.contract["out_offset"][0]) // zs)
        k = min(max(k, 0), prob.shape[1] - 1)
        hm = prob[:, k].max(0)
        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        a1, a2 = fig.subplots(1, 2)
        a1.imshow(img, cmap="gray")
        dz = picker.contract["bbox"] / 4
        t = truth[(truth["z"] - z).abs() <= dz]
        p = picks[(picks["score"] >= thr) & ((picks["z"] - z).abs() <= dz)]
        a1.scatter(t["x"] - x0, t["y"] - y0, s=60, facecolors="none", edgecolors="lime", label="labels")
        a1.scatter(p["x"] - x0, p["y"] - y0, s=20, marker="x", c="red", label="picks")
        a1.set_title(f"{name} z={z}")
        a2.imshow(hm, cmap="magma", vmin=0, vmax=max(float(hm.max()), 0.05), extent=(-0.5 * xs, hm.shape[1] * xs - 0.5 * xs, hm.shape[0] * ys - 0.5 * ys, -0.5 * ys))
        a2.set_title(f"heatmap, max {float(hm.max()):.2f} (epoch {epoch})")
        for a in (a1, a2):
            a.set_axis_off()
        fig.tight_layout()
        fig.savefig(debug_dir / f"epoch{epoch:03d}_{name}_z{int(z)}.png", dpi=80)


# --------------------------------------------------------------------------- training
def _contract(*, arch: str, model: torch.nn.Module, classes: list[str], bbox: float, crop: Sequence[int], gauss: float,
              compress: bool, clip: Sequence[float], thresh: float, tau: float, geom: Any, voxel_size: float,
              train_stats: dict, val_radius: float) -> dict:
    rf = model.receptive_field()  # model-input voxels
    gh = gauss_halo(gauss)
    zs = 2 if compress else 1
    rf_raw = (rf[0] * zs + (zs - 1) + 2 * gh, rf[1] + 2 * gh, rf[2] + 2 * gh)
    al = int(getattr(model, "xy_alignment", 2))
    hz = int(math.ceil((rf_raw[0] - 1) / 2))
    if compress:
        hz += hz % 2
    hxy = [int(math.ceil(math.ceil((r - 1) / 2) / al) * al) for r in rf_raw[1:]]
    return {
        "kind": "refine-picker",
        "arch": arch,
        "n_classes": len(classes),
        "classes": list(classes),
        "bbox": float(bbox),
        "crop": list(model_crop_shape(crop)),
        "down_ratio": 2,
        "out_stride": [zs, 2, 2],
        "out_offset": [0.5 if compress else 0.0, 0.0, 0.0],
        "gauss": float(gauss),
        "compress": bool(compress),
        "clip": [float(clip[0]), float(clip[1])],
        "normalization": {"method": "zscore-clip-unit", "stats": "global mean/std of the raw level-0 tomogram, recomputed at predict"},
        "train_stats": {k: [float(v[0]), float(v[1])] for k, v in train_stats.items()},
        "receptive_field_model": [int(v) for v in rf],
        "receptive_field": [int(v) for v in rf_raw],
        "halo": [hz, *hxy],
        "xy_alignment": al,
        "voxel_size": float(voxel_size),
        "target_sigma": float(geom.sigma),
        "target_radius": float(geom.radius),
        "thresh": float(thresh),
        "tau": float(tau),
        "match_radius": float(val_radius),
        "suggested_threshold": 0.5,
    }


def train(
    col: Any,
    labels: pd.DataFrame | str | os.PathLike[str],
    *,
    val_labels: pd.DataFrame | str | os.PathLike[str] | None = None,
    bbox: float = 16,
    epochs: int = 10,
    arch: str = "unet4",
    arch_config: dict[str, Any] | None = None,
    batch_size: int = 4,
    crop: Sequence[int] = (8, 64, 64),
    lr: float = 1e-3,
    tau: float | str = "auto",
    temp: float = 0.07,
    cr_weight: float = 0.1,
    unsup_weight: float = 0.1,
    consistency_weight: float = 1.0,
    contrastive: bool = True,
    thresh: float = 0.8,
    classes: Sequence[str] | bool | None = None,
    gauss: float = 0.0,
    compress: bool = False,
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
    repeats: int = 1,
    max_pos: int = 256,
    n_unlabeled: int = 256,
    amp: bool = True,
    cache_chunks: int = 8,
    tta: int = 4,
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
        unlabelled particles as false positives, so its precision and threshold are wrong; the pick
        threshold is then chosen by :mod:`milotile.refine.threshold`).
    bbox
        Particle box (level-0 voxels); sets the target Gaussian (CenterNet radius, ``down_ratio`` 2).
    epochs
        Number of epochs (each visits every labelled particle once plus random crops).
    arch, arch_config
        ``unet4``, ``unet5`` or ``ressmall`` and extra builder keywords (e.g. ``start_filts``).
    batch_size, crop
        Crops per step and model-input crop ``(z, y, x)`` (z in compressed slices with ``compress``).
    lr
        Adam learning rate.
    tau, temp, cr_weight, unsup_weight, consistency_weight, contrastive
        PU prior (``"auto"``: estimated from the labelled tomograms by
        :func:`milotile.refine.prior.estimate_prior`), InfoNCE temperature and loss weights; ``contrastive=False`` trains the PU focal
        term only (single view).
    thresh
        Target value from which voxels are hard positives.
    classes
        None: one channel for all labels; True: one channel per ``class`` value; or a list of names.
    gauss, compress, clip
        Preprocessing: Gaussian sigma (0 = off), pairwise z max-compression, clip range in std.
    out
        Run folder (default ``<store>/runs/refine-<timestamp>``).
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

    Returns
    -------
    Picker
        The best checkpoint (by validation F1; the last one without validation).
    """
    from milotile.store import Collection, open_collection

    if not isinstance(col, Collection):
        col = open_collection(col)
    arch = ARCH_ALIASES.get(arch, arch)
    registry.get_builder(arch)  # unknown names -> InputError before any work
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

    df = load_label_table(labels, col, "labels")
    df, class_names = _class_index(df, classes)
    if len(df) == 0:
        raise InputError("No labelled particles remain for the requested classes; there are zero positives to train from.")
    shapes = {n: tuple(col[n].shape) for n in col.names}
    val_radius = float(val_radius) if val_radius is not None else float(bbox) / 4.0
    if val_labels is not None:
        vdf = load_label_table(val_labels, col, "validation labels")
        vdf, _ = _class_index(vdf, class_names if classes not in (None, False) else None)
        regions = _regions_from_labels(vdf, shapes, float(bbox))
    else:
        frac = 0.0 if val_fraction is None else float(val_fraction)
        if frac > 0:
            df, vdf, regions = _split_validation(df, frac, shapes, float(bbox))
        else:
            vdf, regions = df.iloc[:0], []

    run_dir = Path(out) if out is not None else Path(str(col.path)) / "runs" / f"refine-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists() and not resume:
        raise InputError(f"Run folder {str(run_dir)!r} already holds a checkpoint; pass resume=True (--resume) or choose another --out.")
    if resume and not last_path.exists():
        raise InputError(f"Cannot resume: {str(last_path)!r} does not exist.")

    dev = pick_device(device)
    seed_everything(seed)
    names = sorted(set(df["tomogram"]) | set(vdf["tomogram"]))
    readers = {n: VolumeReader(col[n].data(level=0), n, max_chunks=cache_chunks) for n in names}
    t0 = time.perf_counter()
    stats = {n: stored_stats(col[n]) for n in names}
    logger.info("global statistics of %d tomogram(s) in %.1f s", len(names), time.perf_counter() - t0)
    voxel_size = float(col[names[0]].voxel_size)

    geom = target_geometry(bbox, 2, compress)
    prior_info: dict = {}
    if tau == "auto":
        tau, prior_info = estimate_prior(col, df, float(bbox), geom, float(thresh))
    tau = float(tau)
    n_classes = len(class_names)
    ds = CropDataset(readers, stats, df, geom, crop, n_classes=n_classes, thresh=thresh, gauss=gauss, clip=tuple(clip),
                     compress=compress, random_fraction=random_fraction, seed=seed, repeats=repeats)
    cfg = {"n_classes": n_classes, **(arch_config or {})}
    model = registry.create(arch, **cfg).to(dev)
    contract = _contract(arch=arch, model=model, classes=class_names, bbox=bbox, crop=crop, gauss=gauss, compress=compress,
                         clip=clip, thresh=thresh, tau=tau, geom=geom, voxel_size=voxel_size, train_stats=stats,
                         val_radius=val_radius)
    contract.update(tta=int(tta), prior=prior_info, threshold_source="auto" if not regions else "validation",
                    train_labels=label_records(df, class_names))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    use_amp = bool(amp) and amp_dtype(dev) is not None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype(dev) == torch.float16)
    runlog = RunLog(run_dir)
    options = {k: v for k, v in locals().items() if k in _OPTION_KEYS}
    options.update(classes=class_names, n_train_labels=len(df), n_val_labels=len(vdf), val_regions=regions,
                   store=str(col.path), device=str(dev), started=_dt.datetime.now().isoformat(timespec="seconds"))
    start_epoch, best_f1 = 0, -1.0
    if resume:
        ck = load_checkpoint(last_path, map_location=dev)
        old = ck.get("contract", {})
        for key in ("arch", "bbox", "classes", "compress", "gauss", "crop"):
            if old.get(key) != contract.get(key):
                raise InputError(f"Cannot resume {str(last_path)!r}: its {key} is {old.get(key)!r}, now {contract.get(key)!r}.")
        model.load_state_dict(ck["state_dict"])
        if "optimizer" in ck:
            opt.load_state_dict(ck["optimizer"])
        start_epoch = int(ck.get("epoch") or 0)
        best_f1 = float((ck.get("extra") or {}).get("best_f1", -1.0))
        contract["suggested_threshold"] = old.get("suggested_threshold", 0.5)
        runlog.truncate(start_epoch)
        logger.info("resuming %s from epoch %d", run_dir, start_epoch)
    runlog.save_options(options)

    gen = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(ds, batch_size=int(batch_size), shuffle=True, drop_last=len(ds) > int(batch_size),
                        num_workers=int(num_workers), generator=gen, persistent_workers=False)
    flip_rng = np.random.default_rng(int(seed) + 1)
    picker = Picker(model, contract, device=dev)
    picker.contract = contract  # shared: validation updates the suggested threshold
    for epoch in range(start_epoch + 1, int(epochs) + 1):
        ds.set_epoch(epoch)
        gen.manual_seed(int(seed) * 1000 + epoch)
        model.train()
        t_ep = time.perf_counter()
        sums = {"loss": 0.0, "hm_loss": 0.0, "cr_loss": 0.0, "consis_loss": 0.0, "r_pos": 0.0, "r_neg": 0.0}
        nb = 0
        try:
            batches = iter(loader)
            for batch in batches:
                x = batch["input"].to(dev, non_blocking=True)
                tgt = batch["target"].to(dev, non_blocking=True)
                tomos = sorted(set(batch["tomogram"]))
                axis = -1 if flip_rng.random() < 0.5 else -2
                with autocast(dev, enabled=use_amp):
                    if contrastive:
                        outp = model(torch.cat([x, torch.flip(x, dims=(axis,))], dim=0))
                        b = x.shape[0]
                        hm1, hm2 = outp["hm"][:b].float(), torch.flip(outp["hm"][b:], dims=(axis,)).float()
                        f1, f2 = outp["feat"][:b], torch.flip(outp["feat"][b:], dims=(axis,))
                    else:
                        outp = model(x)
                        hm1 = outp["hm"].float()
                l1, parts = pu_focal_loss(hm1, tgt, tau)
                if contrastive:
                    l2, _ = pu_focal_loss(hm2, tgt, tau)
                    hm_loss = 0.5 * (l1 + l2)
                    p1, p2 = torch.sigmoid(hm1), torch.sigmoid(hm2)
                    cr = debiased_contrastive_loss(f1, f2, tgt, p1.detach(), p2.detach(), tau=tau, temp=temp,
                                                   unsup_weight=unsup_weight, max_pos=max_pos, n_unlabeled=n_unlabeled,
                                                   generator=gen)
                    cons = consistency_loss(p1, p2)
                    loss = hm_loss + cr_weight * cr + consistency_weight * cons
                else:
                    hm_loss, cr, cons = l1, torch.zeros(()), torch.zeros(())
                    loss = hm_loss
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"The training loss became {float(loss.detach())} in epoch {epoch} on a batch from tomogram(s) {', '.join(tomos)} "
                        f"(hm {float(hm_loss.detach()):.4g}, contrastive {float(cr.detach()):.4g}, consistency {float(cons.detach()):.4g}); "
                        "check the tomogram for extreme values or lower the learning rate."
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                nb += 1
                sums["loss"] += float(loss.detach())
                sums["hm_loss"] += float(hm_loss.detach())
                sums["cr_loss"] += float(cr.detach())
                sums["consis_loss"] += float(cons.detach())
                sums["r_pos"] += parts["r_pos"]
                sums["r_neg"] += parts["r_neg"]
        except InputError as exc:
            raise InputError(f"Epoch {epoch}: {exc}") from exc
        rec: dict[str, Any] = {"epoch": epoch, **{k: v / max(nb, 1) for k, v in sums.items()}, "n_batches": nb,
                               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t_ep}
        improved = False
        if regions and (epoch % max(int(val_every), 1) == 0 or epoch == int(epochs)):
            model.eval()
            t_val = time.perf_counter()
            dbg = run_dir / "debug" if debug_slices else None
            res = validate(picker, readers, stats, regions, vdf, val_radius, debug_dir=dbg, debug_slices=debug_slices, epoch=epoch)
            rec.update(res)
            rec["val_seconds"] = time.perf_counter() - t_val
            if res["val_f1"] > best_f1:
                best_f1 = res["val_f1"]
                contract["suggested_threshold"] = res["val_threshold"]
                improved = True
        elif not regions:
            improved = True
        extra = {"best_f1": best_f1, "record": rec}
        save_checkpoint(last_path, arch=arch, config=cfg, model=model, contract=contract, optimizer=opt, epoch=epoch, extra=extra)
        if improved:
            save_checkpoint(best_path, arch=arch, config=cfg, model=model, contract=contract, epoch=epoch, extra=extra)
        runlog.log_epoch(rec)
        logger.info("epoch %d/%d loss %.4f (hm %.4f cr %.4f cons %.4f) %.1f s%s", epoch, epochs, rec["loss"], rec["hm_loss"],
                    rec["cr_loss"], rec["consis_loss"], rec["seconds"],
                    f" val P {rec['val_precision']:.3f} R {rec['val_recall']:.3f} F1 {rec['val_f1']:.3f}" if "val_f1" in rec else "")
    try:
        runlog.plot(["loss", "hm_loss", "cr_loss", "consis_loss"], run_dir / "losses.png")
        if regions:
            runlog.plot(["val_precision", "val_recall", "val_f1", "val_ap"], run_dir / "validation.png")
    except Exception as exc:  # plotting must never lose a finished run
        logger.warning("could not draw the training plots: %s", exc)
    best = Picker.load(best_path if best_path.exists() else last_path, device=dev)
    return best


_OPTION_KEYS = {
    "bbox", "epochs", "arch", "arch_config", "batch_size", "crop", "lr", "tau", "temp", "cr_weight", "unsup_weight",
    "consistency_weight", "contrastive", "thresh", "gauss", "compress", "clip", "seed", "val_fraction", "val_radius",
    "val_every", "debug_slices", "num_workers", "random_fraction", "repeats", "max_pos", "n_unlabeled", "amp", "resume",
}
