"""A small store with a picks table of true particles (high scores) and decoys (low scores) for the review tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

import milotile as mt
from milotile.synth import synth


def review_store(root, n_decoys: int = 30):
    """Synthesise and ingest two 32x96x96 tomograms; ``tables/picks`` = the true particles (scores 0.35-1), then
    ``n_decoys`` random positions (scores 0.05-0.65); returns the collection, the picks and the number of true rows."""
    res = synth(root / "synth", seed=2, n_tomograms=2, size=(32, 96, 96), n_particles=12, filament=False)
    col = mt.ingest(res.manifest, root / "store.zarr")
    gt = res.ground_truth
    rng = np.random.default_rng(0)
    decoys = pd.DataFrame({"tomogram": rng.choice(col.names, n_decoys), "x": rng.uniform(8, 88, n_decoys),
                           "y": rng.uniform(8, 88, n_decoys), "z": rng.uniform(4, 28, n_decoys)})
    picks = pd.concat([gt[["tomogram", "x", "y", "z"]].assign(score=rng.uniform(0.35, 1.0, len(gt))),
                       decoys.assign(score=rng.uniform(0.05, 0.65, n_decoys))], ignore_index=True)
    col.write_table("picks", picks, params={"threshold": 0.4, "run": "fake-run", "checkpoint": None})
    return col, picks, len(gt)
