"""The label-free loop measured end to end (issue 24, item 4), next to the picker from 6 manual labels.

Per preset (``hard``: issue 15's four species r 12/9/7/5 with crowders; ``lookalike``: issue 23's 8-12
similar-sized species, acquisition drawn from ``--setting``), everything through the public Python API as a
user chains it, with no manual label:

``synth -> ingest -> preprocess -> mine -> patches (slab, bbox 32, MiLoPYP's shifts) -> explore train ->
explore embed -> explore atlas -> select clusters -> refine train on the selection -> refine pick``

and scored against the truth (Hungarian matching within half the target's radius, F1 at the picker's own
automatic threshold, as ``refine pick`` writes it). The cluster choice:

* **rule** -- the documented rule (:func:`milotile.explore.evaluate.enriched_clusters`), at ``--level``
  (default the atlas's sub-clusters, its k-means over-clusters; ``cluster``: the merged clusters): every one whose
  candidates are mostly (>= 50 %) on the centres of target particles, what a user does by choosing the
  gallery rows that show the target; the truth stands in for the user's eye;
* **oracle** -- the single atlas cluster (of ``--n-clusters``, whatever ``--level``) purest in the target
  (:func:`~milotile.explore.evaluate.purest_cluster`) among those holding at least ``--manual`` (6) target
  candidates (or as many as the richest cluster holds): an upper bound on a single-cluster choice that
  trains on as many labels as the manual reference. (Until session 14 it chose at ``--level`` among clusters
  with one target candidate: a sub-cluster of 1-3 candidates, precision 1.0, whose picker scored 0.0-0.3);
* **manual** -- the same picker (same recipe) trained from 6 manual labels of the target in the first
  tomogram (the issue's reference).

Also reported: the selection's precision (share of its candidates on a target centre) and recall (share of
the target's candidates it holds), the best single-cluster selection per species
(:func:`~milotile.explore.evaluate.best_cluster_selection`), and the time of every stage with the load
average (the machine is shared; timings under load are not speeds).

Target: ``big`` on ``hard``; on ``lookalike`` the largest species of which at least half the particles have a
mined candidate on their centre (:func:`findable_target`: hollow and multi-lobed shapes get DoG peaks on
their lobes, so no cluster of centred candidates can hold them).

    nice python benchmarks/label_free.py --preset lookalike --setting 3 --seed 0 --work /tmp/lf
    nice python benchmarks/label_free.py --preset hard --seed 0 --work /tmp/lf
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

log = logging.getLogger("bench.label_free")


class Stages:
    """Seconds and load average of each stage."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def run(self, name: str, fn):  # noqa: ANN001, ANN201
        t0 = time.perf_counter()
        out = fn()
        self.rows[name] = {"seconds": round(time.perf_counter() - t0, 1), "load_avg_1m": round(os.getloadavg()[0], 2)}
        log.info("stage %-14s %7.1f s (load %.1f)", name, self.rows[name]["seconds"], self.rows[name]["load_avg_1m"])
        return out


def make_data(a: argparse.Namespace, work: Path):  # noqa: ANN201
    """Synthesise the preset; returns (SynthResult, target species, invert)."""
    from milotile.synth import synth

    if a.preset == "hard":
        size = tuple(int(v) for v in a.size.split(","))
        res = synth(work / "data", seed=a.seed, n_tomograms=a.n_tomograms, size=size, preset="hard",
                    n_particles=a.n_particles, crowders=a.crowders)
        return res, "big", False
    from milotile.synth.lookalike import draw_setting

    st = draw_setting(a.setting)
    n = max(2, -(-a.per_species // st.particles_per_species))
    res = synth(work / "data", seed=a.seed, n_tomograms=n, preset="lookalike", setting=a.setting)
    return res, None, st.contrast > 0


def oracle_hits(table: pd.DataFrame, centred: np.ndarray, target: str, column: str, n: int) -> int:
    """Fewest target candidates the oracle's cluster must hold: ``n`` (the manual reference's label count), or
    the most any cluster holds when none holds ``n``."""
    from milotile.explore.evaluate import species_enrichment

    e = species_enrichment(table, centred, target, column)
    return int(min(n, e["hits"].max())) if len(e) else 1


def findable_target(cands: pd.DataFrame, gt: pd.DataFrame, min_recall: float = 0.5) -> tuple[str, dict]:
    """The largest species of which at least ``min_recall`` of the particles have a mined candidate on their
    centre (within r/2 + 1): the one a user would see in the gallery. Hollow and multi-lobed shapes get DoG
    peaks on their lobes, not their centre, and cannot be chosen from centred candidates."""
    from scipy.spatial import cKDTree

    recall = {}
    for sp, g in gt.groupby("species"):
        hit = 0
        for tomo, gg in g.groupby("tomogram"):
            c = cands[cands["tomogram"].astype(str) == str(tomo)]
            if len(c):
                d, _ = cKDTree(c[["x", "y", "z"]].to_numpy()).query(gg[["x", "y", "z"]].to_numpy())
                hit += int((d <= gg["radius"].to_numpy() / 2 + 1).sum())
        recall[str(sp)] = round(hit / len(g), 3)
    radii = gt.groupby("species")["radius"].first().sort_values(ascending=False)
    ok = [str(sp) for sp in radii.index if recall[str(sp)] >= min_recall]
    return (ok[0] if ok else str(max(recall, key=recall.get))), recall


def manual_labels(gt: pd.DataFrame, target: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` random particles of ``target`` in the first tomogram (the 6-manual-label reference)."""
    rng = np.random.default_rng(seed)
    first = sorted(gt["tomogram"].unique())[0]
    pool = gt[(gt["species"] == target) & (gt["tomogram"] == first)]
    pick = pool.iloc[np.sort(rng.choice(len(pool), min(n, len(pool)), replace=False))]
    return pick[["tomogram", "x", "y", "z"]].reset_index(drop=True)


def train_and_pick(col, labels: pd.DataFrame, gt_t: pd.DataFrame, r: float, run: Path, a: argparse.Namespace,
                   stages: Stages, tag: str, negatives: pd.DataFrame | None = None) -> dict:
    """``refine train`` on ``labels`` (and ``--negatives``; the recipe's defaults, box 2r) and ``refine pick``
    (automatic threshold)."""
    import milotile as mt
    from milotile.metrics import evaluate
    from milotile.refine.recipe import PickerRecipe, default_epochs

    shutil.rmtree(run, ignore_errors=True)
    epochs = a.refine_epochs
    if epochs is None and a.crop_budget:  # a smaller labelled-crop budget than the recipe's, same for every picker
        epochs = max(1, round(a.crop_budget / (len(labels) * PickerRecipe().repeats)))
    kw = {"epochs": epochs} if epochs else {}
    kw.update(json.loads(a.train_json) if a.train_json else {})
    picker = stages.run(f"refine_train_{tag}", lambda: mt.refine.train(
        col, labels, negatives=negatives, out=run, seed=a.seed, device="cpu", bbox=2 * r, **kw))
    picks = stages.run(f"refine_pick_{tag}", lambda: picker.pick(col, table=None, write_heatmaps=False))
    e = evaluate(picks, gt_t[["tomogram", "x", "y", "z"]], r / 2, by="tomogram").iloc[-1]
    return {"labels": int(len(labels)), "negatives": 0 if negatives is None else int(len(negatives)),
            "picks": int(len(picks)), "recentred": picker.contract.get("recentred"), "f1": round(float(e["f1"]), 4),
            "precision": round(float(e["precision"]), 4), "recall": round(float(e["recall"]), 4),
            "epochs": int((picker.contract.get("recipe") or {}).get("epochs")
                          or epochs or default_epochs(len(labels), PickerRecipe().repeats))}


def selection_quality(table: pd.DataFrame, species: np.ndarray, target: str, clusters: list[int],
                      column: str = "cluster") -> dict:
    sel = np.isin(table[column].to_numpy(), clusters)
    hit = np.asarray(species, dtype=object) == target
    return {"clusters": clusters, "n": int(sel.sum()), "on_target": int((sel & hit).sum()),
            "precision": round(float((sel & hit).sum() / max(sel.sum(), 1)), 4),
            "recall": round(float((sel & hit).sum() / max(hit.sum(), 1)), 4)}


def merge_duplicates(col, labels: pd.DataFrame, distance: float) -> pd.DataFrame:  # noqa: ANN001
    """The ``dedup`` variant: selected candidates closer than ``distance`` (the particle radius, half the picker's
    box) in one tomogram are one particle (a large particle holds several DoG peaks); keep the strongest DoG peak
    of each group (:func:`milotile.ops.peaks.greedy_nms`). The automatic threshold estimates the particle count
    from the label count, so duplicates inflate it."""
    from milotile.ops.peaks import greedy_nms

    bank = next(k for k in col.tables() if k.startswith("patches-") and "slab" in k)
    score = col.read_table(bank)["score"].to_numpy(np.float64)
    keep = []
    for _, g in labels.groupby("tomogram"):
        idx = greedy_nms(g[["x", "y", "z"]].to_numpy(np.float64), score[g["id"].to_numpy()], distance)
        keep.extend(g.index[idx].tolist())
    return labels.loc[sorted(keep)]


def save_partial(a: argparse.Namespace, res: dict) -> None:
    """The figures so far, to ``<work>/partial.json`` (a stopped run keeps what it measured)."""
    (Path(a.work) / "partial.json").write_text(json.dumps({**res, "partial": True, "load_avg": os.getloadavg()},
                                                          indent=2, default=str) + "\n")


def run(a: argparse.Namespace) -> dict:
    import milotile as mt
    from milotile.explore import atlas, select
    from milotile.explore import train as explore_train
    from milotile.explore.evaluate import (
        best_cluster_selection,
        candidate_species,
        cluster_scores,
        enriched_clusters,
        purest_cluster,
    )
    from milotile.explore.recipe import ExploreRecipe
    from milotile.explore.select import clusters_without

    work = Path(a.work)
    st = Stages()
    reused = None
    if a.from_explore:  # the store, candidates and slab embeddings of a benchmarks/explore.py work folder
        src = Path(a.from_explore)
        col = mt.open(src / "store.zarr")
        # an explore.py folder has gt.parquet and data.json; a label_free.py folder its synth output in data/
        gt = pd.read_parquet(src / "gt.parquet" if (src / "gt.parquet").exists() else src / "data" / "ground_truth.parquet")
        cands_df = col.read_table("candidates")
        key = next(k[len("embeddings-"):] for k in col.tables() if k.startswith("embeddings-") and "slab" in k)
        target = "big" if a.preset == "hard" else None
        prev = src / "partial.json"
        reused = {"from": str(src), "embeddings": key,
                  "data": json.loads((src / "data.json").read_text()) if (src / "data.json").exists() else None,
                  "stages": json.loads(prev.read_text()).get("stages") if prev.exists() else None}
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        data, target, invert = st.run("synth", lambda: make_data(a, work))
        gt = data.ground_truth
        with mt.cluster(workers=a.threads, threads_per_worker=1, dashboard_address=None):
            col = st.run("ingest", lambda: mt.ingest(data.manifest, work / "store.zarr"))
            st.run("preprocess", lambda: col.preprocess())
            cands = st.run("mine", lambda: col.mine(border=a.border, border_z=a.border_z, invert=invert,
                                                    recentre=a.mine_recentre))
            bank = st.run("patches", lambda: cands.patches(bbox=a.bbox, modes=("slab",), shifts=True))
        cands_df = cands.df
    target, centred_recall = findable_target(cands_df, gt) if target is None else (target, None)
    log.info("target %s (centred candidate recall per species: %s)", target, centred_recall)
    gt_t = gt[gt["species"] == target]
    r = float(gt_t["radius"].iloc[0])
    match = r / 2 + 1.0  # the demo's: a candidate is the target's when on its centre (what the gallery shows)
    if reused is None:
        recipe = ExploreRecipe().replace(bbox=a.crop, epochs=a.explore_epochs, seed=a.seed,
                                         widths=tuple(int(w) for w in a.widths.split(",")),
                                         **({"objective": a.explore_objective} if a.explore_objective else {}))
        enc = st.run("explore_train", lambda: explore_train(col, bank, recipe=recipe, out=work / "runs" / "explore",
                                                            device="cpu"))
        emb_key = st.run("explore_embed", lambda: enc.embed(col, bank)).key
    else:
        emb_key = reused["embeddings"]
    atl = st.run("atlas", lambda: atlas(col, emb_key, method=a.atlas_method, n_clusters=a.n_clusters,
                                        overcluster=a.overcluster, cluster_method=a.cluster_method, seed=a.seed))
    table = atl.table
    centred = candidate_species(table, gt, radius=match)
    on_any = candidate_species(table, gt)  # within the particle's radius: the atlas scores of issue 24
    quality = {**cluster_scores(table["cluster"], on_any),
               "n_candidates": int(len(table)), "n_on_particles": int(sum(v is not None for v in on_any)),
               "n_clusters": int(table["cluster"].max()) + 1,
               "best_single_per_species": {lvl: best_cluster_selection(table[lvl].to_numpy(), on_any)
                                           for lvl in ("cluster", "subcluster")}}
    log.info("atlas: %s", {k: v for k, v in quality.items() if k != "best_single_per_species"})
    log.info("best single cluster for %s: %s", target, quality["best_single_per_species"]["cluster"].get(target))
    lv = a.level
    rule = enriched_clusters(table, centred, target, column=lv)
    # the oracle takes one of the atlas's clusters (a single sub-cluster holds 1-3 target candidates)
    oracle = purest_cluster(table, centred, target, column="cluster",
                            min_hits=oracle_hits(table, centred, target, "cluster", a.manual))
    # the other level's selections, for the record (no picker trained on them)
    other = "cluster" if lv == "subcluster" else "subcluster"
    other_sel = {t: selection_quality(table, centred, target, c, other) for t, c in (
        ("rule", enriched_clusters(table, centred, target, column=other)),
        ("oracle", [purest_cluster(table, centred, target, column=other,
                                   min_hits=oracle_hits(table, centred, target, other, a.manual))]))}
    levels = {"oracle": "cluster"}
    for lvl in ("cluster", "subcluster"):  # the target's (the per-species dict holds every species')
        quality[f"best_single_{lvl}_target"] = quality["best_single_per_species"][lvl].get(target)
    out: dict = {"preset": a.preset, "setting": a.setting if a.preset == "lookalike" else None, "seed": a.seed,
                 "target": target, "radius": r, "n_target": int(len(gt_t)), "centred_recall": centred_recall,
                 "atlas": quality, "reused_explore": reused, "level": lv, f"selections_{other}": other_sel}
    sels = {"rule": rule, "oracle": [oracle] if oracle is not None else []}
    if "neg" in a.variants.split(","):  # the lever: the rule's selection, the clusters holding none of it as negatives
        sels["rule_neg"] = rule
    if "dedup" in a.variants.split(","):  # the lever: the rule's selection, one label per particle
        sels["rule_dedup"] = rule
    for tag, clusters in sels.items():
        tlv = levels.get(tag, lv)
        q = selection_quality(table, centred, target, clusters, tlv)
        out[f"selection_{tag}"] = {**q, "level": tlv}
        log.info("%s selection (%ss): %s", tag, tlv, q)
        save_partial(a, {**out, "stages": st.rows})
        if not clusters or tag in a.skip.split(","):
            out[f"picker_{tag}"] = None
            continue
        if tag == "oracle" and tlv == lv and sorted(clusters) == sorted(rule) and out.get("picker_rule"):
            out["picker_oracle"] = {**out["picker_rule"], "same_as_rule": True}
            continue
        neg = clusters_without(table, table.loc[table[lv].isin(clusters), "id"].to_numpy()) if tag == "rule_neg" else None
        if neg is not None:  # what select(..., negatives="rest") takes
            negq = selection_quality(table, centred, target, neg, "cluster")
            out["selection_rule_neg"] = {**q, "negative_clusters": neg, "negatives_n": negq["n"],
                                         "negatives_on_target": negq["on_target"]}
            log.info("rule_neg: %d negative clusters, %d candidates, %d of them on the target", len(neg),
                     negq["n"], negq["on_target"])
        labels = st.run(f"select_{tag}", lambda c=clusters, t=tag, n=neg: select(
            col, atl.key, **{f"{levels.get(t, lv)}s": c}, name=f"lf-{t}", interactive_info=False,
            negatives=None if n is None else "rest"))
        negs = labels.attrs.get("negatives")
        if tag == "rule_dedup":
            before = len(labels)
            labels = merge_duplicates(col, labels, r)
            kept = table["id"].isin(labels["id"]).to_numpy()
            on = int((np.asarray(centred, dtype=object)[kept] == target).sum())
            dq = {"n": int(kept.sum()), "on_target": on, "precision": round(on / max(int(kept.sum()), 1), 4)}
            out["selection_rule_dedup"] = {**dq, "before_merge": before}
            log.info("rule_dedup: %d selected candidates -> %d labels (%s)", before, len(labels), dq)
        # the selection as `explore select` returns it (its candidate ids tell the picker to recentre it)
        out[f"picker_{tag}"] = train_and_pick(col, labels[["tomogram", "x", "y", "z", "id", "cluster"]], gt_t, r,
                                              work / "runs" / f"refine-{tag}", a, st, tag,
                                              None if negs is None else negs[["tomogram", "x", "y", "z"]])
        log.info("%s: selection %s -> picker %s", tag, q, out[f"picker_{tag}"])
        save_partial(a, {**out, "stages": st.rows})
    out["stages"] = st.rows
    if a.skip_manual:
        return out
    man = manual_labels(gt, target, a.manual, a.seed)
    out["picker_manual"] = train_and_pick(col, man, gt_t, r, work / "runs" / "refine-manual", a, st, "manual")
    log.info("manual (%d labels): %s", len(man), out["picker_manual"])
    out["stages"] = st.rows
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("hard", "lookalike"), default="lookalike")
    ap.add_argument("--setting", type=int, default=3, help="lookalike setting")
    ap.add_argument("--seed", type=int, default=0, help="data, training and label seed")
    ap.add_argument("--per-species", type=int, default=12, help="lookalike: particles per species (tomogram count)")
    ap.add_argument("--n-tomograms", type=int, default=2, help="hard: tomograms")
    ap.add_argument("--size", default="64,160,160", help="hard: Z,Y,X (the demo's hard stage)")
    ap.add_argument("--n-particles", type=int, default=24, help="hard: particles per tomogram")
    ap.add_argument("--crowders", type=int, default=30, help="hard: crowders per tomogram")
    ap.add_argument("--border", type=int, default=8, help="mining exclusion band in y/x (small volumes)")
    ap.add_argument("--border-z", type=int, default=4)
    ap.add_argument("--bbox", type=int, default=32, help="patch bank side")
    ap.add_argument("--mine-recentre", default="auto", metavar="R|auto|off",
                    help="mine --recentre: candidates on their blobs' density centres (default auto, as the CLI)")
    ap.add_argument("--crop", type=int, default=24, help="explore train bbox (centre crop)")
    ap.add_argument("--explore-epochs", type=int, default=8)
    ap.add_argument("--explore-objective", default=None, help="explore train objective (default: the recipe's)")
    ap.add_argument("--widths", default="16,32,64", help="explore trunk widths (CPU default 32,64,128)")
    ap.add_argument("--atlas-method", default="pca", help="map projection (the clusters do not depend on it)")
    ap.add_argument("--n-clusters", type=int, default=48)
    ap.add_argument("--overcluster", type=int, default=256)
    ap.add_argument("--cluster-method", default="spectral")
    ap.add_argument("--level", choices=("subcluster", "cluster"), default="subcluster",
                    help="the atlas level the rule and the oracle choose from (the other level's selections are "
                    "reported without a picker)")
    ap.add_argument("--variants", default="",
                    help="comma list of extra selections: 'neg' = the rule's selection with the clusters holding none of "
                    "it as --negatives; 'dedup' = the rule's selection with candidates closer than the target's radius "
                    "merged (one label per particle)")
    ap.add_argument("--skip", default="", help="comma list of selections (rule, oracle) whose picker is not trained "
                    "(measured in another run)")
    ap.add_argument("--skip-manual", action="store_true", help="no 6-manual-label picker (measured in another run)")
    ap.add_argument("--crop-budget", type=int, default=None,
                    help="labelled crops per picker (epochs = budget / (labels x repeats), at least 1) instead of the "
                    "recipe's ~600: the same reduced budget for every picker on a loaded machine")
    ap.add_argument("--refine-epochs", type=int, default=None, help="default: the picker recipe's")
    ap.add_argument("--train-json", default=None, metavar="JSON",
                    help='extra refine.train options of every picker, e.g. \'{"negative_crops": 1}\'')
    ap.add_argument("--manual", type=int, default=6, help="manual labels of the reference picker")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-explore", default=None, metavar="DIR",
                    help="reuse a benchmarks/explore.py work folder (e.g. WORK/la3_s0): its store, candidates and slab "
                    "embeddings; the loop starts at the atlas (their times are in the explore run)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default=None, help="JSON (default results/label_free.json; runs are appended)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    a = parse(argv)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "milotile"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    res = run(a)
    res.update(command=" ".join(["python benchmarks/label_free.py", *(argv if argv is not None else sys.argv[1:])]),
               machine=machine(), load_avg_at_start=load0, load_avg_at_end=os.getloadavg(),
               total_s=round(time.perf_counter() - t0, 1),
               options={k: v for k, v in vars(a).items() if k not in ("work", "out")})
    out = Path(a.out or Path(__file__).parent / "results" / "label_free.json")
    prev = json.loads(out.read_text()) if out.exists() else {"benchmark": "label_free", "runs": []}
    prev["runs"].append(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prev, indent=2, default=str) + "\n")
    summary = {k: res[k] for k in ("preset", "setting", "seed", "target")}
    for tag in ("rule", "rule_neg", "rule_dedup", "oracle", "manual"):
        p = res.get(f"picker_{tag}")
        summary[f"f1_{tag}"] = None if p is None else p["f1"]
    print(json.dumps(summary))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
