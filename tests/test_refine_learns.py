"""The PU picker learns: trained on the labelled particles of one generated tomogram, it finds those of
another far better than chance (fixed seed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import milotile as mt
from milotile.metrics import evaluate
from milotile.store import write_mrc

SHAPE = (24, 64, 64)


def _volume(rng: np.random.Generator, n: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Dark spheres (radius 3) at separated random positions in Gaussian noise."""
    zz, yy, xx = np.indices(SHAPE)
    vol = rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform([5, 6, 6], np.array(SHAPE) - [5, 6, 6])
        if all(np.linalg.norm(p - q) > 9 for q in pts):
            pts.append(p)
    for z, y, x in pts:
        vol[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 9] -= 2.5
    zyx = np.array(pts)
    return vol, pd.DataFrame({"x": zyx[:, 2], "y": zyx[:, 1], "z": zyx[:, 0]})


@pytest.mark.slow
def test_picker_learns_from_labels(tmp_path):
    rng = np.random.default_rng(11)
    truth = []
    for i in range(2):
        vol, pts = _volume(rng, 14)
        write_mrc(tmp_path / f"t{i}.rec", vol, voxel_size=10.0)
        truth.append(pts.assign(tomogram=f"t{i}"))
    col = mt.ingest(tmp_path, tmp_path / "s.zarr")
    lab, val = truth
    picker = mt.refine.train(col, lab, val_labels=val, bbox=10, epochs=3, arch="unet4",
                             arch_config={"start_filts": 8, "stem_ch": 8, "feat_dim": 8}, crop=(4, 32, 32),
                             batch_size=4, tau=0.05, repeats=4, contrastive=False, seed=5, device="cpu",
                             out=tmp_path / "run")
    assert picker.contract["suggested_threshold"] is not None
    picks = picker.pick(col, names=["t1"], write_heatmaps=False, table=None)  # the validated threshold
    f1 = float(evaluate(picks, val, radius=2.5, by="tomogram").set_index("group").loc["all", "f1"])
    rand = val.assign(x=rng.uniform(0, 64, len(val)), y=rng.uniform(0, 64, len(val)), z=rng.uniform(0, 24, len(val)))
    chance = float(evaluate(rand.assign(score=1.0), val, radius=2.5, by="tomogram").set_index("group").loc["all", "f1"])
    assert f1 >= 0.5 and f1 > chance + 0.4, (f1, chance)
