"""Tests of the issue-15 accuracy pieces: hard synthetic preset, TTA, automatic threshold, PU prior."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from milotile.errors import InputError
from milotile.refine.prior import estimate_prior, positive_voxels_per_particle
from milotile.refine.targets import target_geometry
from milotile.refine.threshold import (
    LABEL_MARGIN,
    apply_auto_threshold,
    choose_threshold,
    otsu_logit,
    pu_label_threshold,
)
from milotile.refine.tta import TTA_VIEWS, tta_average
from milotile.synth import synth
from milotile.synth.hard import HARD_RADII, add_gradient, hard_species


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("hard")
    return synth(out, seed=3, n_tomograms=1, size=(48, 112, 112), angles=(-60, 60, 6), preset="hard",
                 n_particles=8, crowders=10)


def test_hard_preset_content(hard) -> None:
    gt = hard.ground_truth
    assert set(gt["species"]) == set(HARD_RADII)
    assert dict(zip(gt["species"], gt["radius"], strict=False)) == HARD_RADII
    kinds = hard.distractors["kind"].value_counts()
    assert kinds.get("crowder", 0) >= 5  # similar-sized decoys were placed
    assert hard.info["preset"] == "hard" and hard.info["snr"] == 0.1 and hard.info["gradient"] == 0.5


def test_hard_species_shapes_depend_on_seed() -> None:
    p = np.stack(np.meshgrid(*[np.arange(-12.0, 13.0)] * 3, indexing="ij"))
    a = hard_species(np.random.default_rng(0))["big"].shape(p)
    b = hard_species(np.random.default_rng(0))["big"].shape(p)
    c = hard_species(np.random.default_rng(1))["big"].shape(p)
    assert np.array_equal(a, b)
    assert np.abs(a - c).sum() > 0.05 * a.sum()  # a different seed draws a different template


def test_gradient_is_a_smooth_ramp() -> None:
    rec = np.zeros((4, 32, 32), np.float32)
    rec[:, ::2] = 1.0  # std 0.5
    before = rec.copy()
    add_gradient(rec, 2.0, np.random.default_rng(0))
    diff = rec - before
    assert np.ptp(diff) == pytest.approx(1.0, rel=1e-3)  # 2 std peak to peak
    assert np.allclose(diff[0], diff[3])  # constant along z


def test_bad_preset_and_crowders(tmp_path) -> None:
    with pytest.raises(InputError, match="preset"):
        synth(tmp_path / "a", preset="medium", size=(32, 32, 32))
    with pytest.raises(InputError, match="crowders"):
        synth(tmp_path / "b", preset="hard", crowders=-1, size=(32, 32, 32))


def test_tta_views_are_exact_on_the_stride2_grid() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 16, 20)).astype(np.float32)

    def pred(v: np.ndarray) -> np.ndarray:  # an equivariant "network": output voxel k = input 2k
        return v[None, :, ::2, ::2]

    ref = pred(x)
    out = tta_average(pred, x, len(TTA_VIEWS))
    assert out.shape == ref.shape
    assert np.allclose(out[..., 1:, 1:], ref[..., 1:, 1:], atol=1e-6)  # edge row/col repeat the border
    # a non-equivariant function is averaged, not passed through
    assert not np.allclose(tta_average(lambda v: v[None, :, ::2, ::2] * np.arange(v.shape[2] // 2), x, 2),
                           pred(x) * np.arange(10))


def test_threshold_valley_and_label_rule() -> None:
    rng = np.random.default_rng(0)
    bg = rng.beta(1, 30, 2000)  # background peaks near 0
    crowd = rng.beta(20, 6, 150)  # decoys scoring around 0.77
    fg = rng.beta(60, 1.5, 60)  # particles near 0.98
    s = np.r_[bg, crowd, fg]
    t_valley = otsu_logit(s[s > 0.05])
    assert 0.2 < t_valley < 0.95
    lab = rng.choice(fg, 6, replace=False)  # labels: six particles picked at random
    t, src = choose_threshold(s, lab)
    assert src == "labels" and t > t_valley
    chosen = pu_label_threshold(lab, s[s >= 0.05])
    assert chosen in lab  # the criterion picks one of the label scores, lowered by the margin
    assert t == pytest.approx(1 / (1 + np.exp(-(np.log(chosen / (1 - chosen)) - LABEL_MARGIN))))
    truth = np.r_[np.zeros(len(bg) + len(crowd)), np.ones(len(fg))].astype(bool)

    def f1(thr: float) -> float:
        keep = s >= thr
        tp = (keep & truth).sum()
        return 2 * tp / (keep.sum() + truth.sum())

    assert f1(t) > f1(t_valley) + 0.1  # the label rule removes the decoys the valley keeps
    # labels scoring below the valley cannot pull the threshold under it
    t2, src2 = choose_threshold(s, np.array([0.1, 0.2]))
    assert src2 == "valley" and t2 == pytest.approx(t_valley)
    assert choose_threshold(np.array([0.01, 0.02]))[1] == "floor"
    # one weak label among the decoys does not pull the threshold down to the decoys (the weakest
    # label's score would: F1 falls to the valley's)
    weak = np.r_[lab[:5], 0.8]
    t3, _ = choose_threshold(s, weak)
    lo = 1 / (1 + np.exp(-(np.log(0.8 / 0.2) - 0.5)))
    assert t3 > 0.85 and f1(t3) > f1(lo) + 0.1


def test_valley_does_not_split_clean_particles() -> None:
    """Clean data: nearly every peak is a particle (scores 0.55-0.97, no background mode). Otsu then
    splits the particles; labels the network scores as particles overrule it."""
    rng = np.random.default_rng(1)
    s = np.clip(rng.normal(0.84, 0.08, 45), 0.5, 0.99)
    t_valley = otsu_logit(s)
    lab = np.sort(s)[[8, 15, 22, 30]]  # four labels, a random sample of the particles
    assert t_valley > np.median(lab)  # the valley would drop most particles
    t, src = choose_threshold(s, lab)
    assert src == "labels" and t < lab.min() and (s >= t).mean() > 0.8


def test_apply_auto_threshold_uses_contract_labels() -> None:
    picks = pd.DataFrame({"tomogram": ["t"] * 6, "x": [10, 30, 50, 70, 90.0, 110.0], "y": 10.0, "z": 10.0,
                          "score": [0.97, 0.9, 0.8, 0.06, 0.07, 0.08], "class": "particle"})
    contract = {"bbox": 16, "train_labels": [["t", 10.0, 10.0, 10.0, "particle"]]}
    kept, info = apply_auto_threshold(picks, contract)
    assert info["particle"]["source"] == "labels"  # 0.97 - 0.75 logit -> 0.94
    assert set(kept["x"]) == {10.0}
    kept2, info2 = apply_auto_threshold(picks, {"bbox": 16, "train_labels": []})
    assert info2["particle"]["source"] == "valley" and set(kept2["x"]) == {10.0, 30.0, 50.0}


def test_prior_is_small_and_scales_with_particles(hard) -> None:
    import milotile as mt

    col = mt.ingest(hard.manifest, hard.out_dir / "store.zarr", overwrite=True)
    gt = hard.ground_truth
    geom = target_geometry(24)
    assert positive_voxels_per_particle(geom, 0.8) >= 1
    lab = gt[gt["species"] == "big"][["tomogram", "x", "y", "z"]]
    tau, info = estimate_prior(col, lab, 24, geom, 0.8)
    assert 1e-5 <= tau < 0.01  # far below MiLoPYP's fixed 0.1 / 0.01
    assert info["n_estimated"] >= len(lab)


def test_default_epochs_keep_the_labelled_crop_budget() -> None:
    from milotile.refine.train import LABELLED_CROP_BUDGET, default_epochs

    assert default_epochs(6, 5) == 20 and default_epochs(18, 5) == 7  # the two settings measured
    assert default_epochs(1, 1) == 20 and default_epochs(10_000, 5) == 6  # clipped to 6-20
    assert default_epochs(12, 5) * 12 * 5 == pytest.approx(LABELLED_CROP_BUDGET, rel=0.1)
