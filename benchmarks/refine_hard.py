"""Benchmark: the refinement picker on the hard synthetic setting, next to the baselines (issue 15).

Data: ``milotile synth --preset hard`` (three 128x256x256 tomograms at 10 Å, WBP of ±60° tilts with
CTF, SNR 0.1, four species of radius 12/9/7/5 with seed-drawn shapes, 20 each per tomogram,
similar-sized crowders, membranes, a filament, gold, an intensity gradient).

Protocol (as the issue's private test): label 6 particles of one species (30 %) in ``tomo_000``, or
6 in each tomogram (18), train through the public API (:func:`milotile.refine.train`), pick every
tomogram through the public API (:func:`milotile.refine.predict.pick`, the code the CLI runs) and
score all particles of that species (Hungarian matching within half the particle radius):

* **auto** — F1 at the threshold the recipe chooses by itself (the CLI's ``refine pick`` default:
  0.25 for the old recipes, the checkpoint's validation-chosen threshold for the new one);
* **best** — F1 at the best threshold (an oracle, for reference).

A picker with the shape check (:mod:`milotile.refine.shape`, the default) also gets ``*_noshape``
figures: the same peaks with the network's scores (``score_model``), the paired ablation of
``pick --no-shape-check``.

Baselines in the same run: a DoG of the particle's size told the true number of particles per
tomogram (sigmas ``r/2, r``; dark blobs), MiLoPYP's default DoG (sigmas 3, 5; threshold mean + 0.5 std;
NMS radius 7), and the previous milotile recipes (CLI defaults; the demo's ``tau 0.01, repeats 10,
start_filts 16``). ``--recipes`` selects which learned recipes run, so the same script prints the
ablation table. Several ``--seeds`` (data, labels and training) give mean and spread.

Example::

    nice python benchmarks/refine_hard.py --seeds 0 1 --species big small --labels 6 18

**F1 versus time** (``--curve``, issue 26): per seed one training of the first ``--species`` / ``--labels``
checkpointed at every ``--budgets`` epoch count (resumed, so a k-epoch picker is the first k epochs of the
longest run), each picked with ``--curve-picks`` (TTA views, bf16 autocast; the largest budget also with
``--curve-picks-last``): F1 at the automatic and best threshold, training and picking wall and CPU seconds,
voxels/s, and the label criterion the automatic threshold maximises (no ground truth: a candidate
early-stopping signal). ``--variants-of RUN...`` picks saved runs again with ``--curve-picks``, paired with
their own picks.

**Look-alike preset** (``--preset lookalike --settings 0 1 2 ...``, issue 23): ``synth --preset lookalike``
draws 8-12 species of radius 5-8 voxels in distinct shapes and the acquisition (size 100-200³, SNR
0.03-0.3, tilt ±40-70°, defocus, voxel size, thickness, crowding, contrast sign) from the *setting*; the
seed draws the content. Per setting and seed: three tomograms; the target species is drawn from
(setting, seed); 9 labels (3 per tomogram) train the default picker, and the same picker again with 9
negatives of other species (3 per tomogram, ``--negatives``); every peak is saved, so threshold rules can
be re-scored (``--rescore``) without retraining. Settings are split into *tuning* settings (defaults
may be chosen on them) and *report* settings (``--tune-settings``); the summary reports each group.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import milotile as mt  # noqa: E402
from milotile.metrics import evaluate, pr_curve  # noqa: E402
from milotile.refine import predict  # noqa: E402
from milotile.refine.threshold import AUTO_FLOOR, apply_auto_threshold  # noqa: E402
from milotile.synth import synth  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: Learned recipes: keyword arguments of ``refine.train`` (bbox is set from the species) and of
#: ``pick``; ``None`` as the pick threshold means "the picker's own choice" (the new default).
RECIPES: dict[str, dict] = {
    "cli_defaults_v0": {"train": {"epochs": 10, "tau": 0.1, "repeats": 1, "arch_config": {"start_filts": 32},
                                  "contrastive": True, "legacy": True}, "pick": {"threshold": 0.25}},
    "demo_v0": {"train": {"epochs": 10, "tau": 0.01, "repeats": 10, "arch_config": {"start_filts": 16},
                          "contrastive": True, "legacy": True}, "pick": {"threshold": 0.25}},
    # session 2's defaults (6 epochs, 8-slice crops, head z dilation 1, no TTA), threshold by the current rule
    "defaults_v1": {"train": {"epochs": 6, "tta": 1, "crop": [8, 64, 64], "arch_config": {"z_dilation": 1}}, "pick": {}},
    "defaults": {"train": {}, "pick": {}},
    "negatives": {"train": {"negatives": True}, "pick": {}},
}


def _load(p: str) -> dict:
    return json.loads(Path(p).read_text())


def make_data(work: Path, seed: int, snr: float | None) -> tuple[object, pd.DataFrame]:
    """Synthesise (once per seed) and ingest the hard collection."""
    d = work / (f"hard_s{seed}" if snr is None else f"hard_s{seed}_snr{snr}")
    store = d / "store.zarr"
    if not (d / "ground_truth.parquet").exists():
        synth(d, seed=seed, preset="hard", snr=snr)
    if store.exists():
        col = mt.open(store)
    else:
        col = mt.ingest(d / "tomograms.txt", store, overwrite=True)
    return col, pd.read_parquet(d / "ground_truth.parquet")


def choose_labels(gt: pd.DataFrame, species: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` = 6: six of the species in tomo_000; 18: six in each tomogram."""
    rng = np.random.default_rng(seed)
    sp = gt[gt["species"] == species]
    names = sorted(sp["tomogram"].unique())
    per = 6
    use = names[:1] if n <= per else names[: n // per]
    rows = []
    for name in use:
        g = sp[sp["tomogram"] == name]
        rows.append(g.iloc[np.sort(rng.choice(len(g), min(per, len(g)), replace=False))])
    return pd.concat(rows)[["tomogram", "x", "y", "z"]].reset_index(drop=True)


def scores(picks: pd.DataFrame, true: pd.DataFrame, match_r: float, thr: float | None) -> dict:
    """F1/P/R at ``thr`` and at the best threshold."""
    out: dict = {}
    if thr is not None:
        r = evaluate(picks, true, match_r, by="tomogram", threshold=thr).iloc[-1]
        out.update(auto_threshold=round(float(thr), 4), f1_auto=round(float(r["f1"]), 4),
                   p_auto=round(float(r["precision"]), 4), r_auto=round(float(r["recall"]), 4))
    if len(picks):
        c = pr_curve(picks, true, match_r, by="tomogram", max_thresholds=150)
        b = c.iloc[int(np.argmax(c["f1"].to_numpy()))]
        out.update(f1_best=round(float(b["f1"]), 4), best_threshold=round(float(b["threshold"]), 4),
                   p_best=round(float(b["precision"]), 4), r_best=round(float(b["recall"]), 4))
    else:
        out.update(f1_best=0.0)
    return out


#: Look-alike settings on which defaults may be chosen; every other setting is reported only.
TUNE_SETTINGS = (0, 1, 2)


def make_lookalike(work: Path, setting: int, seed: int) -> tuple[object, pd.DataFrame, dict]:
    """Synthesise (once) and ingest look-alike setting ``setting`` with content seed ``seed``: enough tomograms
    (at least 3) for 27 particles of each species, so that the 9 labels (in the first three) are a third
    of the target's particles whatever the setting's volume size."""
    from milotile.synth.lookalike import draw_setting

    d = work / f"la_set{setting}_s{seed}"
    store = d / "store.zarr"
    if not (d / "ground_truth.parquet").exists():
        n = max(3, int(np.ceil(27 / draw_setting(setting).particles_per_species)))
        synth(d, preset="lookalike", setting=setting, seed=seed, n_tomograms=n)
    col = mt.open(store) if store.exists() else mt.ingest(d / "tomograms.txt", store, overwrite=True)
    return col, pd.read_parquet(d / "ground_truth.parquet"), json.loads((d / "synth.json").read_text())


def lookalike_labels(gt: pd.DataFrame, setting: int, seed: int, per_tomogram: int = 3
                     ) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """The target species of (setting, seed), ``per_tomogram`` labels of it in each of the first three
    tomograms, and as many negatives drawn from the other species there (never from the target)."""
    rng = np.random.default_rng([setting, seed, 7])
    species = sorted(gt["species"].unique())
    target = str(species[int(rng.integers(len(species)))])
    lab, neg = [], []
    first = sorted(gt["tomogram"].unique())[:3]
    for _, g in gt[gt["tomogram"].isin(first)].groupby("tomogram", sort=True):
        t, o = g[g["species"] == target], g[g["species"] != target]
        lab.append(t.iloc[np.sort(rng.choice(len(t), min(per_tomogram, len(t)), replace=False))])
        neg.append(o.iloc[np.sort(rng.choice(len(o), min(per_tomogram, len(o)), replace=False))])
    cols = ["tomogram", "x", "y", "z"]
    return target, pd.concat(lab)[cols].reset_index(drop=True), pd.concat(neg)[cols].reset_index(drop=True)


def run_lookalike(work: Path, setting: int, seed: int, recipes: dict) -> list[dict]:
    """Every recipe on one look-alike (setting, seed); ``"negatives": true`` in a recipe adds the negatives."""
    col, gt, info = make_lookalike(work, setting, seed)
    target, labels, negatives = lookalike_labels(gt, setting, seed)
    r = float(gt.loc[gt["species"] == target, "radius"].iloc[0])
    base = {"preset": "lookalike", "setting": setting, "seed": seed, "species": target, "n_labels": len(labels),
            "tune": setting in TUNE_SETTINGS, "snr": info["snr"], "size": info["size"][0],
            "tilt_max": info["angles"][-1], "contrast": info["contrast"], "n_species": len(info["species"]),
            "family": info["species"][target]["family"]}
    out = []
    for name, rc in recipes.items():
        rc = json.loads(json.dumps(rc))
        neg = rc.get("train", {}).pop("negatives", False)
        res = run_learned(col, gt, target, labels, rc, work / f"run_la{setting}_s{seed}_{name}", seed,
                          negatives=negatives if neg else None, bbox=2 * r)
        out.append({**base, "method": name, "n_negatives": len(negatives) if neg else 0, **res})
        print(out[-1], flush=True)
    return out


def dog_baselines(col, gt: pd.DataFrame, species: str) -> dict:
    """DoG of the right size told the true count, and MiLoPYP's default DoG."""
    from milotile.ops.peaks import dog_peaks

    sp = gt[gt["species"] == species]
    r = float(sp["radius"].iloc[0])
    true = sp[["tomogram", "x", "y", "z"]]
    out = {}
    for label, sig, kw in (("dog_true_count", (r / 2, r), {"min_distance": r, "border": (2, 4, 4), "threshold_std": -10.0}),
                           ("dog_milopyp_default", (3.0, 5.0), {})):
        rows = []
        for n in col.names:
            pk = dog_peaks(col[n].data(0), sig, **kw).assign(tomogram=n)
            if label == "dog_true_count":
                pk = pk.nlargest(int((sp["tomogram"] == n).sum()), "score")
            rows.append(pk[["tomogram", "x", "y", "z", "score"]])
        pk = pd.concat(rows, ignore_index=True)
        out[label] = scores(pk, true, r / 2, float(pk["score"].min()) if len(pk) else 0.0)
    return out


def run_learned(col, gt: pd.DataFrame, species: str, labels: pd.DataFrame, recipe: dict, run: Path,
                seed: int, negatives: pd.DataFrame | None = None, bbox: float | None = None) -> dict:
    sp = gt[gt["species"] == species]
    r = float(sp["radius"].iloc[0])
    true = sp[["tomogram", "x", "y", "z"]]
    if run.exists():
        shutil.rmtree(run)
    kw = dict(recipe.get("train", {}))
    legacy = kw.pop("legacy", False)
    if legacy:  # the previous defaults, spelled out: no TTA, a held-out region with >= 10 labels
        kw = {"tta": 1, "val_fraction": 0.2 if len(labels) >= 10 else 0.0, **kw}
    t0 = time.perf_counter()
    kw.setdefault("bbox", 2 * r if bbox is None else bbox)
    picker = mt.refine.train(col, labels, out=run, seed=seed, device="cpu", negatives=negatives, **kw)
    t_train = time.perf_counter() - t0
    recs = mt.nn.RunLog(run).records()
    s_epoch = float(np.median([x["seconds"] for x in recs])) if recs else float("nan")
    pk_kw = dict(recipe.get("pick", {}))
    thr = pk_kw.pop("threshold", None)
    t0 = time.perf_counter()
    allp = predict.pick(col, picker, threshold=0.0, write_heatmaps=False, table=None, **pk_kw)
    t_pick = time.perf_counter() - t0
    allp.to_parquet(run / "picks_all.parquet")
    labels.to_parquet(run / "labels.parquet")
    if negatives is not None:
        negatives.to_parquet(run / "negatives.parquet")
    if thr is None:  # what pick(threshold=None) does, applied to the same peaks
        auto = float(apply_auto_threshold(allp, picker.contract)[1]["particle"]["threshold"])
    else:
        auto = float(thr)
    res = scores(allp, true, r / 2, auto)
    if thr is None:
        res.update(threshold_variants(allp, picker.contract, true, r))
    if "score_model" in allp:  # the same peaks without the shape check (paired ablation)
        raw = allp.assign(score=allp["score_model"])
        raw_auto = float(apply_auto_threshold(raw, picker.contract)[1]["particle"]["threshold"]) if thr is None else auto
        res.update({f"{k}_noshape": v for k, v in scores(raw, true, r / 2, raw_auto).items()})
    res.update(train_s=round(t_train, 1), s_per_epoch=round(s_epoch, 2), pick_s=round(t_pick, 1),
               n_epochs=len(recs), threshold_source="fixed" if thr is not None else "auto")
    return res


def threshold_variants(picks: pd.DataFrame, contract: dict, true: pd.DataFrame, r: float) -> dict:
    """F1 at the automatic threshold of each label-score calibration rule (issue 23), paired on the same peaks:
    ``f1_auto_fixed`` is the fixed label shift (``calibration="off"``, the rule of pickers without a
    calibration), ``f1_auto_<rule>`` each of :data:`milotile.refine.threshold.CALIBRATION_RULES`; plus the
    calibration's own cost (``calibration_s``) and its held-out / trained label scores."""
    from milotile.refine.threshold import CALIBRATION_RULES

    cal = contract.get("calibration") or {}
    out: dict = {}
    for rule in ("off", *(CALIBRATION_RULES if cal else ())):
        t = float(apply_auto_threshold(picks, contract, calibration=rule)[1]["particle"]["threshold"])
        key = "fixed" if rule == "off" else rule
        out[f"f1_auto_{key}"] = scores(picks, true, r / 2, t)["f1_auto"]
        out[f"threshold_{key}"] = round(t, 4)
    if cal:
        rec = next(iter(cal.get("classes", {}).values()), {})
        out.update(calibration_s=cal.get("seconds"), calibration_epoch=cal.get("epoch"),
                   cal_held_out=rec.get("held_out"), cal_trained=rec.get("trained"))
    return out


def run_multi(col, gt: pd.DataFrame, species: list[str], seed: int, run: Path,
              labels: pd.DataFrame | None = None, negatives: pd.DataFrame | None = None) -> dict:
    """One picker for several species (``classes=True``; default labels: 6 of each in tomo_000): per-class F1
    at the automatic threshold, the mean over classes, and the confusion matrix (picks of class A matched to
    particles of species B, plus ``none``: picks on no particle of the listed species)."""
    if run.exists():
        shutil.rmtree(run)
    if labels is None:
        labels = pd.concat([choose_labels(gt, sp, 6, seed).assign(**{"class": sp}) for sp in species], ignore_index=True)
    bbox = 2 * float(gt[gt["species"].isin(species)].groupby("species")["radius"].first().mean())
    t0 = time.perf_counter()
    picker = mt.refine.train(col, labels, bbox=bbox, classes=True, out=run, seed=seed, device="cpu", negatives=negatives)
    t_train = time.perf_counter() - t0
    picks = predict.pick(col, picker, write_heatmaps=False, table=None)  # automatic threshold per class
    out: dict = {"train_s": round(t_train, 1), "n_labels": len(labels), "thresholds": picks.attrs.get("thresholds", {}),
                 "confusion": {}}
    f1s = []
    for cls in species:
        p = picks[picks["class"] == cls]
        row = {}
        for sp in species:
            t = gt[gt["species"] == sp]
            e = evaluate(p, t[["tomogram", "x", "y", "z"]], float(t["radius"].iloc[0]) / 2, by="tomogram").iloc[-1]
            row[sp] = int(e["tp"])
        row["none"] = max(int(len(p)) - sum(row.values()), 0)
        out["confusion"][cls] = {"n_picks": int(len(p)), "matched_to": row}
        t = gt[gt["species"] == cls]
        e = evaluate(p, t, float(t["radius"].iloc[0]) / 2, by="tomogram").iloc[-1]
        out[f"f1_{cls}"] = round(float(e["f1"]), 4)
        f1s.append(float(e["f1"]))
    out["f1_mean"] = round(float(np.mean(f1s)), 4)
    out["f1_worst"] = round(float(np.min(f1s)), 4)
    return out


def run_lookalike_multi(work: Path, setting: int, seed: int, per_tomogram: int = 3) -> dict:
    """One picker for every species of a look-alike (setting, seed): ``per_tomogram`` labels of each species in
    each of the first three tomograms (9 per species), per-species F1 and the confusion matrix."""
    col, gt, info = make_lookalike(work, setting, seed)
    rng = np.random.default_rng([setting, seed, 11])
    species = sorted(gt["species"].unique())
    rows = []
    first = sorted(gt["tomogram"].unique())[:3]
    for (_, sp), g in gt[gt["tomogram"].isin(first)].groupby(["tomogram", "species"], sort=True):
        rows.append(g.iloc[np.sort(rng.choice(len(g), min(per_tomogram, len(g)), replace=False))].assign(**{"class": sp}))
    labels = pd.concat(rows)[["tomogram", "x", "y", "z", "class"]].reset_index(drop=True)
    res = run_multi(col, gt, species, seed, work / f"run_la{setting}_s{seed}_multi", labels=labels)
    return {"preset": "lookalike", "setting": setting, "seed": seed, "tune": setting in TUNE_SETTINGS,
            "snr": info["snr"], "n_species": len(species), **res}


def summarise(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    if "setting" in df:
        return summarise_lookalike(df)
    keys = ["species", "n_labels", "method"]
    vals = [c for c in ("f1_auto", "f1_best", "p_auto", "r_auto", "f1_auto_noshape", "f1_best_noshape", "f1_auto_fixed",
                        "f1_auto_union", "f1_auto_held_out", "f1_auto_rank_shift", "train_s") if c in df]
    g = df.groupby(keys)[vals]
    mean, std = g.mean(), g.std().fillna(0.0)
    out = mean.round(3).astype(str) + " ± " + std.round(3).astype(str)
    out["n_seeds"] = g.size()
    return out.reset_index()


def summarise_lookalike(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and settings group (tune / report): mean and worst setting of F1 at the automatic and at
    the best threshold, and of their gap (each setting's value is its mean over seeds)."""
    df = df.assign(gap=df["f1_best"] - df["f1_auto"], group=np.where(df["tune"], "tune", "report"))
    variants = [c for c in df if c.startswith("f1_auto_") and not c.endswith("_noshape") and "margin" not in c]
    for c in variants:  # the gap of every threshold variant recorded (threshold_variants)
        df[f"gap_{c[len('f1_auto_'):]}"] = df["f1_best"] - df[c]
    gaps = [f"gap_{c[len('f1_auto_'):]}" for c in variants]
    per = df.groupby(["method", "group", "setting"])[["f1_auto", "f1_best", "gap", "train_s", *gaps]].mean()
    rows = []
    for (method, group), g in per.groupby(level=[0, 1]):
        rows.append({"method": method, "settings": group, "n_settings": len(g),
                     "f1_auto_mean": round(g["f1_auto"].mean(), 3), "f1_auto_worst": round(g["f1_auto"].min(), 3),
                     "f1_best_mean": round(g["f1_best"].mean(), 3), "gap_mean": round(g["gap"].mean(), 3),
                     "gap_worst": round(g["gap"].max(), 3), "train_s_mean": round(g["train_s"].mean(), 1),
                     **{f"{k}_mean": round(g[k].mean(), 3) for k in gaps},
                     **{f"{k}_worst": round(g[k].max(), 3) for k in gaps}})
    return pd.DataFrame(rows)


def saved_run(run: Path) -> dict:
    """What a saved picker run (``run_s<seed>_<species>_<n>_<recipe>`` of the hard preset or
    ``run_la<setting>_s<seed>_<recipe>`` of the look-alike preset) was trained and is scored on: ``labels``,
    ``data`` (the collection's folder, beside the run), ``species``, ``true`` (its particles: ``tomogram, x, y,
    z``), ``radius``, ``seed``, ``setting`` (None on the hard preset) and ``method`` (the recipe's name). A
    ``target.txt`` in the run names its species instead (runs trained for another target, such as the pickers of
    ``benchmarks/label_free.py``)."""
    labels = pd.read_parquet(run / "labels.parquet")
    if run.name.startswith("run_la"):
        tag, seed, name = run.name[len("run_"):].split("_", 2)  # la<setting>, s<seed>, recipe
        setting: int | None = int(tag[2:])
        data = run.parent / f"la_set{setting}_{seed}"
        gt = pd.read_parquet(data / "ground_truth.parquet")
        species = lookalike_labels(gt, int(setting), int(seed[1:]))[0]
    else:
        _, seed, species, _, name = run.name.split("_", 4)
        setting = None
        data = run.parent / f"hard_{seed}"
        gt = pd.read_parquet(data / "ground_truth.parquet")
    if (run / "target.txt").exists():  # a picker trained for another target (e.g. the label-free chain's)
        species = (run / "target.txt").read_text().strip()
    sp = gt[gt["species"] == species]
    return {"labels": labels, "data": data, "species": species, "true": sp[["tomogram", "x", "y", "z"]],
            "radius": float(sp["radius"].iloc[0]), "seed": int(seed[1:]), "setting": setting, "method": name}


def rescore(runs: list[str], out_json: str, refit_shape: bool = False, margins: list[float] | None = None) -> int:
    """Scores of saved runs (their ``picks_all.parquet``, labels and checkpoint) with the current
    automatic-threshold code; the same numbers :func:`run_learned` prints, without retraining.

    The data are read from the run's folder (``<run>/../hard_s<seed>``). With ``refit_shape`` (or a
    checkpoint without one) the shape check is fitted to the run's labels with the library's
    :func:`milotile.refine.shape.fit_shape_models` and applied to the network's saved scores with
    :func:`milotile.refine.shape.apply_shape_check`, as ``pick`` does. ``margins``: also F1 at the
    automatic threshold for each of these label margins (``f1_margin_<m>``; the default is
    :data:`milotile.refine.threshold.LABEL_MARGIN`), and their means."""
    from milotile.nn.checkpoint import load_checkpoint
    from milotile.ops.volume_reader import VolumeReader
    from milotile.refine.shape import check_shapes, fit_shape_references
    from milotile.stages.preprocess import volume_stats

    records = []
    for r in runs:
        run = Path(r)
        saved = saved_run(run)
        labels, data, species, seed, name = saved["labels"], saved["data"], saved["species"], saved["seed"], saved["method"]
        true, rad, n = saved["true"], saved["radius"], len(labels)
        contract = load_checkpoint(run / ("best.pt" if (run / "best.pt").exists() else "last.pt"))["contract"]
        allp = pd.read_parquet(run / "picks_all.parquet")
        raw = allp.assign(score=allp["score_model"]) if "score_model" in allp else allp
        raw = raw.drop(columns=[c for c in ("score_model", "shape_d2") if c in raw])
        refit = refit_shape or not contract.get("shape")
        if refit:
            col = mt.open(data / "store.zarr")
            names = sorted(set(labels["tomogram"]))
            readers = {t: VolumeReader(col[t].data(0), t) for t in names}
            stds = {t: volume_stats(col, t)[1] for t in names}
            contract = {**contract, "shape": fit_shape_references(readers, stds, labels, contract["classes"],
                                                                  float(contract["bbox"]) / 2)}
            allp = check_shapes(col, raw[raw["score"] >= AUTO_FLOOR].reset_index(drop=True), contract)
        auto = float(apply_auto_threshold(allp, contract)[1]["particle"]["threshold"])
        res = scores(allp, true, rad / 2, auto)
        res.update(threshold_variants(allp, contract, true, rad))
        raw_auto = float(apply_auto_threshold(raw, contract)[1]["particle"]["threshold"])
        res.update({f"{k}_noshape": v for k, v in scores(raw, true, rad / 2, raw_auto).items()})
        for m in margins or []:
            t_m = float(apply_auto_threshold(allp, contract, margin=m)[1]["particle"]["threshold"])
            res[f"f1_margin_{m:g}"] = scores(allp, true, rad / 2, t_m)["f1_auto"]
        recs = mt.nn.RunLog(run).records()
        res.update(s_per_epoch=round(float(np.median([x["seconds"] for x in recs])), 2), n_epochs=len(recs),
                   train_s=round(float(sum(x["seconds"] for x in recs)), 1),  # the epochs' time (no set-up)
                   rescored_from=str(run), shape_refitted=bool(refit))
        la = {"setting": saved["setting"], "tune": saved["setting"] in TUNE_SETTINGS} if saved["setting"] is not None else {}
        records.append({"seed": seed, "species": species, "n_labels": int(n), "method": name, **res, **la})
        print(records[-1], flush=True)
    out = {"command": " ".join(["python benchmarks/refine_hard.py --rescore", *runs]), "load_avg": os.getloadavg(),
           "wall_s": 0.0, "recipes": {}, "records": records, "summary": summarise(records).to_dict(orient="records")}
    if margins:
        out["margin_means"] = {f"{m:g}": round(float(np.mean([r[f"f1_margin_{m:g}"] for r in records])), 3)
                               for m in margins}
        print("mean F1 per label margin:", out["margin_means"], flush=True)
    Path(out_json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def merge(paths: list[str], out_json: str) -> int:
    """Combine result files of separate runs (e.g. run in parallel) into one summary."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    records = [r for p in parts for r in p["records"]]
    table = summarise(records)
    print(table.to_string(index=False))
    out = {"merged_from": [p["command"] for p in parts], "load_avg": [p["load_avg"] for p in parts],
           "wall_s": [p["wall_s"] for p in parts], "recipes": {k: v for p in parts for k, v in p["recipes"].items()},
           "records": records, "summary": table.to_dict(orient="records"),
           "multi": {k: v for p in parts for k, v in p.get("multi", {}).items()}}
    Path(out_json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


# --------------------------------------------------------------------------- F1 versus time (issue 26)
#: Epoch budgets of the curve: one training run, resumed at each budget, a checkpoint kept per budget.
CURVE_BUDGETS = (6, 8, 10, 12, 15, 20)
#: Pick variants of the curve: in-plane TTA views and bf16 autocast on a CPU with AMX / AVX512-BF16.
CURVE_PICKS = {"tta4_fp32": {"tta": 4, "cpu_bf16": False}, "tta4_bf16": {"tta": 4, "cpu_bf16": True},
               "tta2_bf16": {"tta": 2, "cpu_bf16": True}, "tta1_fp32": {"tta": 1, "cpu_bf16": False},
               "tta1_bf16": {"tta": 1, "cpu_bf16": True}}


def _cpu_s() -> float:
    """CPU seconds (user + sys) of this process: torch's threads run in it (``device="cpu"``, no Dask workers)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def label_criterion(picks: pd.DataFrame, contract: dict) -> float:
    """Lee & Liu's PU criterion ``max_t r(t)^2 / N(t)`` of the labelled tomograms' peaks, times the number of
    labels: the quantity the automatic threshold maximises (:mod:`milotile.refine.threshold`), computed without
    the ground truth, so it could stop training early. 1 = every label at a peak, with no other peak above it."""
    from milotile.refine.threshold import label_scores

    labels = pd.DataFrame(contract.get("train_labels") or [], columns=["tomogram", "x", "y", "z", "class"])
    if not len(labels) or not len(picks):
        return 0.0
    own = picks[picks["tomogram"].isin(set(labels["tomogram"]))]
    ls = np.sort(label_scores(own, labels, float(contract.get("bbox", 16)) / 4.0))
    peaks = np.sort(own["score"].to_numpy(np.float64))
    n, best = len(ls), 0.0
    for k, t in enumerate(ls):
        if t <= 0:
            continue
        above = len(peaks) - int(np.searchsorted(peaks, t, side="left"))
        best = max(best, ((n - k) / n) ** 2 / max(above, 1))
    return round(float(best * n), 4)


def curve_train(col, labels: pd.DataFrame, run: Path, seed: int, bbox: float, budgets: list[int],
                train_kw: dict) -> Iterator[dict]:
    """Train once up to ``max(budgets)`` epochs, resuming the same run at each budget (the epochs a k-epoch run
    trains are those of the first k of a longer run: no schedule depends on the total), and yield each
    budget's checkpoint as soon as it is trained. Time per budget: the first call's set-up plus the epochs' own
    seconds (resumed calls repeat the set-up, which a k-epoch run pays once); CPU seconds scaled the same way."""
    if run.exists():
        shutil.rmtree(run)
    wall_all, cpu_all, setup = 0.0, 0.0, None
    done = 0
    for b in sorted(budgets):
        t0, c0 = time.perf_counter(), _cpu_s()
        mt.refine.train(col, labels, out=run, seed=seed, device="cpu", bbox=bbox, epochs=b, resume=done > 0,
                        **train_kw)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        recs = mt.nn.RunLog(run).records()
        epoch_s = sum(float(r["seconds"]) for r in recs[done:b])
        if setup is None:
            setup = wall - epoch_s
        wall_all += epoch_s + (setup if done == 0 else 0.0)
        cpu_all += cpu * (epoch_s + (setup if done == 0 else 0.0)) / max(wall, 1e-9)
        shutil.copy2(run / "last.pt", run / f"epoch{b}.pt")
        rec = {"epochs": b, "train_s": round(wall_all, 1), "train_cpu_s": round(cpu_all, 1), "setup_s": round(setup, 1),
               "train_load_avg_1m": round(os.getloadavg()[0], 2), "checkpoint": str(run / f"epoch{b}.pt")}
        print("curve train", rec, flush=True)
        done = b
        yield rec


def curve_pick(col, checkpoint: str, true: pd.DataFrame, r: float, variant: dict) -> dict:
    """Pick every tomogram in-process (the library's ``pick``, as the CLI) with one variant; F1 at the automatic
    threshold and at the best one, wall and CPU seconds, voxels per second, and the label criterion."""
    from milotile.refine.picker import Picker

    picker = Picker.load(checkpoint, device="cpu")
    picker.contract.update(variant)
    voxels = sum(int(np.prod(col[n].shape)) for n in col.names)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), _cpu_s()
    allp = predict.pick(col, picker, threshold=0.0, write_heatmaps=False, table=None)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    auto = float(apply_auto_threshold(allp, picker.contract)[1]["particle"]["threshold"])
    res = scores(allp, true, r / 2, auto)
    return {"f1_auto": res["f1_auto"], "f1_best": res.get("f1_best"), "p_auto": res["p_auto"], "r_auto": res["r_auto"],
            "pick_s": round(wall, 1), "pick_cpu_s": round(cpu, 1), "voxels": voxels,
            "mvoxels_per_s": round(voxels / wall / 1e6, 3), "mvoxels_per_cpu_s": round(voxels / max(cpu, 1e-9) / 1e6, 3),
            "label_criterion": label_criterion(allp, picker.contract), "load_avg_1m": [round(load0, 2),
                                                                                      round(os.getloadavg()[0], 2)]}


def run_curve(work: Path, seeds: list[int], species: str, n_labels: int, budgets: list[int], picks_all: list[str],
              picks_each: list[str], train_kw: dict, snr: float | None) -> list[dict]:
    """F1 versus time: per seed one training run checkpointed at every epoch budget; every budget picked with
    the ``picks_each`` variants, the largest budget also with ``picks_all``."""
    records = []
    for seed in seeds:
        col, gt = make_data(work, seed, snr)
        labels = choose_labels(gt, species, n_labels, seed)
        sp = gt[gt["species"] == species]
        r = float(sp["radius"].iloc[0])
        true = sp[["tomogram", "x", "y", "z"]]
        for tr in curve_train(col, labels, work / f"curve_s{seed}_{species}_{n_labels}", seed, 2 * r, budgets,
                              train_kw):
            names = list(dict.fromkeys(picks_each + (picks_all if tr["epochs"] == max(budgets) else [])))
            for name in names:
                res = curve_pick(col, tr["checkpoint"], true, r, CURVE_PICKS[name])
                records.append({"seed": seed, "species": species, "n_labels": n_labels, "method": f"e{tr['epochs']}_{name}",
                                "pick": name, **{k: v for k, v in tr.items() if k != "checkpoint"}, **res,
                                "train_kw": train_kw})
                print("curve", records[-1], flush=True)
    return records


def run_variants(runs: list[str], variants: list[str]) -> list[dict]:
    """Pick variants on saved runs (``run_s<seed>_<species>_<n>_<recipe>`` folders with ``picks_all.parquet`` and
    ``best.pt``/``last.pt``, data in ``../hard_s<seed>``): the run's own picks re-scored, then the same network
    picked with each variant; paired F1 and CPU time (``refine_pick_variants_paired.json`` was made this way)."""
    from milotile.refine.picker import Picker

    records = []
    for r in runs:
        run = Path(r)
        _, seed, species, n, _name = run.name.split("_", 4)
        data = run.parent / f"hard_{seed}"
        gt = pd.read_parquet(data / "ground_truth.parquet")
        sp = gt[gt["species"] == species]
        true, rad = sp[["tomogram", "x", "y", "z"]], float(sp["radius"].iloc[0])
        ckpt = run / ("best.pt" if (run / "best.pt").exists() else "last.pt")
        picker = Picker.load(ckpt, device="cpu")
        allp = pd.read_parquet(run / "picks_all.parquet")
        auto = float(apply_auto_threshold(allp, picker.contract)[1]["particle"]["threshold"])
        res = scores(allp, true, rad / 2, auto)
        base = {"seed": int(seed[1:]), "species": species, "n_labels": int(n), "run": str(run)}
        records.append({**base, "pick": f"saved (tta {picker.contract.get('tta')}, cpu_bf16 "
                        f"{bool(picker.contract.get('cpu_bf16', False))})", "f1_auto": res["f1_auto"],
                        "f1_best": res.get("f1_best"), "label_criterion": label_criterion(allp, picker.contract)})
        print("variants", records[-1], flush=True)
        col = mt.open(data / "store.zarr")
        for v in variants:
            records.append({**base, "pick": v, **curve_pick(col, str(ckpt), true, rad, CURVE_PICKS[v])})
            print("variants", records[-1], flush=True)
    return records


def summarise_curve(records: list[dict]) -> pd.DataFrame:
    """Mean over seeds per (epochs, pick variant): F1, training and picking time."""
    df = pd.DataFrame(records)
    cols = ["f1_auto", "f1_best", "train_s", "train_cpu_s", "pick_s", "pick_cpu_s", "mvoxels_per_s",
            "mvoxels_per_cpu_s", "label_criterion"]
    g = df.groupby(["epochs", "pick"])[cols]
    out = g.mean().round(3)
    out["n_seeds"] = g.size()
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("hard", "lookalike"), default="hard")
    ap.add_argument("--settings", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7],
                    help=f"look-alike settings (tuning settings: {','.join(map(str, TUNE_SETTINGS))})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--species", nargs="+", default=["big", "small"])
    ap.add_argument("--labels", type=int, nargs="+", default=[6, 18])
    ap.add_argument("--recipes", nargs="*", default=["defaults", "demo_v0", "cli_defaults_v0"],
                    help=f"learned recipes ({', '.join(RECIPES)}) or NAME=JSON for an ablation")
    ap.add_argument("--no-dog", action="store_true")
    ap.add_argument("--multi", default=None, metavar="A,B",
                    help="also train one picker for these species (lookalike: --multi all, every species)")
    ap.add_argument("--rescore", nargs="+", default=None, metavar="RUN",
                    help="re-score saved runs (run_s<seed>_<species>_<n>_<recipe> folders) with the current threshold code")
    ap.add_argument("--refit-shape", action="store_true",
                    help="with --rescore: fit the shape check to the run's labels again (runs saved before it existed)")
    ap.add_argument("--margins", type=float, nargs="+", default=None, metavar="M",
                    help="with --rescore: also F1 at the automatic threshold for these label margins (logit units)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="only merge earlier result files")
    ap.add_argument("--snr", type=float, default=None, help="override the preset's SNR (0.1)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 when sharing the machine)")
    ap.add_argument("--curve", action="store_true",
                    help="F1 versus time: one training per seed checkpointed at --budgets epochs, each picked with "
                    "--curve-picks (the largest budget also with --curve-picks-last); first --species and --labels")
    ap.add_argument("--budgets", type=int, nargs="+", default=list(CURVE_BUDGETS), help="epoch budgets of --curve")
    ap.add_argument("--curve-picks", nargs="+", default=["tta1_bf16"], choices=list(CURVE_PICKS))
    ap.add_argument("--curve-picks-last", nargs="*", default=list(CURVE_PICKS), choices=list(CURVE_PICKS))
    ap.add_argument("--curve-train", default="{}", metavar="JSON", help="extra refine.train keywords of --curve")
    ap.add_argument("--variants-of", nargs="+", default=None, metavar="RUN",
                    help="pick saved runs (run_s<seed>_<species>_<n>_<recipe>) again with --curve-picks, paired with "
                    "their own picks")
    ap.add_argument("--workdir", default="/tmp/refine_hard")
    ap.add_argument("--json", default=str(RESULTS / "refine_hard.json"))
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.rescore:
        return rescore(args.rescore, args.json, args.refit_shape, args.margins)
    if args.variants_of:
        import torch

        torch.set_num_threads(args.threads)
        recs = run_variants(args.variants_of, args.curve_picks)
        cmd = " ".join(["python benchmarks/refine_hard.py", *(argv if argv is not None else sys.argv[1:])])
        Path(args.json).write_text(json.dumps({"command": cmd, "load_avg": os.getloadavg(), "records": recs}, indent=2,
                                              default=str) + "\n")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    recipes = {}
    for spec in args.recipes:
        if "=" in spec:
            name, js = spec.split("=", 1)
            recipes[name] = json.loads(js)
        else:
            recipes[spec] = RECIPES[spec]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.curve:
        return main_curve(args, work, argv)
    records = []
    t_start = time.perf_counter()
    if args.preset == "lookalike":
        for setting in args.settings:
            for seed in args.seeds:
                records += run_lookalike(work, setting, seed, recipes)
    for seed in args.seeds if args.preset == "hard" else []:
        col, gt = make_data(work, seed, args.snr)
        for species in args.species:
            if not args.no_dog:
                for m, res in dog_baselines(col, gt, species).items():
                    for nl in args.labels:
                        records.append({"seed": seed, "species": species, "n_labels": nl, "method": m, **res})
                    print(seed, species, m, res, flush=True)
            for nl in args.labels:
                labels = choose_labels(gt, species, nl, seed)
                for name, rc in recipes.items():
                    res = run_learned(col, gt, species, labels, rc, work / f"run_s{seed}_{species}_{nl}_{name}", seed)
                    records.append({"seed": seed, "species": species, "n_labels": nl, "method": name, **res})
                    print(seed, species, nl, name, res, flush=True)
    multi = {}
    if args.multi and args.preset == "lookalike":
        for setting in args.settings:
            for seed in args.seeds:
                multi[f"la{setting}_s{seed}"] = run_lookalike_multi(work, setting, seed)
                print("multi", setting, seed, multi[f"la{setting}_s{seed}"], flush=True)
    elif args.multi:
        for seed in args.seeds:
            col, gt = make_data(work, seed, args.snr)
            multi[str(seed)] = run_multi(col, gt, args.multi.split(","), seed, work / f"run_s{seed}_multi")
            print("multi", seed, multi[str(seed)], flush=True)
    table = summarise(records) if records else pd.DataFrame()
    print(table.to_string(index=False))
    out = {"command": " ".join(["python benchmarks/refine_hard.py", *(argv if argv is not None else sys.argv[1:])]),
           "load_avg": os.getloadavg(), "wall_s": round(time.perf_counter() - t_start, 1),
           "recipes": recipes, "records": records, "summary": table.to_dict(orient="records"), "multi": multi}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def main_curve(args: argparse.Namespace, work: Path, argv: list[str] | None) -> int:
    """``--curve``: records, the per-(epochs, pick) summary and the load average to ``--json``."""
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    records = run_curve(work, args.seeds, args.species[0], args.labels[0], args.budgets, args.curve_picks_last,
                        args.curve_picks, json.loads(args.curve_train), args.snr)
    table = summarise_curve(records)
    print(table.to_string(index=False))
    out = {"command": " ".join(["python benchmarks/refine_hard.py", *(argv if argv is not None else sys.argv[1:])]),
           "load_avg_start": load0, "load_avg_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t_start, 1),
           "threads": args.threads, "records": records, "summary": table.to_dict(orient="records")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
