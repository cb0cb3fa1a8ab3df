"""``milotile demo``: the whole pipeline, end to end, on a generated collection.

synthetic data -> ingest -> preprocess -> mine (recall per species) -> patch banks (3d and 2d3d)
-> SimSiam exploration (train + embed) -> PU refinement training (30 % of one species labelled)
-> tiled picking on every tomogram (F1 against the ground truth) -> fiber tracing -> exports.

Everything goes through the public Python API, exactly as a user would chain it. A JSON report
(``demo_report.json``) and a short summary are written to the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes and lengths of the demo run (the defaults finish in a few minutes on 2 cores)."""

    out: Path = Path("demo_out")
    seed: int = 0
    n_tomograms: int = 3
    size: tuple[int, int, int] = (96, 192, 192)
    snr: float = 0.5
    explore_epochs: int = 4
    refine_epochs: int = 8
    refine_repeats: int = 10  # crops per labelled particle and epoch (few labels: more steps per epoch)
    refine_species: str | None = None  # default: the largest species
    label_fraction: float = 0.3
    workers: int | None = None


@dataclass
class DemoReport:
    """What each stage did and measured."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, **facts: Any) -> None:
        self.stages[stage] = {"seconds": round(seconds, 2), **facts}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in facts.items() if not isinstance(v, (dict, list)))
        log.info("[demo] %-10s %6.1f s  %s", stage, seconds, shown)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def candidate_recall(cands: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Fraction of ground-truth particles with a candidate within their radius, per species."""
    from scipy.spatial import cKDTree

    out: dict[str, float] = {}
    for species, gt in truth.groupby("species"):
        hit = 0
        for tomo, g in gt.groupby("tomogram"):
            c = cands[cands["tomogram"] == tomo]
            if not len(c):
                continue
            tree = cKDTree(c[["x", "y", "z"]].to_numpy())
            d, _ = tree.query(g[["x", "y", "z"]].to_numpy())
            hit += int(np.sum(d <= g["radius"].to_numpy()))
        out[str(species)] = hit / max(len(gt), 1)
    return out


def run_demo(cfg: DemoConfig) -> DemoReport:
    """Run every stage of milotile on generated data; returns the report (also written as JSON)."""
    from milotile.api import ingest, open_collection
    from milotile.cluster import cluster
    from milotile.explore import train as explore_train
    from milotile.refine import train as refine_train

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    if runs.exists():  # training runs of an earlier demo in this folder: the demo starts them afresh
        import shutil

        log.info("[demo] removing the previous demo's training runs in %s", runs)
        shutil.rmtree(runs)
    report = DemoReport()

    # 1. synthetic data ---------------------------------------------------------------------
    from milotile.synth import synth

    data, s = _timed(lambda: synth(out / "data", seed=cfg.seed, n_tomograms=cfg.n_tomograms,
                                   size=cfg.size, snr=cfg.snr))
    truth = data.ground_truth
    report.add("synth", s, tomograms=len(data.names), particles=len(truth),
               species=sorted(truth["species"].unique().tolist()), folder=str(data.out_dir))

    with cluster(workers=cfg.workers):
        # 2. ingest ----------------------------------------------------------------------------
        store = out / "project.zarr"
        col, s = _timed(lambda: ingest(data.manifest, store))
        report.add("ingest", s, store=str(store), tomograms=len(col),
                   with_tilt_series=sum(col[n].tilt_series is not None for n in col.names))

        # 3. preprocess + mine -----------------------------------------------------------------
        _, s = _timed(lambda: col.preprocess(gauss=0.8))
        report.add("preprocess", s, gauss=0.8)
        cands, s = _timed(lambda: col.mine(dog=(3, 5), threshold_std=0.5, nms_distance=7, border=8))
        recall = candidate_recall(cands.df, truth)
        report.add("mine", s, candidates=len(cands), recall_per_species=recall,
                   mean_recall=float(np.mean(list(recall.values()))))

        # 4. patch banks -----------------------------------------------------------------------
        bbox = 24
        bank3d, s = _timed(lambda: cands.patches(bbox=bbox, modes=("slab",), shifts=True))
        report.add("patches", s, key=bank3d.key, rows=bank3d.n, bbox=bbox, mode="slab")
        bank2d3d, s = _timed(lambda: cands.patches(bbox=bbox, modes=("tiltsum", "slice"), shifts=True))
        report.add("patches2d3d", s, key=bank2d3d.key, mode="tiltsum+slice")

        # 5. exploration: SimSiam ----------------------------------------------------------------
        encoder, s = _timed(lambda: explore_train(col, bank3d, epochs=cfg.explore_epochs, batch_size=128,
                                                  out=out / "runs" / "explore3d", seed=cfg.seed))
        report.add("explore", s, epochs=cfg.explore_epochs, checkpoint=str(encoder.path))
        emb, s = _timed(lambda: encoder.embed(col, bank3d))
        report.add("embed", s, rows=len(emb), dims=int(emb.array.shape[1]), key=emb.key)

        # 6. refinement: PU picker from 30 % of one species in one tomogram ----------------------
        species = cfg.refine_species or str(truth.groupby("species")["radius"].mean().idxmax())
        rng = np.random.default_rng(cfg.seed)
        first = data.names[0]
        pool = truth[(truth["species"] == species) & (truth["tomogram"] == first)]
        n_lab = max(3, int(round(cfg.label_fraction * len(pool))))
        labels = pool.iloc[np.sort(rng.choice(len(pool), size=min(n_lab, len(pool)), replace=False))]
        labels_path = out / "labels.parquet"
        labels[["tomogram", "x", "y", "z"]].assign(**{"class": species}).to_parquet(labels_path)
        radius = float(pool["radius"].mean())
        bbox_r = int(2 * round(radius) + 2)
        # tau 0.01 is MiLoPYP's documented recommendation; a 16-filter U-Net trains fast on a CPU
        picker, s = _timed(lambda: refine_train(col, labels_path, bbox=bbox_r, epochs=cfg.refine_epochs,
                                                   arch="unet4", arch_config={"start_filts": 16}, tau=0.01,
                                                   repeats=cfg.refine_repeats, out=out / "runs" / "refine",
                                                   seed=cfg.seed))
        report.add("refine", s, species=species, labelled=len(labels), of=len(pool), bbox=bbox_r)

        # 7. picking on every tomogram ------------------------------------------------------------
        # the threshold validation chose for the checkpoint (pick's default)
        picks, s = _timed(lambda: picker.pick(col, out=out / "picks.parquet"))
        from milotile.metrics import evaluate

        gt = truth[truth["species"] == species]
        scores = evaluate(picks, gt, radius=radius / 2 + 1.0, by="tomogram")
        f1 = scores.set_index("group")["f1"].round(3).to_dict()
        report.add("pick", s, picks=len(picks), f1_per_tomogram=f1, f1_all=float(f1["all"]))

        # 8. fiber mode on the synthetic filament ----------------------------------------------
        from milotile.refine.fiber import trace_fibers

        fil = data.filaments
        fibers, s = _timed(lambda: trace_fibers(fil.iloc[::2].reset_index(drop=True), link_distance=8,
                                                min_points=5, spacing=4))
        report.add("fiber", s, input_points=len(fil) // 2, fibers=int(fibers["fiber_id"].nunique()),
                   resampled_points=len(fibers))

    # 9. exports --------------------------------------------------------------------------------
    from milotile.formats import export

    exports: dict[str, str] = {}
    t0 = time.perf_counter()
    for fmt in ("milopyp", "imod", "star", "copick", "ndjson", "csv"):
        dest = out / "exports" / ("picks.csv" if fmt == "csv" else fmt)
        opts = {"object_name": species.replace("_", "-")} if fmt == "copick" else {}
        export(picks, fmt, dest, col=open_collection(store), **opts)
        exports[fmt] = str(dest)
    report.add("export", time.perf_counter() - t0, formats=list(exports))

    # 10. interoperability: the images viewers open, listed at the store root --------------------
    t0 = time.perf_counter()
    final = open_collection(store)
    final.consolidate()
    images = final.image_paths()
    copick_tomos = sorted(str(p.relative_to(out)) for p in (out / "exports" / "copick").glob("ExperimentRuns/*/VoxelSpacing*/*.zarr"))
    report.add("interop", time.perf_counter() - t0, images={k: len(v) for k, v in images.items()},
               copick_tomograms=len(copick_tomos), napari=f"napari --plugin napari-ome-zarr {store}/{images['tomograms'][0]}")

    (out / "demo_report.json").write_text(json.dumps(report.stages, indent=2, default=str))
    log.info("[demo] done: report in %s", out / "demo_report.json")
    return report
