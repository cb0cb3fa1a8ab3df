"""Benchmark: the review loop (issue 25) with a simulated reviewer who answers from the ground truth.

Two parts (``--part loop browser``):

**loop** — data: ``synth --preset hard`` (or ``--preset lookalike --setting K``, as
``benchmarks/refine_hard.py`` makes them). Round 0: the default picker trained from 6 labels of the
target species in the first tomogram (``refine_hard.choose_labels`` / ``lookalike_labels``), every peak
down to score 0.05 picked; its F1 at the automatic threshold is the "0 verdicts" figure. Then for each
budget N (``--verdicts 20 50``), on the same round-0 picker:

* **review** — the first N items of the review queue (:func:`milotile.refine.review.review_order`:
  picks nearest the automatic threshold, every third one from the uniform random sample) are answered
  from the truth (a pick within half a particle radius of a target particle is accepted; otherwise
  rejected as "other species" when it lies on another species, else "junk"), stored through
  :class:`~milotile.refine.review.VerdictLog`, and :func:`milotile.refine.review.retrain` fine-tunes,
  picks and chooses the threshold from the reviewed sample (automatic threshold below 10 sample verdicts);
* **rethreshold** — the round-0 picks at the threshold the same sample chooses (no retraining);
* **random labels** — N more labels of the target drawn at random from the truth (what N more manual
  labels would buy), fine-tuned from the same round-0 picker with the same epochs, automatic threshold.

Reported: F1 / precision / recall (Hungarian matching within half the radius, ``refine_hard.scores``), the
best-threshold F1 for reference, the sample's estimated precision against the true precision (round-0
picks at their threshold and the new picks at the reviewed threshold), and the retrain + pick time of a
round on the CPU.

**browser** — ``--n-picks`` (10⁴) random picks over the hard tomograms, the review page in headless
Chromium: page load until the first thumbnail is shown, the next-thumbnail latency (arrow key to the
thumbnail displayed; thumbnails are prefetched), the verdict round trip (``y`` to the next thumbnail,
the verdict written into the store in between), each measured inside the page (the key event's time stamp
to the thumbnail in the DOM) and from Playwright (key press sent to the change seen; adds Playwright's
round trips and polling), and the server's cold thumbnail time (empty chunk cache).

Example::

    nice -n 10 python benchmarks/review.py --part browser loop --verdicts 20 50 --species small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import milotile as mt  # noqa: E402
from milotile.errors import InputError  # noqa: E402
from milotile.refine import predict  # noqa: E402
from milotile.refine.review import (  # noqa: E402
    VerdictLog,
    design_weights,
    estimate,
    rethreshold,
    retrain,
    review_order,
    reviewed_threshold,
    sample_threshold,
    sample_weights,
)
from milotile.refine.threshold import AUTO_FLOOR, apply_auto_threshold  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def answers(picks: pd.DataFrame, gt: pd.DataFrame, target: str) -> np.ndarray:
    """:func:`answer` for every pick at once (bool: accepted)."""
    out = np.zeros(len(picks), bool)
    for name, g in gt.groupby("tomogram"):
        rows = np.flatnonzero((picks["tomogram"] == name).to_numpy())
        if not len(rows):
            continue
        p = picks.iloc[rows][["x", "y", "z"]].to_numpy(np.float64)
        q = g[["x", "y", "z"]].to_numpy(np.float64)
        d = np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1))
        hit = (d <= g["radius"].to_numpy()[None, :] / 2.0) & (g["species"].to_numpy() == target)[None, :]
        out[rows] = hit.any(axis=1)
    return out


def answer(pick: pd.Series, gt: pd.DataFrame, target: str) -> tuple[str, str]:
    """The simulated reviewer: accept a pick on a target particle, else reject it with the reason."""
    g = gt[gt["tomogram"] == pick["tomogram"]]
    d = np.sqrt((g["x"] - pick["x"]) ** 2 + (g["y"] - pick["y"]) ** 2 + (g["z"] - pick["z"]) ** 2)
    hit = g[d <= g["radius"] / 2.0]
    if len(hit) and (hit["species"] == target).any():
        return "accept", ""
    near = g[d <= g["radius"]]
    return "reject", "other species" if len(near) else "junk"


def f1_at(picks: pd.DataFrame, true: pd.DataFrame, r: float, thr: float) -> dict:
    from refine_hard import scores

    return scores(picks, true, r / 2, thr)


def true_precision(picks: pd.DataFrame, true: pd.DataFrame, r: float, thr: float) -> float:
    from milotile.metrics import evaluate

    e = evaluate(picks, true, r / 2, by="tomogram", threshold=thr).iloc[-1]
    return float(e["precision"])


def label_free_start(args: argparse.Namespace, work: Path, seed: int, data_dir: Path, gt: pd.DataFrame,
                     target: str | None) -> tuple[object, str, pd.DataFrame, dict]:
    """Round 0 without a manual label: a copy of the data's store, mined (DoG), slab patches, a small explore
    encoder (``--explore-epochs``), the atlas, and the sub-clusters the documented rule chooses
    (:func:`milotile.explore.evaluate.enriched_clusters`: mostly on target centres; the truth stands in for
    the user's eye on the gallery), selected as labels -- the chain of ``benchmarks/label_free.py`` on the
    loop's data. Returns the copy's collection, the target, the selection's labels and its figures."""
    from label_free import findable_target, selection_quality

    from milotile.explore import atlas, select
    from milotile.explore import train as explore_train
    from milotile.explore.evaluate import candidate_species, enriched_clusters
    from milotile.explore.recipe import ExploreRecipe

    d = work / f"{data_dir.name}_lf"
    saved = d / "selection.json"
    if args.reuse_round0 and saved.exists() and (d / "store.zarr").exists():  # the chain of an earlier run
        js = json.loads(saved.read_text())
        print(f"label-free start: reusing the selection of {saved}", flush=True)
        col = mt.open(d / "store.zarr")
        # the selection as `explore select` wrote it (with its candidate ids: the picker recentres atlas selections)
        labels = col.read_table("labels-lf-rule") if "labels-lf-rule" in col.tables() else pd.DataFrame(js["labels"])
        return col, js["target"], labels, js["info"]
    t0 = time.perf_counter()
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(data_dir, d)
    col = mt.open(d / "store.zarr")
    if args.preset == "lookalike":
        from milotile.synth.lookalike import draw_setting

        invert = draw_setting(args.setting).contrast > 0
    else:
        invert = False
    with mt.cluster(workers=args.threads, threads_per_worker=1, dashboard_address=None):
        col.preprocess()
        cands = col.mine(border=8, border_z=4, invert=invert, recentre=args.mine_recentre)
        bank = cands.patches(bbox=32, modes=("slab",), shifts=True)
    if target is None:
        target, _ = findable_target(cands.df, gt)
    recipe = ExploreRecipe().replace(bbox=24, epochs=args.explore_epochs, seed=seed, widths=(16, 32, 64))
    enc = explore_train(col, bank, recipe=recipe, out=d / "runs" / "explore", device="cpu")
    key = enc.embed(col, bank).key
    atl = atlas(col, key, method="pca", n_clusters=48, overcluster=256, cluster_method="spectral", seed=seed)
    r = float(gt[gt["species"] == target]["radius"].iloc[0])
    centred = candidate_species(atl.table, gt, radius=r / 2 + 1.0)
    chosen = enriched_clusters(atl.table, centred, target, column="subcluster")
    sel = select(col, atl.key, subclusters=chosen, name="lf-rule", interactive_info=False)
    info = {**selection_quality(atl.table, centred, target, chosen, "subcluster"), "n_candidates": int(len(atl.table)),
            "explore_epochs": args.explore_epochs, "chain_s": round(time.perf_counter() - t0, 1), "load": load()}
    labels = sel[["tomogram", "x", "y", "z", "id", "cluster"]].reset_index(drop=True)  # as select wrote them
    saved.write_text(json.dumps({"target": target, "labels": labels.to_dict(orient="list"), "info": info}, default=float))
    return col, target, labels, info


def first_labels(gt: pd.DataFrame, target: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` random particles of ``target`` from the fewest first tomograms that hold ``n`` (a look-alike
    tomogram holds 3 of each species)."""
    rng = np.random.default_rng(seed)
    sp = gt[gt["species"] == target]
    names = sorted(sp["tomogram"].unique())
    counts = np.cumsum([int((sp["tomogram"] == t).sum()) for t in names])
    use = names[: int(np.searchsorted(counts, n)) + 1]
    pool = sp[sp["tomogram"].isin(use)]
    return pool.iloc[np.sort(rng.choice(len(pool), min(n, len(pool)), replace=False))][["tomogram", "x", "y", "z"]
                                                                                      ].reset_index(drop=True)


def review_round(col: object, cands: pd.DataFrame, thr: float, gt: pd.DataFrame, target: str, name: str,
                 table: str, run: str, n: int, seed: int) -> pd.DataFrame:
    """The simulated reviewer answers the first ``n`` items of the queue of ``cands`` (written to ``table``),
    into the review ``name``; returns this round's verdicts."""
    col.write_table(table, cands, params={"threshold": thr, "run": run})
    log = VerdictLog(col, name, who="simulated")
    order, sample = review_order(cands["score"].to_numpy(), thr, seed=seed)
    n_strata = [int((cands["score"] < thr).sum()), int((cands["score"] >= thr).sum())]
    for pos in range(min(n, len(order))):
        i = int(order[pos])
        row = cands.iloc[i]
        v, why = answer(row, gt, target)
        st = int(row["score"] >= thr)
        log.add(v, tomogram=row["tomogram"], x=row["x"], y=row["y"], z=row["z"], reason=why,
                sample=bool(sample[pos]), stratum=st, stratum_n=n_strata[st], score=float(row["score"]),
                pick=i, picks=table, run=run)
    df = log.frame()
    return df[df["picks"] == table].reset_index(drop=True)


def drop_review(col: object, name: str) -> None:
    for t in (f"labels-{name}", f"negatives-{name}"):
        if col.has_table(t):
            (Path(col.path) / "tables" / f"{t}.parquet").unlink()


def run_loop(args: argparse.Namespace, work: Path, save: Callable[[list[dict]], None]) -> list[dict]:
    """Round 0 (from ``--labels`` manual labels or, with ``--start label_free``, an atlas selection), then one
    review round per budget of ``--verdicts`` and two rounds per budget of ``--two-rounds`` (its first
    round is the one-round budget of half, or the largest one-round budget below it)."""
    from refine_hard import choose_labels, make_data, make_lookalike

    from milotile.refine.picker import Picker

    records: list[dict] = []
    base_kw = {} if args.base_epochs is None else {"epochs": args.base_epochs}
    ft_kw = json.loads(args.finetune)
    if args.tta is not None:  # picking time: the flips averaged at prediction (the recipe's default 4)
        base_kw["tta"] = ft_kw["tta"] = args.tta
    for seed in args.seeds:
        if args.preset == "hard":
            col, gt = make_data(work, seed, None)
            data_dir = work / f"hard_s{seed}"
            targets = args.species
        else:
            col, gt, _ = make_lookalike(work, args.setting, seed)
            from refine_hard import lookalike_labels

            data_dir = work / f"la_set{args.setting}_s{seed}"
            targets = [lookalike_labels(gt, args.setting, seed)[0]]
        for target in targets:
            start = {}
            if args.start == "label_free":
                col, target, labels, start = label_free_start(args, work, seed, data_dir,
                                                              gt, None if args.lf_target == "auto" else args.lf_target)
                print({"label_free_selection": start}, flush=True)
            elif args.preset == "hard":
                labels = choose_labels(gt, target, args.labels, seed)
            else:
                labels = first_labels(gt, target, args.labels, seed)
            sp = gt[gt["species"] == target]
            r = float(sp["radius"].iloc[0])
            true = sp[["tomogram", "x", "y", "z"]]
            base = {"preset": args.preset, "setting": args.setting if args.preset == "lookalike" else None,
                    "start": args.start, "seed": seed, "species": target, "n_labels": len(labels)}
            tag = f"s{seed}_{target}_{args.start}"
            run0 = work / f"review_{data_dir.name}_{tag}_r0"
            cpath = run0 / "candidates.parquet"
            if args.reuse_round0 and cpath.exists():
                picker, train0 = Picker.load(run0, device="cpu"), None
                cands = pd.read_parquet(cpath)
            else:
                if run0.exists():
                    shutil.rmtree(run0)
                t0 = time.perf_counter()
                picker = mt.refine.train(col, labels, out=run0, seed=seed, device="cpu", bbox=2 * r, **base_kw)
                train0 = round(time.perf_counter() - t0, 1)
                cands = predict.pick(col, picker, threshold=AUTO_FLOOR, write_heatmaps=False, table=None)
                cands.to_parquet(cpath)
            thr0 = float(apply_auto_threshold(cands, picker.contract)[1].popitem()[1]["threshold"])  # the one class
            rec0 = {**base, "method": "round0", "rounds": 0, "verdicts": 0, "train_s": train0, "load": load(),
                    **f1_at(cands, true, r, thr0), "true_precision": true_precision(cands, true, r, thr0),
                    **({"selection": start} if start else {})}
            records.append(rec0)
            print(rec0, flush=True)
            save(records)
            first: dict[int, dict] = {}  # one-round results by budget, the first round of the two-round runs
            for n in sorted(set(args.verdicts)):
                name = f"bench-{data_dir.name}-{tag}-{n}"
                drop_review(col, name)
                df = review_round(col, cands, thr0, gt, target, name, f"picks-{tag}-r0", run0.name, n, seed)
                w = sample_weights(df)
                acc = (df["verdict"] == "accept").to_numpy()
                est0 = estimate(df["score"].to_numpy(), acc, thr0, weights=w)
                smp = df[df["sample"].astype(bool)]
                common = {**base, "rounds": 1, "verdicts": n, "n_sample": int(len(smp)), "n_accepted": int(acc.sum())}
                # rethreshold only
                try:
                    rt = reviewed_threshold(df["score"].to_numpy(), acc, weights=w)
                    rrec = {**common, "method": "rethreshold", **f1_at(cands, true, r, rt["threshold"]),
                            "est_precision": rt["precision"], "true_precision": true_precision(cands, true, r, rt["threshold"])}
                except InputError as exc:  # too few sample verdicts: recorded
                    rrec = {**common, "method": "rethreshold", "note": str(exc)}
                records.append(rrec)
                print(rrec, flush=True)
                save(records)
                # review + retrain
                out = work / f"review_{data_dir.name}_{tag}_v{n}"
                if out.exists():
                    shutil.rmtree(out)
                res = retrain(col, run0, name=name, out=out, table=None, write_heatmaps=False, **ft_kw)
                first[n] = {"res": res, "name": name, "out": out}
                rec = review_record(common, res, true, r, {"est_precision_round0": est0["precision"],
                                                           "est_precision_round0_ci": est0["precision_ci"],
                                                           "true_precision_round0": true_precision(cands, true, r, thr0)},
                                    col, name)
                records.append(rec)
                print(rec, flush=True)
                save(records)
                # the same budget as random manual labels
                if args.random_verdicts is not None and n not in args.random_verdicts:
                    continue
                records.append(random_record(col, picker, labels, sp, base, n, seed, r, true, work, tag, data_dir, ft_kw))
                print(records[-1], flush=True)
                save(records)
            for total in sorted(set(args.two_rounds)):
                below = [k for k in first if k < total]
                if not below:
                    continue
                n1 = total // 2 if total // 2 in first else max(below)
                prev = first[n1]
                res1 = prev["res"]
                table = f"picks-{tag}-r1-{total}"
                df2 = review_round(col, res1["candidates"], res1["threshold"], gt, target, prev["name"], table,
                                   Path(res1["run"]).name, total - n1, seed + 1)
                out = work / f"review_{data_dir.name}_{tag}_v{n1}+{total - n1}"
                if out.exists():
                    shutil.rmtree(out)
                res2 = retrain(col, res1["run"], name=prev["name"], out=out, table=None, write_heatmaps=False, **ft_kw)
                acc2 = (df2["verdict"] == "accept").to_numpy()
                est1 = estimate(df2["score"].to_numpy(), acc2, res1["threshold"], weights=sample_weights(df2))
                common = {**base, "rounds": 2, "verdicts": total, "split": [n1, total - n1],
                          "n_sample": int(df2["sample"].astype(bool).sum()), "n_accepted": int(acc2.sum())}
                rec = review_record(common, res2, true, r, {
                    "est_precision_round1": est1["precision"], "est_precision_round1_ci": est1["precision_ci"],
                    "true_precision_round1": true_precision(res1["candidates"], true, r, res1["threshold"])}, col, prev["name"])
                records.append(rec)
                print(rec, flush=True)
                save(records)
    return records


def run_rechoose(args: argparse.Namespace, work: Path) -> list[dict]:
    """The threshold of finished review rounds chosen again (no training): ``--runs`` are the loop's
    ``review_<data>_<tag>_v<N>`` (or ``_v<N1>+<N2>``) folders in ``--workdir``; each picker picks again
    (or its saved ``candidates.parquet`` is read) and the review's sample chooses the threshold with the
    design weights of the reviewed picks (the first version of ``retrain``) and with the new picker's
    candidate counts (:func:`milotile.refine.review.rescored_weights`)."""
    import re

    from refine_hard import make_data, make_lookalike

    from milotile.refine.picker import Picker

    records = []
    for run in map(Path, args.runs):
        m = re.match(r"review_(hard_s(\d+)|la_set(\d+)_s(\d+))_(s\d+_(.+)_(manual|label_free))_v(\d+)(?:\+\d+)?$", run.name)
        if m is None:
            raise SystemExit(f"{run}: not a review round folder")
        data, tag, target, n1 = m[1], m[5], m[6], int(m[8])
        if m[2] is not None:
            col, gt = make_data(work, int(m[2]), None)
        else:
            col, gt, _ = make_lookalike(work, int(m[3]), int(m[4]))
        sp = gt[gt["species"] == target]
        r = float(sp["radius"].iloc[0])
        true = sp[["tomogram", "x", "y", "z"]]
        cpath = run / "candidates.parquet"
        if cpath.exists():
            cands = pd.read_parquet(cpath)
        else:
            cands = predict.pick(col, Picker.load(run, device="cpu"), threshold=AUTO_FLOOR, write_heatmaps=False,
                                 table=None)
            cands.to_parquet(cpath)
        if m[7] == "label_free":  # the verdicts live in the store of the label-free chain's copy
            col = mt.open(work / f"{data}_lf" / "store.zarr")
        verdicts = VerdictLog(col, f"bench-{data}-{tag}-{n1}").frame()
        if "+" not in run.name:  # a one-round folder: only the verdicts of its own round
            verdicts = verdicts[verdicts["picks"] == f"picks-{tag}-r0"].reset_index(drop=True)
        rec = {"run": run.name, "species": target, "f1_best": f1_at(cands, true, r, None).get("f1_best"),
               "n_sample": int(verdicts["sample"].astype(bool).sum())}
        for how in ("design", "rescored"):
            est = sample_threshold(cands, verdicts, r / 2, weighting=how)
            if est is None:
                continue
            rec.update({f"threshold_{how}": round(est["threshold"], 4), f"f1_{how}": f1_at(cands, true, r, est["threshold"])["f1_auto"],
                        f"est_precision_{how}": round(est["precision"], 4),
                        f"true_precision_{how}": round(true_precision(cands, true, r, est["threshold"]), 4)})
        picker = Picker.load(run, device="cpu")
        thr_auto = float(apply_auto_threshold(cands, picker.contract)[1].popitem()[1]["threshold"])  # the one class
        smp = verdicts[verdicts["sample"].astype(bool)]
        rec.update(threshold_auto=round(thr_auto, 4), f1_auto_threshold=f1_at(cands, true, r, thr_auto)["f1_auto"],
                   n_sample_accepted=int((smp["verdict"] == "accept").sum()), load=load())
        # what `refine retrain` chooses: the sample's threshold when it has enough accepted picks, else the automatic one
        rec["threshold_source"] = "sample" if "f1_rescored" in rec else "auto"
        rec["f1_retrain"] = rec.get("f1_rescored", rec["f1_auto_threshold"])
        # keeping the round the sample estimates better (measured, not adopted): the reviewed picks re-thresholded by
        # their own verdicts against the retrained picker, by estimated F1, with a margin of 0 and 0.1
        new = sample_threshold(cands, verdicts, r / 2)
        try:
            prev = rethreshold(col, verdicts)
        except InputError as exc:  # e.g. the reviewed table was written again by a later run of the benchmark
            prev = None
            rec["previous_note"] = str(exc)
        if prev is not None:
            rec.update(previous_table=prev["table"], threshold_previous=round(prev["threshold"], 4),
                       est_f1_previous=round(prev["f1"], 4),
                       f1_previous=f1_at(prev["candidates"], true, r, prev["threshold"])["f1_auto"])
        if new is not None:
            rec["est_f1_retrain"] = round(new["f1"], 4)
        for margin in (0.0, 0.1):
            better = prev is not None and new is not None and prev["f1"] > new["f1"] + margin
            rec[f"f1_keep_better_{margin:g}"] = rec["f1_previous"] if better else rec["f1_retrain"]
        records.append(rec)
        print(rec, flush=True)
    return records


def estimates_record(res: dict) -> dict:
    """The estimated F1 of both rounds ``retrain`` reports: the retrained picker at its sample threshold and the
    reviewed picks re-thresholded by their verdicts (whose true F1 is the ``rethreshold`` record's)."""
    est, prev = res.get("estimate"), res.get("previous")
    return {"est_f1": None if est is None else round(float(est["f1"]), 4),
            "est_f1_previous": None if prev is None else round(float(prev["estimate"]["f1"]), 4),
            "threshold_previous": None if prev is None else round(prev["threshold"], 4)}


def review_record(common: dict, res: dict, true: pd.DataFrame, r: float, extra: dict, col: object, name: str) -> dict:
    est = res["estimate"]
    res["candidates"].to_parquet(Path(res["run"]) / "candidates.parquet")
    # the threshold the sample's design weights (of the reviewed picks) would choose for the new picks: the before
    alt = sample_threshold(res["candidates"], VerdictLog(col, name).frame(), r / 2, weighting="design")
    if alt is not None:
        extra = {**extra, "threshold_design_weights": alt["threshold"], "est_precision_design_weights": alt["precision"],
                 "f1_design_weights": f1_at(res["candidates"], true, r, alt["threshold"])["f1_auto"],
                 "true_precision_design_weights": true_precision(res["candidates"], true, r, alt["threshold"])}
    return {**common, "method": "review", **f1_at(res["candidates"], true, r, res["threshold"]),
            "threshold_source": "sample" if est is not None else "auto", **extra,
            "est_precision": None if est is None else est["precision"],
            "est_precision_ci": None if est is None else est["precision_ci"],
            "true_precision": true_precision(res["candidates"], true, r, res["threshold"]),
            **estimates_record(res),
            "retrain_s": res["train_s"], "pick_s": res["pick_s"], "round_s": round(res["train_s"] + res["pick_s"], 1),
            "n_train_labels": res["n_labels"], "n_negatives": res["n_negatives"], "load": load()}


def random_record(col: object, picker: object, labels: pd.DataFrame, sp: pd.DataFrame, base: dict, n: int, seed: int,
                  r: float, true: pd.DataFrame, work: Path, tag: str, data_dir: Path, ft_kw: dict) -> dict:
    """Fine-tune the round-0 picker on its labels plus ``n`` random true particles of the target."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng([seed, n])
    # the labels the round-0 picker trained on (an atlas selection: recentred and merged) plus the extra particles,
    # drawn from the target's particles with no training label within half a radius
    base_lab = pd.DataFrame(picker.contract.get("train_labels") or [], columns=["tomogram", "x", "y", "z", "class"])
    free = np.ones(len(sp), bool)
    for tomo, g in base_lab.groupby("tomogram"):
        m = (sp["tomogram"] == tomo).to_numpy()
        if m.any():
            d, _ = cKDTree(g[["x", "y", "z"]].to_numpy(np.float64)).query(sp.loc[m, ["x", "y", "z"]].to_numpy(np.float64))
            free[np.flatnonzero(m)[d <= r / 2]] = False
    pool = sp[free]
    extra = pool.iloc[np.sort(rng.choice(len(pool), min(n, len(pool)), replace=False))]
    more = pd.concat([base_lab[["tomogram", "x", "y", "z"]], extra[["tomogram", "x", "y", "z"]]], ignore_index=True)
    out = work / f"random_{data_dir.name}_{tag}_v{n}"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    p2 = mt.refine.train(col, more, init_from=picker.path, out=out, device="cpu", **ft_kw)
    tr = time.perf_counter() - t0
    t0 = time.perf_counter()
    c2 = predict.pick(col, p2, threshold=AUTO_FLOOR, write_heatmaps=False, table=None)
    pk = time.perf_counter() - t0
    thr2 = float(apply_auto_threshold(c2, p2.contract)[1].popitem()[1]["threshold"])  # the one class
    return {**base, "method": "random_labels", "rounds": 1, "verdicts": n, "n_labels": len(more),
            **f1_at(c2, true, r, thr2), "retrain_s": round(tr, 1), "pick_s": round(pk, 1), "load": load()}


def run_rescore(args: argparse.Namespace) -> list[dict]:
    """The review's sample on saved picks (no training): ``--runs`` are saved run folders of
    ``benchmarks/refine_hard.py`` (``picks_all.parquet``, ``best.pt``, the data beside them; see its ``saved_run``). For each budget N and ``--queue-seeds`` queues, the simulated reviewer
    answers the first N queue items; reported: the sample's estimated precision at the automatic threshold
    against the true one, and F1 at the threshold the sample chooses (the picks themselves unchanged)."""
    from refine_hard import saved_run

    from milotile.refine.picker import Picker

    records = []
    for run in map(Path, args.runs):
        saved = saved_run(run)
        setting, seed, recipe, target = saved["setting"], saved["seed"], saved["method"], saved["species"]
        gt = pd.read_parquet(saved["data"] / "ground_truth.parquet")
        r, true = saved["radius"], saved["true"]
        picks = pd.read_parquet(run / "picks_all.parquet").reset_index(drop=True)
        contract = Picker.load(run).contract
        thr0 = float(apply_auto_threshold(picks, contract)[1].popitem()[1]["threshold"])  # the one class
        acc_all = answers(picks, gt, target)
        base = {"setting": setting, "seed": seed, "recipe": recipe, "species": target, "n_picks": len(picks)}
        res0 = f1_at(picks, true, r, thr0)
        p0 = true_precision(picks, true, r, thr0)
        records.append({**base, "verdicts": 0, "method": "auto", **res0, "true_precision": p0})
        print(records[-1], flush=True)
        sc = picks["score"].to_numpy()
        n_strata = np.array([(sc < thr0).sum(), (sc >= thr0).sum()])
        for n in args.verdicts:
            errs, f1s, thr_errs, covered = [], [], [], 0
            for qs in range(args.queue_seeds):
                order, sample = review_order(sc, thr0, seed=qs)
                rows = order[:n]
                stratum = (sc[rows] >= thr0).astype(int)
                w = design_weights(stratum, n_strata[stratum], sample[:n])
                e = estimate(sc[rows], acc_all[rows], thr0, weights=w)
                if np.isfinite(e["precision"]):
                    errs.append(e["precision"] - p0)
                    covered += e["precision_ci"][0] <= p0 <= e["precision_ci"][1]
                try:
                    rt = reviewed_threshold(sc[rows], acc_all[rows], weights=w)
                    f1s.append(f1_at(picks, true, r, rt["threshold"])["f1_auto"])
                    thr_errs.append(rt["precision"] - true_precision(picks, true, r, rt["threshold"]))
                except InputError:
                    f1s.append(res0["f1_auto"])  # too few sample verdicts: the automatic threshold stays
            rec = {**base, "verdicts": n, "method": "rethreshold", "n_sample": int(sample[:n].sum()),
                   "f1_auto_mean": round(float(np.mean(f1s)), 4), "f1_auto_min": round(float(np.min(f1s)), 4),
                   "f1_gain_mean": round(float(np.mean(f1s)) - res0["f1_auto"], 4),
                   "precision_abs_err_mean": round(float(np.mean(np.abs(errs))), 4) if errs else None,
                   "precision_abs_err_p90": round(float(np.percentile(np.abs(errs), 90)), 4) if errs else None,
                   "precision_bias": round(float(np.mean(errs)), 4) if errs else None,
                   "ci_coverage": round(covered / max(len(errs), 1), 3),
                   "chosen_precision_abs_err_mean": round(float(np.mean(np.abs(thr_errs))), 4) if thr_errs else None,
                   "queue_seeds": args.queue_seeds, "load": load()}
            records.append(rec)
            print(rec, flush=True)
    return records


def run_browser(args: argparse.Namespace, work: Path) -> dict:
    """Page load and thumbnail latencies at ``args.n_picks`` picks in headless Chromium."""
    from playwright.sync_api import sync_playwright
    from refine_hard import make_data

    from milotile.explore.serve import make_server
    from milotile.explore.serve.review import ReviewApp

    col, _ = make_data(work, 0, None)
    rng = np.random.default_rng(0)
    n = int(args.n_picks)
    rows = []
    for name, k in zip(col.names, [len(a) for a in np.array_split(np.arange(n), len(col.names))], strict=True):
        zs, ys, xs = col[name].shape
        rows.append(pd.DataFrame({"tomogram": name, "x": rng.uniform(8, xs - 8, k), "y": rng.uniform(8, ys - 8, k),
                                  "z": rng.uniform(8, zs - 8, k), "score": rng.beta(0.6, 0.6, k)}))
    picks = pd.concat(rows, ignore_index=True)
    col.write_table("picks-browser", picks, params={"threshold": 0.5, "run": None})
    for t in ("labels-browser", "negatives-browser"):
        if col.has_table(t):
            (Path(col.path) / "tables" / f"{t}.parquet").unlink()
    # cold server-side thumbnails (fresh chunk cache, random picks)
    app = ReviewApp(col, "picks-browser", name="browser", box=24)
    ts = []
    for i in rng.choice(len(picks), 40, replace=False):
        t0 = time.perf_counter()
        app.thumbnail(int(i))
        ts.append(1000 * (time.perf_counter() - t0))
    cold = {"cold_thumb_ms_median": round(float(np.median(ts)), 1), "cold_thumb_ms_p95": round(float(np.percentile(ts, 95)), 1)}
    app = ReviewApp(col, "picks-browser", name="browser", box=24)
    srv = make_server(None, port=0, review=app)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/review"
    chromium = os.environ.get("MILOTILE_CHROMIUM") or shutil.which("chromium")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=flags)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_function("window.review && window.review.ready", timeout=120000)
            load_ms = 1000 * (time.perf_counter() - t0)
            page_ms = page.evaluate("window.review.loadMs")

            def step(key: str, k: int) -> list[float]:
                out = []
                for _ in range(k):
                    shown = page.evaluate("window.review.shown")
                    t = time.perf_counter()
                    page.keyboard.press(key)
                    page.wait_for_function(f"window.review.shown !== {shown}")
                    out.append(1000 * (time.perf_counter() - t))
                    page.wait_for_timeout(args.dwell_ms)  # a reviewer looks at the pick meanwhile
                return out

            page.evaluate("window.review.keyMs = []")
            nxt = step("ArrowRight", 40)
            key_next = page.evaluate("window.review.keyMs")
            page.evaluate("window.review.keyMs = []")
            verdict = step("y", 20)
            key_verdict = page.evaluate("window.review.keyMs")
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    stored = len(col.read_table("labels-browser"))
    return {"n_picks": n, "page_load_ms": round(load_ms, 1), "page_ready_ms_in_page": round(page_ms, 1),
            "next_thumb_ms_median": round(float(np.median(nxt)), 1), "next_thumb_ms_p95": round(float(np.percentile(nxt, 95)), 1),
            "verdict_to_next_ms_median": round(float(np.median(verdict)), 1),
            "verdict_to_next_ms_p95": round(float(np.percentile(verdict, 95)), 1),
            "in_page_key_to_thumb_ms_median": round(float(np.median(key_next)), 1),
            "in_page_key_to_thumb_ms_p95": round(float(np.percentile(key_next, 95)), 1),
            "in_page_verdict_to_thumb_ms_median": round(float(np.median(key_verdict)), 1),
            "in_page_verdict_to_thumb_ms_p95": round(float(np.percentile(key_verdict, 95)), 1),
            "verdicts_stored": stored,
            "dwell_ms": args.dwell_ms, **cold, "load": load()}


def loop_table(out: dict) -> str:
    """The loop's F1 at the automatic / reviewed threshold as a markdown table: one row per (setting, start,
    verdicts), one column per method (``review`` in one and in two rounds)."""
    lines = ["| setting | start | verdicts | round 0 | rethreshold | review, 1 round | review, 2 rounds | random labels |"
             " est. − true precision (review) | round s (retrain + pick) |", "|" + "---|" * 10]
    for key, recs in out.items():
        if not key.startswith("loop_") or key.endswith("_options"):
            continue
        df = pd.DataFrame(recs)
        r0 = df[df["method"] == "round0"]
        if not len(r0):
            continue
        f0 = f"{r0['f1_auto'].iloc[0]:.2f}"
        setting = key[len("loop_"):]
        start = str(r0["start"].iloc[0]) if "start" in r0 else "manual"
        lines.append(f"| {setting} | {start} | 0 | {f0} | | | | | | |")
        for n in sorted(set(df["verdicts"]) - {0}):
            d = df[df["verdicts"] == n]

            def f1(method: str, rounds: int = 1, d: pd.DataFrame = d) -> str:
                m = d[(d["method"] == method) & (d.get("rounds", 1) == rounds)]
                return f"{m['f1_auto'].iloc[0]:.2f}" if len(m) and pd.notna(m["f1_auto"].iloc[0]) else ""

            rv = d[d["method"] == "review"]
            err = ", ".join(f"{e - t:+.2f}" for e, t in zip(rv.get("est_precision", []), rv.get("true_precision", []),
                                                             strict=True) if e is not None and pd.notna(e))
            secs = ", ".join(f"{s:.0f}" for s in rv.get("round_s", []) if pd.notna(s))
            lines.append(f"| {setting} | {start} | {n} | | {f1('rethreshold')} | {f1('review')} | {f1('review', 2)} "
                         f"| {f1('random_labels')} | {err} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=("loop", "browser", "rescore", "table", "rechoose"), default=["browser", "loop"],
                    help="table: print the loop results of --json as a markdown table")
    ap.add_argument("--runs", nargs="*", default=[],
                    help="rescore: refine_hard look-alike run folders; rechoose: the loop's review round folders")
    ap.add_argument("--queue-seeds", type=int, default=10, help="rescore: review queues per budget")
    ap.add_argument("--preset", choices=("hard", "lookalike"), default="hard")
    ap.add_argument("--setting", type=int, default=0, help="look-alike setting")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--species", nargs="+", default=["small"])
    ap.add_argument("--labels", type=int, default=6)
    ap.add_argument("--verdicts", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--random-verdicts", type=int, nargs="*", default=None,
                    help="loop: budgets that also get the random-manual-labels arm (default: every one)")
    ap.add_argument("--two-rounds", type=int, nargs="*", default=[100],
                    help="loop: total budgets reviewed in two rounds (half, retrain, half on the new picks, retrain)")
    ap.add_argument("--start", choices=("manual", "label_free"), default="manual",
                    help="loop: round 0 from --labels manual labels or from an atlas selection (no label)")
    ap.add_argument("--lf-target", default="auto",
                    help="label-free start: target species (auto: the largest findable, benchmarks/label_free.py)")
    ap.add_argument("--explore-epochs", type=int, default=4, help="label-free start: explore encoder epochs")
    ap.add_argument("--mine-recentre", default="auto", metavar="R|auto|off",
                    help="label-free start: mine --recentre (candidates on their blobs' centres; default auto, as the "
                    "CLI)")
    ap.add_argument("--tta", type=int, default=None,
                    help="loop: prediction flips of every picker (default: the recipe's; 1 picks 4x faster)")
    ap.add_argument("--reuse-round0", action="store_true",
                    help="loop: reuse a finished round-0 picker and its candidates of the same work folder (and, for "
                         "the label-free start, its selection)")
    ap.add_argument("--n-picks", type=float, default=1e4)
    ap.add_argument("--dwell-ms", type=int, default=150, help="pause between key presses in the browser part")
    ap.add_argument("--base-epochs", type=int, default=None, help="round-0 epochs (default: the recipe's)")
    ap.add_argument("--finetune", default="{}", metavar="JSON",
                    help='recipe overrides of both fine-tuning arms, e.g. \'{"epochs": 2, "repeats": 2}\' (default: none)')
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads and milotile's thread budget (MILOTILE_THREADS) of this process")
    ap.add_argument("--workdir", default="/tmp/review_bench")
    ap.add_argument("--json", default=str(RESULTS / "review.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ["MILOTILE_THREADS"] = str(args.threads)
    from milotile.runtime import init_threads

    init_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    out["commands"] = sorted(set(out.get("commands", [])) | {" ".join(sys.argv)})
    if args.part == ["table"]:
        print(loop_table(json.loads(Path(args.json).read_text())))
        return 0
    if "browser" in args.part:
        res = run_browser(args, work)
        print(res, flush=True)
        out["browser"] = res
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    if "rechoose" in args.part:
        out["rechoose"] = run_rechoose(args, work)
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    if "rescore" in args.part:
        out["rescore_lookalike"] = run_rescore(args)
        out["rescore_options"] = {"runs": args.runs, "verdicts": args.verdicts, "queue_seeds": args.queue_seeds}
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    if "loop" in args.part:
        key = (f"loop_{args.preset}" + (f"_set{args.setting}" if args.preset == "lookalike" else "")
               + ("_labelfree" if args.start == "label_free" else ""))
        def save(records: list[dict]) -> None:
            out[key] = records
            out[key + "_options"] = {"base_epochs": args.base_epochs, "finetune": json.loads(args.finetune),
                                     "verdicts": args.verdicts, "two_rounds": args.two_rounds, "start": args.start,
                                     "species": args.species, "seeds": args.seeds, "threads": args.threads, "tta": args.tta,
                                     "explore_epochs": args.explore_epochs if args.start == "label_free" else None}
            Path(args.json).write_text(json.dumps(out, indent=1, default=float))

        save(run_loop(args, work, save))
        df = pd.DataFrame(out[key])
        cols = [c for c in ("species", "method", "rounds", "verdicts", "f1_auto", "p_auto", "r_auto", "f1_best", "est_precision",
                            "true_precision", "retrain_s") if c in df]
        print(df[cols].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
