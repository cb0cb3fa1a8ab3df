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
    LABEL_SHIFT,
    apply_auto_threshold,
    choose_threshold,
    f1_label_threshold,
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


def _raise(p: np.ndarray, logit_units: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(np.log(p / (1 - p)) + logit_units)))


def _f1_at(s: np.ndarray, truth: np.ndarray, thr: float) -> float:
    keep = s >= thr
    return 2 * (keep & truth).sum() / (keep.sum() + truth.sum())


@pytest.mark.parametrize("decoy_mean", [0.77, 0.9, 0.97])
def test_f1_rule_tracks_the_best_threshold(decoy_mean: float) -> None:
    """Look-alikes scoring as high as the particles (the failure of the r²/N rule): the threshold of the
    estimated F1 stays near the best one whatever the decoys score."""
    rng = np.random.default_rng(0)
    bg = rng.beta(1, 30, 2000)
    crowd = rng.beta(40 * decoy_mean, 40 * (1 - decoy_mean), 150)
    fg = rng.beta(60, 1.5, 60)
    s = np.r_[bg, crowd, fg]
    truth = np.r_[np.zeros(len(bg) + len(crowd)), np.ones(len(fg))].astype(bool)
    best = max(_f1_at(s, truth, t) for t in np.unique(s))
    gaps, old = [], []
    for k in range(10):  # ten draws of 9 labels, scored LABEL_SHIFT higher than the particles (training labels)
        lab = _raise(np.random.default_rng(k).choice(fg, 9, replace=False), LABEL_SHIFT)
        t, src = choose_threshold(s, lab)
        assert src == "labels"
        gaps.append(best - _f1_at(s, truth, t))
        old.append(best - _f1_at(s, truth, choose_threshold(s, lab, rule="pu")[0]))
    # 9 labels are a noisy sample: an unlucky draw (labels all among the top scorers) still costs F1
    assert np.median(gaps) < 0.05 and np.mean(gaps) < 0.1, gaps
    if decoy_mean == 0.9:  # decoys just below the particles: the r²/N rule lets them in, this one does not
        assert np.mean(gaps) < np.mean(old) - 0.05 and np.median(gaps) < np.median(old) - 0.1, (gaps, old)
    t, info = f1_label_threshold(lab, s)
    assert 0.5 * len(fg) < info["n_particles"] < 2.5 * len(fg)  # the particle count it estimated


def test_threshold_without_labels_is_the_valley_and_the_old_rule_stays_available() -> None:
    rng = np.random.default_rng(0)
    s = np.r_[rng.beta(1, 30, 2000), rng.beta(60, 1.5, 60)]
    t_valley = otsu_logit(s[s > 0.05])
    assert choose_threshold(s) == (pytest.approx(t_valley), "valley")
    assert choose_threshold(np.array([0.01, 0.02]))[1] == "floor"
    lab = s[-9:]
    t, src = choose_threshold(s, lab, rule="pu")
    chosen = pu_label_threshold(lab, s[s >= 0.05])
    assert src == "labels" and t == pytest.approx(1 / (1 + np.exp(-(np.log(chosen / (1 - chosen)) - LABEL_MARGIN))))
    with pytest.raises(ValueError, match="rule"):
        choose_threshold(s, lab, rule="otsu")
    # a weakly trained picker (3 labels, a flat heatmap: every peak 0.11-0.13, the labels among the top):
    # the label shift must not take the labels below every peak (it did: 813 picks, F1 0.03 in the demo)
    flat = np.linspace(0.110, 0.1334, 400)
    t_flat, src_flat = choose_threshold(flat, np.array([0.127, 0.131, 0.128]))
    assert src_flat == "labels" and 0.12 < t_flat <= 0.127 and (flat >= t_flat).sum() < 150
    # labels the network missed (all below the floor): nothing to estimate from, keep everything above it
    t2, info = f1_label_threshold(np.array([0.01, 0.02, 0.03]), s)
    assert t2 == pytest.approx(0.05) and info["recall"] == 0.0


def test_valley_does_not_split_clean_particles() -> None:
    """Clean data: nearly every peak is a particle (scores 0.55-0.97, no background mode). Otsu then
    splits the particles; labels the network scores as particles overrule it."""
    rng = np.random.default_rng(1)
    s = np.clip(rng.normal(0.84, 0.08, 45), 0.5, 0.99)
    t_valley = otsu_logit(s)
    lab = np.sort(s)[[8, 15, 22, 30]]  # four labels, a random sample of the particles
    assert t_valley > np.median(lab)  # the valley would drop most particles
    t, src = choose_threshold(s, lab)
    assert src == "labels" and t <= lab.min() and (s >= t).mean() > 0.8


def test_apply_auto_threshold_uses_contract_labels() -> None:
    picks = pd.DataFrame({"tomogram": ["t"] * 6, "x": [10, 30, 50, 70, 90.0, 110.0], "y": 10.0, "z": 10.0,
                          "score": [0.97, 0.9, 0.8, 0.06, 0.07, 0.08], "class": "particle"})
    contract = {"bbox": 16, "train_labels": [["t", 10.0, 10.0, 10.0, "particle"]]}
    kept, info = apply_auto_threshold(picks, contract)
    assert info["particle"]["source"] == "labels"  # one label, at 0.97: the picks near it, not the low peaks
    assert 10.0 in set(kept["x"]) and set(kept["x"]) <= {10.0, 30.0}
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

    assert default_epochs(6, 5) == 15 and default_epochs(18, 5) == 7  # the two settings measured
    assert default_epochs(1, 1) == 15 and default_epochs(10_000, 5) == 6  # clipped to 6-15
    assert default_epochs(12, 5) * 12 * 5 == pytest.approx(LABELLED_CROP_BUDGET, rel=0.1)
