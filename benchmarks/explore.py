"""Exploration benchmark (issue "Exploration", Measure): embedding quality vs raw-pixel PCA, and speed.

Pipeline (the real one): ``milotile.synth`` tomograms (default 4 x 64 x 256 x 256, 90 particles each,
three species in equal parts, no filament) -> ingest -> preprocess -> mine (DoG candidates; exclusion
band half a patch) -> extract_patches (slab mode, bbox 32, MiLoPYP's four neighbour shifts) ->
``explore.train`` (SimSiam) -> ``explore.embed``. One store per tilt-series SNR (``--snr``, default
0.04 and 0.15: at the old 0.5 raw-pixel PCA already reached 0.99), built once and reused from ``--work``;
the ``3d`` (``--modes slab``) and ``2d3d`` (``--modes tilthalves,slice``, the default; MiLoPYP's
``tiltsum,slice`` for comparison) banks of one setting share it.

Hard setting (issue 15): ``--preset hard --size 128,256,256`` -- four species of radius 12/9/7/5 voxels
(20 each per tomogram), crowders, membranes, gold, a filament, an intensity gradient, CTF and the
missing wedge (see :mod:`milotile.synth.hard`). On the species alone its default SNR 0.1 (and 0.05)
leaves raw-pixel PCA at 0.98-1.00 k-NN accuracy (species differ in size), so the learned embedding can
only tie there; SNR 0.02 is where the two part. With the similar-sized crowders as a fifth class
(``with_decoys`` below: shape, not size) SNR 0.1 and 0.05 part them too. See
``results/explore_hard.json`` for the commands.

(a) quality. Each ground-truth particle is matched to its nearest candidate within
    ``max(--match-radius, --match-frac x particle radius)`` voxels (DoG candidates of large particles sit
    off-centre; one candidate per particle, so no near-duplicate rows leak between
    CV folds); that candidate gets the particle's species. Reported: 5-NN species accuracy
    (stratified 5-fold CV, repeated ``--cv-repeats`` times with different shuffles; mean and std
    over the repeats) of

    * the learned embedding for every training seed in ``--seeds``: ``--feature`` with ``--tta``
      (default ``centre`` averaged over the 8 flips/rot90, the pipeline default) is the headline; the
      other outputs (``pred`` is MiLoPYP's choice, ``trunk`` the globally pooled backbone) with and
      without the average (``*_tta`` / ``*_plain``) are reported too;
    * raw-pixel PCA of the same patches (the original, unshifted patch, per-patch min-max as
      stored in the bank; for a ``tilthalves`` bank the tilt sum of both halves, i.e. exactly the
      ``tiltsum,slice`` patch), PCA fitted on ALL candidates (as unsupervised as the embedding), for
      every component count in ``--pca``, also on the centre crop the model sees when ``--crop`` is
      set -- and the raw pixels themselves;
    * chance (the majority-class fraction).

    Every feature set is scored twice: standardised features + Euclidean k-NN ('std'), and
    L2-normalised features (cosine k-NN, 'cos'). The PCA baseline is the best of ALL its component
    counts and both metrics (chosen with hindsight -- generous to the baseline); the embedding is
    judged on its pre-declared setting (``--feature``, 'std'), its best setting is listed for reference.
    Cluster purity: k-means with twice as many clusters as species on standardised features, share
    of points in their cluster's majority species (best PCA component count, again with hindsight).

    Species + decoys (hard preset; ``--no-decoys`` skips it): the candidates on similar-sized
    crowders -- random globules of the species' radii, each of its own shape -- form a fifth class
    ``decoy`` (matched like the particles; a candidate on a particle keeps the particle). Size no
    longer tells the classes apart, shape must. Scored with *balanced* 5-NN accuracy (mean recall
    over the classes, chance 0.2: the decoys are the majority) and purity, same protocol
    (``with_decoys`` in the results). Species alone saturate at the preset's SNR 0.1 (PCA 0.99); the
    decoys do not, and this is the exploration task on real data: find the targets among junk.
(b) speed. Patches per second of training (median epoch) and of embedding on CPU, and the
    two-view augmentation alone: torch batch augmentation vs a MiLoPYP-style per-sample PIL loop
    (8-bit image, flips, brightness/contrast jitter, random resized crop, rot90, to tensor,
    normalise) on the same patches.

    python benchmarks/explore.py --quick                        # 1 SNR, 3 small tomograms, 5 epochs
    python benchmarks/explore.py --work /tmp/explore_bench      # the full run (~15 min on 2 idle cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from milotile.explore.recipe import FEATURES, OBJECTIVES, OPTIMIZERS, ExploreRecipe  # noqa: E402

#: the pipeline's recipe; the options below that it covers default to it
DEFAULT = ExploreRecipe()

log = logging.getLogger("bench.explore")


# --------------------------------------------------------------------------- data
def build_store(work: Path, a: argparse.Namespace) -> tuple[object, str, object, dict]:
    """synth -> ingest -> preprocess -> mine -> extract_patches; reused when ``work`` holds the same setting.

    The data (synth, store, candidates) are keyed by the data options; each patch bank by its modes and
    bbox, so the ``3d`` and ``2d3d`` runs of one setting share the tomograms and candidates.
    """
    import milotile as mt
    from milotile.stages.mine import mine
    from milotile.stages.patches import extract_patches
    from milotile.stages.preprocess import preprocess
    from milotile.synth import synth

    params = {"n_tomograms": a.n_tomograms, "size": a.size, "snr": a.snr, "n_particles": a.n_particles,
              "data_seed": a.data_seed, "border": a.border, "border_z": a.border_z, "preset": a.preset}
    lookalike = a.preset == "lookalike"
    if lookalike:  # the setting draws size, SNR, species...; the tomogram count follows its particles per species
        from milotile.synth.lookalike import draw_setting

        st = draw_setting(a.setting)
        params = {"preset": a.preset, "setting": a.setting, "data_seed": a.data_seed, "border": a.border,
                  "border_z": a.border_z, "per_species": a.per_species,
                  "n_tomograms": max(2, -(-a.per_species // st.particles_per_species)), "invert": st.contrast > 0}
    params["recentre"] = getattr(a, "recentre", "auto")  # candidates on their blobs' density centres (mine --recentre)
    bank_params = {"bbox": a.bbox, "modes": a.modes}
    normalize = getattr(a, "normalize", "minmax")
    extra_norm = {}
    if normalize != "minmax":  # the preprocessed volume's values (z-scored per tomogram, clipped to [0, 1])
        bank_params["normalize"] = normalize
        extra_norm["normalize"] = None
    from milotile.ops.patches import TILT_MODES
    from milotile.stages.patches import DEFAULT_TILT_WINDOW

    shifts: bool | list = True
    extra = {}
    suffix = "-shifts"  # the key names what differs from the stage defaults (MiLoPYP's shifts, the default window)
    if getattr(a, "shifts", None):  # other positive-pair offsets than MiLoPYP's (dx, dy, dz)
        shifts = [list(map(int, s)) for s in json.loads(a.shifts)]
        bank_params["shifts"] = shifts
        suffix = "-sh" + "_".join("".join(f"{v:+d}" for v in s) for s in shifts).replace("+", "p").replace("-", "m")
    if any(m in TILT_MODES for m in a.modes.split(",")):  # the tilt window is part of a tilt bank's identity
        extra["tilt_window"] = tuple(float(v) for v in a.tilt_window.split(",")) if a.tilt_window else DEFAULT_TILT_WINDOW
        bank_params["tilt_window"] = list(extra["tilt_window"])
        if extra["tilt_window"] != DEFAULT_TILT_WINDOW:
            suffix += f"-w{a.tilt_window.replace(',', '_')}"
    if extra_norm:
        suffix += "-raw"
    bank_key = None if suffix == "-shifts" else "candidates-" + a.modes.replace(",", "+") + f"-b{a.bbox}{suffix}"
    stamp = work / "data.json"
    if stamp.exists() and json.loads(stamp.read_text())["params"] == params:
        state = json.loads(stamp.read_text())
        col = mt.open(work / "store.zarr")
        banks = state.setdefault("banks", {})
        bkey = json.dumps(bank_params, sort_keys=True)
        if bkey not in banks:  # same data, another bank (the other mode or patch size)
            t0 = time.perf_counter()
            with mt.cluster(workers=a.threads, threads_per_worker=1, dashboard_address=None):
                key = extract_patches(col, bbox=a.bbox, modes=tuple(a.modes.split(",")), shifts=shifts, chunk_n=128,
                                      key=bank_key, **extra, **extra_norm)
            banks[bkey] = {"key": key, "patches_s": time.perf_counter() - t0}
            stamp.write_text(json.dumps(state))
        info = {**state["info"], **banks[bkey]}
        return col, info["key"], pd.read_parquet(work / "gt.parquet"), info
    for p in ("synth", "store.zarr"):
        shutil.rmtree(work / p, ignore_errors=True)
    t0 = time.perf_counter()
    if lookalike:  # issue 23: 8-12 similar-sized species, acquisition drawn from the setting
        res = synth(work / "synth", n_tomograms=params["n_tomograms"], seed=a.data_seed, preset="lookalike",
                    setting=a.setting)
    else:
        size = tuple(int(s) for s in a.size.split(","))
        hard = a.preset == "hard"  # issue 15: four species r 12/9/7/5, crowders, membranes, gold, gradient
        res = synth(work / "synth", n_tomograms=a.n_tomograms, size=size, seed=a.data_seed, snr=a.snr,
                    filament=hard, n_particles=None if hard else a.n_particles, preset=a.preset)
    t1 = time.perf_counter()
    with mt.cluster(workers=a.threads, threads_per_worker=1, dashboard_address=None):
        col = mt.ingest(res.manifest, work / "store.zarr")
        preprocess(col)
        # bright particles (the look-alike's contrast +1) are mined with --invert, as a user who sees them would
        cands = mine(col, border=a.border, border_z=a.border_z, invert=bool(params.get("invert", False)),
                     recentre=params.get("recentre"))
        t2 = time.perf_counter()
        key = extract_patches(col, bbox=a.bbox, modes=tuple(a.modes.split(",")), shifts=shifts, chunk_n=128, key=bank_key,
                              **extra, **extra_norm)
    res.ground_truth.to_parquet(work / "gt.parquet")
    info = {"synth_s": t1 - t0, "pipeline_s": t2 - t1, "n_candidates": len(cands)}
    bank = {"key": key, "patches_s": time.perf_counter() - t2}
    stamp.write_text(json.dumps({"params": params, "info": info,
                                 "banks": {json.dumps(bank_params, sort_keys=True): bank}}))
    return col, key, res.ground_truth, {**info, **bank}


def label_candidates(table, gt, radius: float, frac: float = 0.0) -> np.ndarray:
    """Species per candidate row: the particle whose nearest candidate it is, else ''.

    A particle of radius ``r`` (ground-truth column ``radius``, when present) matches within
    ``max(radius, frac * r)`` voxels: DoG candidates of large particles sit off-centre (on a lump).
    One candidate per particle; a candidate nearest to two particles keeps the closer one.
    """
    from scipy.spatial import cKDTree

    labels = np.full(len(table), "", dtype=object)
    for name, sub in table.groupby("tomogram"):
        g = gt[gt["tomogram"] == name]
        if g.empty:
            continue
        d, i = cKDTree(sub[["x", "y", "z"]].to_numpy()).query(g[["x", "y", "z"]].to_numpy())
        r = np.full(len(g), float(radius))
        if frac and "radius" in g.columns:
            r = np.maximum(r, frac * g["radius"].to_numpy(dtype=float))
        best: dict[int, tuple[float, str]] = {}
        for dist, row, sp, lim in zip(d, i, g["species"].astype(str), r, strict=True):
            if dist <= lim and (row not in best or dist < best[row][0]):
                best[row] = (dist, sp)
        for row, (_, sp) in best.items():
            labels[sub.index[row]] = sp
    return labels


DECOY = "decoy"


def decoy_table(work: Path) -> pd.DataFrame | None:
    """The similar-sized crowders of a hard-preset collection as a ``decoy`` species (``None`` if it has none).

    Crowders are random globules of the species' radii (±15 %) and density, each of its own shape
    (:func:`milotile.synth.hard.crowder`): telling them from particles takes shape, not size.
    """
    path = work / "synth" / "distractors.parquet"
    if not path.exists():
        return None
    d = pd.read_parquet(path)
    d = d[d["kind"] == "crowder"].drop(columns="kind").assign(species=DECOY)
    return d if len(d) else None


def knn_cv(x: np.ndarray, y: np.ndarray, metric: str, k: int = 5, folds: int = 5, repeats: int = 3,
           seed: int = 0, scorings: tuple[str, ...] = ("accuracy",)) -> dict[str, tuple[float, float]]:
    """Mean and std (over repeats) of stratified ``folds``-fold CV scores of a ``k``-NN classifier.

    ``metric``: ``"std"`` standardised features, Euclidean; ``"cos"`` L2-normalised (cosine).
    ``scorings``: sklearn scorer names, all from the same fits (``"accuracy"``, ``"balanced_accuracy"``:
    mean recall over classes, for unequal classes). Returns ``{scoring: (mean, std)}``.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_validate
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    folds = min(folds, int(np.min(np.unique(y, return_counts=True)[1])))
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    pre = StandardScaler() if metric == "std" else Normalizer()
    res = cross_validate(make_pipeline(pre, KNeighborsClassifier(k)), x, y, cv=cv, scoring=list(scorings))
    out = {}
    for name in scorings:
        s = res[f"test_{name}"].reshape(repeats, folds).mean(1)
        out[name] = (float(s.mean()), float(s.std()))
    return out


def supervised_reference(x: np.ndarray, y: np.ndarray, scoring: str = "accuracy", seed: int = 0) -> float:
    """CV score of a *supervised* classifier on the pixels (standardise, PCA 50, RBF SVM, balanced classes).

    Not a baseline -- it sees the labels -- but a reference for how separable the classes are in
    these patches at all: an unsupervised embedding near it has little left to gain.
    """
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    folds = min(5, int(np.min(np.unique(y, return_counts=True)[1])))
    n_comp = min(50, int(0.8 * x.shape[0]) - 1, x.shape[1])  # a CV training fold holds 80 % of the rows
    clf = make_pipeline(StandardScaler(), PCA(n_comp, random_state=seed),
                        SVC(C=3.0, class_weight="balanced"))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv, scoring=scoring).mean())


def cluster_quality(x: np.ndarray, y: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[float, float]:
    """Purity (share of points in their cluster's majority species) and adjusted Rand index against ``y`` of
    one k-means fit (``n_clusters``, standardised features)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import StandardScaler

    lab = KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(StandardScaler().fit_transform(x))
    hits = sum(np.unique(y[lab == c], return_counts=True)[1].max() for c in np.unique(lab))
    return float(hits / len(y)), float(adjusted_rand_score(y, lab))


def score_all(feats: dict[str, np.ndarray], y: np.ndarray, repeats: int, scoring: str = "accuracy",
              plain_too: bool = False) -> dict[str, dict]:
    """k-NN (both metrics) and k-means purity of each feature set; ``plain_too`` adds plain accuracy from the same
    k-NN fits under ``"accuracy"`` (next to a balanced ``scoring``)."""
    out = {}
    n_clusters = 2 * len(np.unique(y))
    scorings = (scoring, "accuracy") if plain_too and scoring != "accuracy" else (scoring,)
    for name, x in feats.items():
        out[name] = {}
        for metric in ("std", "cos"):
            r = knn_cv(x, y, metric, repeats=repeats, scorings=scorings)
            out[name][metric] = {"mean": round(r[scoring][0], 4), "std": round(r[scoring][1], 4)}
            if len(scorings) > 1:
                m, sd = r["accuracy"]
                out[name].setdefault("accuracy", {})[metric] = {"mean": round(m, 4), "std": round(sd, 4)}
        pur, ari = cluster_quality(x, y, n_clusters)
        out[name]["purity"], out[name]["ari"] = round(pur, 4), round(ari, 4)
    return out


# --------------------------------------------------------------------------- speed (b)
def pil_views(patches: np.ndarray, mean: float, std: float, rng: np.random.Generator) -> torch.Tensor:
    """MiLoPYP-style per-sample augmentation of both views with PIL (the baseline)."""
    from PIL import Image, ImageEnhance

    b = patches.shape[-1]
    out = []
    for p in patches:  # (S, b, b): original + shifted copies
        views = []
        for j, lo in ((0, 0.8), (int(rng.integers(1, len(p))), 0.9)):
            a = p[j]
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            img = Image.fromarray((a * 255).astype(np.uint8))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
            side = int(round(b * np.sqrt(rng.uniform(lo, 1.0))))
            x0, y0 = rng.integers(0, b - side + 1, 2)
            img = img.resize((b, b), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
            img = img.rotate(90 * int(rng.integers(0, 4)))
            t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
            views.append((t - mean) / std)
        out.append(torch.stack(views))
    return torch.stack(out)


def speed_augment(bank, n: int, batch: int, device: torch.device, repeats: int = 3) -> dict:
    from milotile.explore.augment import default_config, make_views

    x = bank.read(0, min(n, bank.n))  # (n, S, 1, b, b)
    strong, weak = default_config("3d", "strong"), default_config("3d", "weak")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        pil_views(x[i : i + batch, :, 0], 0.5, 0.2, rng)
    pil = len(x) / (time.perf_counter() - t)
    g = torch.Generator(device=device).manual_seed(0)
    xt = torch.from_numpy(x).to(device)
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            make_views(xt[i : i + batch], g, strong, weak, [0.5], [0.2])
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(x) / (time.perf_counter() - t))
    return {"pil_per_sample_views_per_s": pil, f"torch_batch_views_per_s_{device.type}": best, "n": len(x)}


# --------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (3 tomograms, 5 epochs, 1 seed)")
    ap.add_argument("--n-tomograms", type=int, default=4)
    ap.add_argument("--size", default=None, help="Z,Y,X of each synthetic tomogram (64,256,256; hard 128,256,256)")
    ap.add_argument("--n-particles", type=int, default=90, help="particles per tomogram (3 species)")
    ap.add_argument("--snr", default=None,
                    help="tilt-series SNR(s), comma-separated (one store each; default 0.04,0.15; hard 0.02,0.1); "
                    "every seed runs at every SNR")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--preset", choices=("easy", "hard", "lookalike"), default="easy",
                    help="synth preset; hard = issue 15's setting (use with --snr 0.1 --size 128,256,256); lookalike = "
                    "issue 23's 8-12 similar-sized species with acquisition drawn from --settings")
    ap.add_argument("--settings", default="0,1,2,3,5",
                    help="lookalike: setting numbers (each draws size, SNR, tilt range, contrast, species...)")
    ap.add_argument("--tune-settings", default="0,1,2",
                    help="lookalike: settings the defaults may be chosen on; the others are reported only")
    ap.add_argument("--per-species", type=int, default=15,
                    help="lookalike: particles of each species per collection (sets the tomogram count, >= 2)")
    ap.add_argument("--min-class", type=int, default=5,
                    help="species with fewer matched candidates are left out of the scores (5-fold CV)")
    ap.add_argument("--dump", action="store_true",
                    help="write each run's embeddings and candidate truth to <work>/.../features_*.npz")
    ap.add_argument("--normalize", choices=("minmax", "tomogram"), default="minmax",
                    help="patch values: per-patch min-max (MiLoPYP, the default) or the preprocessed volume's own "
                    "(z-scored over the tomogram and clipped: contrast kept between patches)")
    ap.add_argument("--modes", default=None,
                    help="patch modes: slab (3d) or tilthalves,slice / tiltsum,slice (2d3d); several runs separated "
                    "by ';' (default slab; hard 'slab;tilthalves,slice')")
    ap.add_argument("--border", type=int, default=None,
                    help="mining exclusion band in y/x (default 16, half a patch; lookalike 8: its volumes are 100-200 "
                    "wide and patches at the edge are padded)")
    ap.add_argument("--border-z", type=int, default=None, help="mining exclusion band in z (default 8; lookalike 4)")
    ap.add_argument("--bbox", type=int, default=32)
    ap.add_argument("--recentre", default="auto", metavar="R|auto|off",
                    help="mine --recentre: candidates moved onto their blobs' density centres (default auto, as the CLI)")
    ap.add_argument("--match-radius", type=float, default=4.0, help="candidate-particle match distance (voxels)")
    ap.add_argument("--match-frac", type=float, default=0.5,
                    help="... or this fraction of the particle radius when larger (big species: DoG peaks off-centre)")
    ap.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT.epochs} (the recipe's); hard 12")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=DEFAULT.lr)
    ap.add_argument("--optimizer", default=DEFAULT.optimizer, choices=OPTIMIZERS)
    ap.add_argument("--objective", default=DEFAULT.objective, choices=OBJECTIVES)
    ap.add_argument("--temperature", type=float, default=DEFAULT.temperature, help="of the ntxent objective")
    ap.add_argument("--widths", default="32,64,128", help="trunk widths (default 32,64,128, the pipeline's CPU default; 16,32,64 saves time; MiLoPYP: 64,128,256)")
    ap.add_argument("--shifts", default=None, metavar="JSON",
                    help="positive-pair offsets [[dx,dy,dz],...] of the patch bank (default MiLoPYP's four)")
    ap.add_argument("--tilt-window", default=None, metavar="LOW,HIGH",
                    help="tilt angles of the tilt-sum modes (default: the patch stage's, -60,60; MiLoPYP's: "
                    "--tilt-window=-20,20, with '=' since the value starts with '-')")
    ap.add_argument("--crop", type=int, default=None,
                    help="centre crop the model sees (train bbox; default the patch; hard 24, the largest species' diameter)")
    ap.add_argument("--strong-aug", default=None, help="JSON overrides of the strong view's AugmentConfig")
    ap.add_argument("--weak-aug", default=None, help="JSON overrides of the weak view's AugmentConfig")
    ap.add_argument("--feature", default=DEFAULT.feature, choices=FEATURES,
                    help="the headline (stored) embedding output (default centre, the pipeline default)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=DEFAULT.tta,
                    help="headline embedding averaged over the 8 flips/rot90 (default: yes, the pipeline default)")
    ap.add_argument("--seeds", default="0,1", help="training seeds (same data)")
    ap.add_argument("--pca", default="4,8,16,32,64", help="PCA component counts of the baseline")
    ap.add_argument("--cv-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-speed", action="store_true", help="skip part (b)")
    ap.add_argument("--no-decoys", action="store_true",
                    help="skip the species + decoys scoring (hard preset: crowders as a fifth class)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default=None, help="work folder, the store is reused (default: a temporary one)")
    ap.add_argument("--out", default=None, help="JSON path (default results/explore[_quick].json)")
    a = ap.parse_args(argv)
    hard = a.preset in ("hard", "lookalike")  # the recipe chosen on the hard setting (results/explore_hard.json)
    for name, easy_val, hard_val in (("size", "64,256,256", "128,256,256"), ("snr", "0.04,0.15", "0.02,0.1"),
                                     ("epochs", DEFAULT.epochs, 12), ("crop", None, 24),
                                     ("modes", "slab", "slab;tilthalves,slice")):
        if getattr(a, name) is None:
            setattr(a, name, hard_val if hard else easy_val)
    la = a.preset == "lookalike"
    a.border = a.border if a.border is not None else 8 if la else 16
    a.border_z = a.border_z if a.border_z is not None else 4 if la else 8
    if a.quick:
        a.n_tomograms, a.size, a.n_particles, a.epochs, a.seeds, a.snr = 3, "64,192,192", 45, 5, "0", "0.04"
    if a.out is None:
        name = ("explore_quick.json" if a.quick else "explore_lookalike.json" if a.preset == "lookalike"
                else "explore_hard.json" if hard else "explore.json")
        a.out = str(Path(__file__).parent / "results" / name)
    return a


def recipe_of(a: argparse.Namespace) -> ExploreRecipe:
    """The exploration recipe of a benchmark run: :class:`ExploreRecipe`'s defaults with this script's options."""
    return ExploreRecipe().replace(
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer, bbox=a.crop, feature=a.feature,
        objective=a.objective, temperature=a.temperature,
        tta=a.tta, widths=tuple(int(w) for w in a.widths.split(",")), save_every=a.epochs,
        strong_aug=json.loads(a.strong_aug) if a.strong_aug else None,
        weak_aug=json.loads(a.weak_aug) if a.weak_aug else None)


def evaluate_setting(a: argparse.Namespace, snr: float, seeds: list[int], work: Path, dev: torch.device) -> dict:
    """Data at one SNR, the PCA baselines, and SimSiam for every seed (quality part (a))."""
    from sklearn.decomposition import PCA

    from milotile.explore import embed, open_bank, train
    from milotile.explore.data import model_channels

    a.snr = snr
    col, key, gt, prep = build_store(work, a)
    bank = open_bank(col, key)
    table = col.read_table(f"patches-{key}")
    labels = label_candidates(table, gt, a.match_radius, a.match_frac)
    on_gt = labels != ""
    sp_all, sp_n = np.unique(labels[on_gt].astype(str), return_counts=True)
    rare = sp_all[sp_n < a.min_class]  # too few candidates for 5-fold CV: left out of the scores (logged)
    if len(rare):
        log.warning("species with fewer than %d matched candidates left out of the scores: %s", a.min_class,
                    dict(zip(rare.tolist(), sp_n[sp_n < a.min_class].tolist(), strict=True)))
        on_gt &= ~np.isin(labels.astype(str), rare)
    y = labels[on_gt].astype(str)
    counts = {str(k): int(v) for k, v in zip(*np.unique(y, return_counts=True), strict=True)}
    gt_counts = {str(k): int(v) for k, v in gt["species"].value_counts().items()}
    log.info("SNR %g: %d candidates, %d on ground-truth particles %s (of %s)", snr, bank.n, on_gt.sum(), counts,
             gt_counts)
    chance = float(max(counts.values()) / len(y))
    # look-alike: 8-12 species of unequal candidate counts -> balanced accuracy (mean recall), chance 1 / species
    scoring = "balanced_accuracy" if a.preset == "lookalike" else "accuracy"
    if scoring != "accuracy":
        chance = 1.0 / len(counts)

    # raw-pixel baselines on the same patches (the original copy, per-patch min-max as in the bank; a
    # tilt-halves bank gives the model's input: the tilt sum of both halves and the slice)
    allx = bank.read(0, bank.n)  # (n, S, C, b, b)
    x0 = model_channels(allx[:, 0], bank.layout)
    raw_all = x0.reshape(bank.n, -1).astype(np.float64)
    base_feats = {"raw_pixels": raw_all[on_gt]}
    raws = {"": raw_all}
    if a.crop and a.crop < allx.shape[-1]:  # also PCA of the centre crop the model sees (generous to the baseline)
        o = (allx.shape[-1] - a.crop) // 2
        raws[f"_crop{a.crop}"] = x0[:, :, o : o + a.crop, o : o + a.crop].reshape(bank.n, -1).astype(np.float64)
    pca_all = {}
    for suffix, raw in raws.items():
        for nc in (int(v) for v in a.pca.split(",")):
            if nc < min(raw.shape):
                pca_all[f"pca_{nc}{suffix}"] = PCA(nc, random_state=0).fit(raw).transform(raw)
    base_feats.update({k: v[on_gt] for k, v in pca_all.items()})
    baseline = score_all(base_feats, y, a.cv_repeats, scoring)
    ref_raw = raws.get(f"_crop{a.crop}", raw_all)
    supervised = round(supervised_reference(ref_raw[on_gt], y, scoring), 4)
    # species + decoys: the candidates on similar-sized crowders form a fifth class (balanced accuracy)
    decoys = None if a.no_decoys else decoy_table(work)
    on_d = y_d = base_d = sup_d = None
    if decoys is not None:
        lab_d = np.where(on_gt, labels, label_candidates(table, decoys, a.match_radius, a.match_frac))
        on_d = lab_d != ""
        y_d = lab_d[on_d].astype(str)
        pca_d = {k: v[on_d] for k, v in pca_all.items()}
        base_d = score_all(pca_d, y_d, a.cv_repeats, "balanced_accuracy", plain_too=True)  # plain: chance = decoy share
        sup_d = round(supervised_reference(ref_raw[on_d], y_d, "balanced_accuracy"), 4)
        log.info("SNR %g with decoys: %s; best PCA balanced accuracy %.3f (supervised reference %.3f)", snr,
                 {str(c): int(n) for c, n in zip(*np.unique(y_d, return_counts=True), strict=True)},
                 max(v[m]["mean"] for v in base_d.values() for m in ("std", "cos")), sup_d)
    best_pca = max((v[m]["mean"], k, m) for k, v in baseline.items() if k.startswith("pca") for m in ("std", "cos"))
    log.info("SNR %g baseline: best PCA %.3f (%s, %s); raw pixels %s; chance %.3f; supervised reference %.3f", snr,
             *best_pca, baseline["raw_pixels"], chance, supervised)

    recipe = recipe_of(a)
    runs = []
    for seed in seeds:
        run_dir = work / f"run_seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        enc = train(col, key=key, recipe=recipe.replace(seed=seed), out=run_dir, device=str(dev))
        t_train = time.perf_counter() - t0
        recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        t0 = time.perf_counter()
        emb = embed(col, model=enc, key=key, overwrite=True)
        t_embed = time.perf_counter() - t0
        feats = {a.feature: emb.values()[on_gt]}
        for kind in ("pred", "proj", "fc", "trunk", "centre"):
            if kind != a.feature:
                feats[kind] = enc.transform(allx[on_gt], feature=kind)
            feats[f"{kind}_tta" if not a.tta else f"{kind}_plain"] = enc.transform(allx[on_gt], feature=kind,
                                                                                   tta=not a.tta)
        q = score_all(feats, y, a.cv_repeats, scoring)
        if getattr(a, "dump", False):  # the stored embedding and the truth of every candidate (atlas experiments)
            np.savez_compressed(work / f"features_{a.modes.replace(',', '+')}_seed{seed}.npz",
                                emb=emb.values(), species=labels.astype(str),
                                decoy=np.zeros(len(labels), bool) if on_d is None else (on_d & ~on_gt),
                                pca=pca_all.get(f"pca_16_crop{a.crop}", pca_all.get("pca_16")),
                                xyz=table[["x", "y", "z"]].to_numpy(), tomogram=table["tomogram"].astype(str).to_numpy())
        qd = None if on_d is None else score_all({a.feature: emb.values()[on_d]}, y_d, a.cv_repeats,
                                                 "balanced_accuracy", plain_too=True)[a.feature]
        runs.append({
            "seed": seed, "knn5": q, "knn5_with_decoys": qd, "train_s": round(t_train, 1), "embed_s": round(t_embed, 2),
            "train_patches_per_s": float(np.median([r["patches_per_s"] for r in recs])),
            "embed_patches_per_s": bank.n / t_embed,
            "loss_first_last": [round(recs[0]["loss"], 4), round(recs[-1]["loss"], 4)],
            "output_std_last": round(recs[-1]["output_std"], 4),
        })
        log.info("SNR %g seed %d: %s %.3f (std) / %.3f (cos) purity %.3f; best %s; train %.0f s", snr, seed,
                 a.feature, q[a.feature]["std"]["mean"], q[a.feature]["cos"]["mean"], q[a.feature]["purity"],
                 max((v[m]["mean"], k, m) for k, v in q.items() for m in ("std", "cos")), t_train)
        if qd is not None:
            log.info("SNR %g seed %d with decoys: balanced %.3f (std) / %.3f (cos) purity %.3f", snr, seed,
                     qd["std"]["mean"], qd["cos"]["mean"], qd["purity"])
    headline = [r["knn5"][a.feature]["std"]["mean"] for r in runs]
    dsum = None if on_d is None else decoy_summary(base_d, runs, y_d, a.feature, sup_d)
    return {
        "snr": snr,
        "data": {"n_tomograms": a.n_tomograms, "size_zyx": a.size, "n_particles_per_tomogram": a.n_particles,
                 "species_ground_truth": gt_counts, "n_candidates": bank.n, "n_on_gt": int(on_gt.sum()),
                 "on_gt_per_species": counts, "prepare": prep},
        "chance": round(chance, 4),
        "baseline_knn5": baseline,
        "best_pca": {"accuracy": best_pca[0], "features": best_pca[1], "metric": best_pca[2]},
        "supervised_reference": supervised,
        "simsiam_runs": runs,
        "summary": {
            "snr": snr,
            "headline_feature": a.feature + ("_tta" if a.tta else ""),
            "simsiam_std_per_seed": headline,
            "simsiam_std_mean": float(np.mean(headline)) if headline else None,
            "simsiam_cos_per_seed": [r["knn5"][a.feature]["cos"]["mean"] for r in runs],
            "simsiam_best_setting_per_seed": [max(v[m]["mean"] for v in r["knn5"].values() for m in ("std", "cos"))
                                              for r in runs],
            "best_pca": best_pca[0],
            "simsiam_purity_per_seed": [r["knn5"][a.feature]["purity"] for r in runs],
            "best_pca_purity": max(v["purity"] for k, v in baseline.items() if k.startswith("pca")),
            "simsiam_ari_per_seed": [r["knn5"][a.feature]["ari"] for r in runs],
            "best_pca_ari": max(v["ari"] for k, v in baseline.items() if k.startswith("pca")),
            "scoring": scoring,
            "raw_pixels_best": max(baseline["raw_pixels"][m]["mean"] for m in ("std", "cos")),
            "supervised_reference": supervised,
            "chance": round(chance, 4),
            "learned_beats_best_pca_every_seed": bool(headline and min(headline) > best_pca[0]),
            "learned_purity_beats_best_pca_every_seed": bool(
                runs and min(r["knn5"][a.feature]["purity"] for r in runs)
                > max(v["purity"] for k, v in baseline.items() if k.startswith("pca"))),
            "with_decoys": None if dsum is None else {k: v for k, v in dsum.items() if k != "baseline_knn5"},
        },
        "with_decoys": dsum,
        "_bank": bank,
    }


def decoy_summary(baseline: dict, runs: list[dict], y: np.ndarray, feature: str, supervised: float | None) -> dict:
    """Balanced 5-NN accuracy and purity with the decoys as a class: best PCA (hindsight) vs each seed."""
    best = max((v[m]["mean"], k, m) for k, v in baseline.items() for m in ("std", "cos"))
    per_seed = [r["knn5_with_decoys"]["std"]["mean"] for r in runs]
    purity = [r["knn5_with_decoys"]["purity"] for r in runs]
    best_purity = max(v["purity"] for v in baseline.values())
    classes, counts = np.unique(y, return_counts=True)
    return {
        "n_per_class": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        "scoring": ("balanced accuracy (mean recall over the classes), chance = 1 / classes; 'accuracy' "
                    "sub-entries: plain accuracy, chance = the decoys' share"),
        "chance": round(1.0 / len(classes), 4),
        "chance_plain": round(float(counts.max() / counts.sum()), 4),
        "best_pca_plain": max(v["accuracy"][m]["mean"] for v in baseline.values() for m in ("std", "cos")),
        "simsiam_plain_std_per_seed": [r["knn5_with_decoys"]["accuracy"]["std"]["mean"] for r in runs],
        "baseline_knn5": baseline,
        "best_pca": {"balanced_accuracy": best[0], "features": best[1], "metric": best[2]},
        "best_pca_purity": best_purity,
        "supervised_reference": supervised,
        "simsiam_std_per_seed": per_seed,
        "simsiam_cos_per_seed": [r["knn5_with_decoys"]["cos"]["mean"] for r in runs],
        "simsiam_purity_per_seed": purity,
        "learned_beats_best_pca_every_seed": bool(per_seed and min(per_seed) > best[0]),
        "learned_purity_beats_best_pca_every_seed": bool(purity and min(purity) > best_purity),
        "feature": feature,
    }


def print_lookalike_row(s: dict) -> None:
    """One line per (setting, seed, mode): learned vs best PCA (balanced 5-NN, purity, ARI) and the references."""
    d = s.get("with_decoys") or {}
    log.info("lookalike setting %d%s seed %d %-16s SNR %.3f: 5-NN %.3f vs PCA %.3f | purity %.3f vs %.3f | ARI %.3f "
             "vs %.3f | supervised %.3f chance %.3f | +decoys %.3f vs %.3f | load %.1f",
             s["setting"], "T" if s["tune"] else "R", s["seed"], s["modes"], s["snr"], s["simsiam_std_per_seed"][0],
             s["best_pca"], s["simsiam_purity_per_seed"][0], s["best_pca_purity"], s["simsiam_ari_per_seed"][0],
             s["best_pca_ari"], s["supervised_reference"], s["chance"],
             (d.get("simsiam_std_per_seed") or [float("nan")])[0], d.get("best_pca", {}).get("balanced_accuracy",
                                                                                        float("nan")),
             s["load_avg"][0])


def lookalike_table(summaries: list[dict]) -> list[dict]:
    """Per setting and mode (mean and worst over seeds): learned minus best-PCA 5-NN, purity and ARI."""
    rows = []
    keys = sorted({(s["setting"], s["modes"]) for s in summaries})
    for setting, modes in keys:
        ss = [s for s in summaries if s["setting"] == setting and s["modes"] == modes]
        knn = np.array([s["simsiam_std_per_seed"][0] for s in ss])
        pca = np.array([s["best_pca"] for s in ss])
        pur = np.array([s["simsiam_purity_per_seed"][0] for s in ss])
        pur_p = np.array([s["best_pca_purity"] for s in ss])
        ari = np.array([s["simsiam_ari_per_seed"][0] for s in ss])
        ari_p = np.array([s["best_pca_ari"] for s in ss])
        rows.append({
            "setting": setting, "group": "tune" if ss[0]["tune"] else "report", "modes": modes,
            "seeds": [s["seed"] for s in ss], "snr": round(ss[0]["snr"], 4),
            "n_species": ss[0]["lookalike"]["n_species"], "contrast": ss[0]["lookalike"]["contrast"],
            "knn5_balanced_learned": round(float(knn.mean()), 4), "knn5_balanced_pca": round(float(pca.mean()), 4),
            "knn5_gain_mean": round(float((knn - pca).mean()), 4), "knn5_gain_worst": round(float((knn - pca).min()), 4),
            "purity_learned": round(float(pur.mean()), 4), "purity_pca": round(float(pur_p.mean()), 4),
            "purity_gain_worst": round(float((pur - pur_p).min()), 4),
            "ari_learned": round(float(ari.mean()), 4), "ari_pca": round(float(ari_p.mean()), 4),
            "supervised_reference": round(float(np.mean([s["supervised_reference"] for s in ss])), 4),
            "chance": ss[0]["chance"],
            "with_decoys_learned": [(s.get("with_decoys") or {}).get("simsiam_std_per_seed", [None])[0] for s in ss],
            "with_decoys_pca": [(s.get("with_decoys") or {}).get("best_pca", {}).get("balanced_accuracy") for s in ss],
            "load_avg_1m": [round(s["load_avg"][0], 2) for s in ss],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "milotile"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_all = time.perf_counter()
    load_start = os.getloadavg()

    from milotile.nn.device import pick_device

    dev = pick_device(a.device)
    tmp = None if a.work else tempfile.TemporaryDirectory()
    work = Path(a.work or tmp.name)
    snrs = [float(v) for v in str(a.snr).split(",")]
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else []
    settings = []
    all_modes = a.modes.split(";")
    if a.preset == "lookalike":  # settings x seeds; a seed draws the content and trains the model
        from milotile.synth.lookalike import draw_setting

        tune = {int(v) for v in a.tune_settings.split(",") if v}
        for setting in (int(v) for v in a.settings.split(",")):
            for seed in seeds:
                a.setting, a.data_seed = setting, seed
                wd = work / f"la{setting}_s{seed}"
                wd.mkdir(parents=True, exist_ok=True)
                st = draw_setting(setting)
                for modes in all_modes:
                    a.modes = modes
                    settings.append(evaluate_setting(a, st.snr, [seed], wd, dev))
                    settings[-1]["summary"].update(modes=modes, setting=setting, seed=seed, tune=setting in tune,
                                                   lookalike=st.as_dict(), load_avg=os.getloadavg())
                    print_lookalike_row(settings[-1]["summary"])
    else:
        for modes in all_modes:  # e.g. "slab;tilthalves,slice": the 3d and the 2d3d bank of the same data
            for snr in snrs:
                wd = work / f"snr{snr:g}"
                wd.mkdir(parents=True, exist_ok=True)
                a.modes = modes
                settings.append(evaluate_setting(a, snr, seeds, wd, dev))
                settings[-1]["summary"]["modes"] = modes

    speed: dict = {}
    if not a.no_speed:
        bank = settings[0]["_bank"]
        speed = speed_augment(bank, 1024, a.batch_size, torch.device("cpu"))
        if dev.type == "cuda":
            speed.update(speed_augment(bank, 1024, a.batch_size, dev))
        runs = [r for s in settings for r in s["simsiam_runs"]]
        if runs:
            speed.update({
                "train_patches_per_s_median_over_runs": float(np.median([r["train_patches_per_s"] for r in runs])),
                "embed_patches_per_s_median_over_runs": float(np.median([r["embed_patches_per_s"] for r in runs])),
            })
    for s in settings:
        s.pop("_bank")
    result = {
        "benchmark": "explore",
        "command": " ".join(["python benchmarks/explore.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg(),
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "common": {"bbox": a.bbox, "shifts": a.shifts or "milopyp", "mine_border_yx_z": [a.border, a.border_z], "match_radius": a.match_radius, "match_frac": a.match_frac,
                   "data_seed": a.data_seed, "pca_components": a.pca,
                   "recipe": {**recipe_of(a).to_dict(), "seeds": seeds}},
        "knn": f"k=5, stratified 5-fold CV repeated {a.cv_repeats} times (mean, std over repeats); "
               "'std' = standardised Euclidean, 'cos' = L2-normalised",
        "summary": [s["summary"] for s in settings],
        "settings": settings,
        "speed": speed,
        "total_run_s": round(time.perf_counter() - t_all, 1),
    }
    if a.preset == "lookalike":
        result["lookalike_table"] = lookalike_table([s["summary"] for s in settings])
        print(json.dumps(result["lookalike_table"], indent=2))
    else:
        print(json.dumps(result["summary"], indent=2))
    print(json.dumps(speed, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
