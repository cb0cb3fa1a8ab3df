"""Benchmark: where the shape check measures the labels (issue 23), re-scored on saved pickers.

For each saved picker run (a ``refine_hard.py`` / ``label_free.py`` / ``review.py`` run folder), the picks decoded at
the automatic floor without the shape check (``picks_all.parquet`` when the run saved it, else picked again) are
checked twice with :func:`milotile.refine.shape.check_shapes`: ``footing="labels"`` (the labels' descriptors taken
at the labels' coordinates, as stored in the contract) and ``footing="peaks"`` (taken at the pick nearest each
label: the default). The automatic threshold is chosen on each, and F1 is scored against the truth at it and at
the best threshold (Hungarian matching within half the target's radius, ``refine_hard.scores``). Same networks,
same picks: only the footing differs.

    python benchmarks/shape_footing.py --case STORE GROUND_TRUTH SPECIES RUN [--case ...] --json out.json

``SPECIES`` ``auto``: the species most of the picker's training labels lie on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

FOOTINGS = ("labels", "peaks")


def _species_of_labels(contract: dict, gt: pd.DataFrame) -> str:
    from scipy.spatial import cKDTree

    lab = pd.DataFrame(contract["train_labels"], columns=["tomogram", "x", "y", "z", "class"])
    found = []
    for tomo, g in lab.groupby("tomogram"):
        truth = gt[gt["tomogram"] == tomo]
        _, j = cKDTree(truth[["x", "y", "z"]].to_numpy()).query(g[["x", "y", "z"]].to_numpy(np.float64))
        found += list(truth["species"].to_numpy()[j])
    return str(pd.Series(found).mode()[0])


def score_case(store: str, truth: str, species: str, run: str) -> dict:
    """F1 at the automatic and the best threshold under each footing for one saved picker."""
    from refine_hard import scores

    import milotile as mt
    from milotile.refine import Picker, predict
    from milotile.refine.shape import check_shapes
    from milotile.refine.threshold import AUTO_FLOOR, apply_auto_threshold

    col = mt.open(store)
    gt = pd.read_parquet(truth)
    ckpt = Path(run) / ("last.pt" if (Path(run) / "last.pt").exists() else "best.pt")
    picker = Picker.load(ckpt, device="cpu")
    if species == "auto":
        species = _species_of_labels(picker.contract, gt)
    target = gt[gt["species"] == species]
    r = float(target["radius"].iloc[0])
    saved = Path(run) / "picks_all.parquet"
    if saved.exists():  # refine_hard.py's picks, checked: the network's own scores back
        raw = pd.read_parquet(saved)
        raw = raw.assign(score=raw["score_model"]).drop(columns=["score_model", "shape_d2"])
    else:
        raw = predict.pick(col, picker, threshold=AUTO_FLOOR, write_heatmaps=False, table=None, shape_check=False)
    out: dict = {"run": str(run), "species": species}
    for footing in FOOTINGS:
        checked = check_shapes(col, raw, picker.contract, footing=footing)
        thr = float(apply_auto_threshold(checked, picker.contract)[1].popitem()[1]["threshold"])  # the one class
        s = scores(checked, target[["tomogram", "x", "y", "z"]], r / 2, thr)
        out[footing] = {"f1_auto": s["f1_auto"], "f1_best": s["f1_best"], "threshold": s["auto_threshold"]}
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=4, action="append", required=True, metavar=("STORE", "TRUTH", "SPECIES", "RUN"))
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    rows = [score_case(*c) for c in a.case]
    summary = {f: {k: round(float(np.mean([r[f][k] for r in rows])), 4) for k in ("f1_auto", "f1_best")} for f in FOOTINGS}
    Path(a.json).write_text(json.dumps({"command": " ".join(["python benchmarks/shape_footing.py", *sys.argv[1:]]),
                                        "load_avg": os.getloadavg(), "cases": rows, "mean": summary}, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
