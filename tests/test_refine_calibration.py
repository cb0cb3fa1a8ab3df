"""Label-score calibration of the automatic threshold (issue 23): the hold-out plan, the record the
trainer writes into the contract, and how the threshold uses it when the training labels are memorised."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import milotile as mt
from milotile.errors import InputError
from milotile.refine.calibration import calibration_epoch, holdout_mask
from milotile.refine.recipe import PickerRecipe
from milotile.refine.threshold import (
    apply_auto_threshold,
    calibrated_label_scores,
    f1_label_threshold,
)


def test_holdout_mask_per_class_bounds_and_seed() -> None:
    df = pd.DataFrame({"cls": [0] * 9 + [1] * 3 + [2] * 6})
    m = holdout_mask(df, 0.33, seed=5)
    assert m[:9].sum() == 3  # a third of 9
    assert m[9:12].sum() == 0  # too few labels to hold any out
    assert m[12:].sum() == 2  # at least two, at most n - 2
    np.testing.assert_array_equal(m, holdout_mask(df, 0.33, seed=5))
    assert holdout_mask(df, 0.9, seed=5)[:9].sum() == 7  # never fewer than two trained labels
    assert not holdout_mask(df, 0.0, seed=5).any()
    assert holdout_mask(pd.DataFrame({"x": np.arange(6.0)}), 0.33, seed=1).sum() == 2  # no cls: one class


def test_calibration_epoch_lies_inside_the_run() -> None:
    assert calibration_epoch(20, 0.5) == 10
    assert calibration_epoch(2, 0.5) == 1
    assert calibration_epoch(10, 0.99) == 9
    assert calibration_epoch(1, 0.5) == 0 and calibration_epoch(10, 0.0) == 0


def test_recipe_validates_the_calibration_fields() -> None:
    assert PickerRecipe().calibration_holdout == 0  # off by default (lost to the fixed shift on the hard preset)
    with pytest.raises(InputError, match="calibration_holdout"):
        PickerRecipe(calibration_holdout=1.0)
    with pytest.raises(InputError, match="calibration_epochs"):
        PickerRecipe(calibration_epochs=0.0)


def _ranks(values: np.ndarray, peaks: np.ndarray) -> list[int]:
    srt = np.sort(peaks)
    return [int(len(srt) - np.searchsorted(srt, v, side="left")) for v in values]


def _memorised_case(seed: int) -> dict:
    """30 particles and 150 look-alikes/background peaks; 9 training labels whose scores the network raised by
    3 logit units (memorised), and a checkpoint where 3 other particles were held out (not raised)."""
    rng = np.random.default_rng(seed)
    z_part = rng.normal(1.5, 1.0, 30)
    z_bg = rng.normal(-2.0, 1.2, 150)
    lab = rng.choice(30, 12, replace=False)
    trained, held = lab[:9], lab[9:]
    z_final = z_part.copy()
    z_final[trained] += 3.0  # the final network flatters its labels
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    peaks = sig(np.r_[z_final, z_bg])
    # the checkpoint: trained labels raised as well, the held-out ones not
    ck = sig(np.r_[np.where(np.isin(np.arange(30), trained), z_part + 3.0, z_part), z_bg])
    record = {"n_peaks": len(ck), "held_out": sig(z_part[held]).tolist(), "trained": ck[trained].tolist(),
              "held_out_rank": _ranks(ck[held], ck), "trained_rank": _ranks(ck[trained], ck)}
    return {"peaks": peaks, "is_particle": np.r_[np.ones(30, bool), np.zeros(150, bool)],
            "labels": peaks[trained], "record": record}


def _f1(t: float, peaks: np.ndarray, is_particle: np.ndarray) -> float:
    keep = peaks >= t
    tp = int((keep & is_particle).sum())
    return 2 * tp / max(int(keep.sum()) + int(is_particle.sum()), 1)


def test_calibration_lowers_the_threshold_of_memorised_labels() -> None:
    fixed, cal, t_fixed, t_cal, n_fixed, n_cal = [], [], [], [], [], []
    for seed in range(12):
        c = _memorised_case(seed)
        t0, i0 = f1_label_threshold(c["labels"], c["peaks"])  # the fixed shift of uncalibrated pickers
        pseudo = calibrated_label_scores(c["labels"], c["peaks"], c["record"])
        t1, i1 = f1_label_threshold(pseudo, c["peaks"], shift=0.0)
        fixed.append(_f1(t0, c["peaks"], c["is_particle"]))
        cal.append(_f1(t1, c["peaks"], c["is_particle"]))
        t_fixed.append(t0)
        t_cal.append(t1)
        n_fixed.append(i0["n_particles"])
        n_cal.append(i1["n_particles"])
    # memorised labels make the particles look fewer and the threshold too high; the calibration undoes it
    assert np.mean(n_fixed) < 22 and abs(np.mean(n_cal) - 30) < abs(np.mean(n_fixed) - 30)
    assert np.mean(t_cal) < np.mean(t_fixed)
    assert np.mean(cal) > np.mean(fixed) + 0.05


def test_calibrated_scores_rules_and_missed_labels() -> None:
    peaks = np.linspace(0.99, 0.06, 50)
    record = {"n_peaks": 60, "held_out_rank": [10, 0], "trained_rank": [1, 2, 3, 5]}
    held = calibrated_label_scores(np.array([0.99, 0.98, 0.97, 0.95]), peaks, record, rule="held_out")
    assert held[0] == pytest.approx(peaks[9]) and held[1] == 0.0  # rank 10 -> 10th peak; missed -> 0
    shifted = calibrated_label_scores(np.array([0.99, 0.98, 0.0]), peaks, record, rule="rank_shift")
    assert shifted[2] == 0.0 and np.all(shifted[:2] < np.array([0.99, 0.98]))  # lowered, a missed label stays missed
    union = calibrated_label_scores(np.array([0.99, 0.98, 0.0]), peaks, record)
    assert len(union) == 2 + 3
    with pytest.raises(ValueError, match="calibration rule"):
        calibrated_label_scores(np.array([0.9]), peaks, record, rule="nope")


def test_apply_auto_threshold_uses_the_contract_calibration() -> None:
    c = _memorised_case(3)
    n = len(c["peaks"])
    picks = pd.DataFrame({"tomogram": "t0", "x": np.arange(n) * 20.0, "y": 0.0, "z": 0.0, "score": c["peaks"],
                          "class": "particle"})
    lab_idx = np.flatnonzero(np.isin(c["peaks"], c["labels"]))
    rows = [["t0", float(picks.x[i]), 0.0, 0.0, "particle"] for i in lab_idx]
    old = {"bbox": 16, "train_labels": rows}
    new = {**old, "calibration": {"version": 1, "classes": {"particle": c["record"]}}}
    _, i_old = apply_auto_threshold(picks, old)
    _, i_new = apply_auto_threshold(picks, new)
    _, i_off = apply_auto_threshold(picks, new, calibration="off")
    assert not i_old["particle"]["calibrated"] and i_new["particle"]["calibrated"]
    assert i_off["particle"]["threshold"] == i_old["particle"]["threshold"]  # "off": the rule of older pickers
    assert i_new["particle"]["threshold"] < i_old["particle"]["threshold"]
    assert i_new["particle"]["n_labels_seen"] == len(rows)


@pytest.mark.slow
def test_training_records_the_calibration(tmp_path) -> None:
    from milotile.refine.train import train
    from milotile.synth import synth

    res = synth(tmp_path / "synth", seed=2, n_tomograms=1, size=(32, 80, 80), n_particles=10, filament=False)
    col = mt.ingest(res.manifest, tmp_path / "store.zarr")
    fast = dict(bbox=12, arch_config={"start_filts": 4}, crop=(4, 32, 32), batch_size=2, seed=3, device="cpu",
                repeats=1, tta=1)
    picker = train(col, res.ground_truth, epochs=2, out=tmp_path / "run", calibration_holdout=0.33, **fast)
    cal = picker.contract["calibration"]
    assert cal["epoch"] == 1 and cal["version"] == 1
    rec = next(iter(cal["classes"].values()))
    assert len(rec["held_out"]) == round(0.33 * len(res.ground_truth)) and len(rec["trained"]) == len(
        res.ground_truth) - len(rec["held_out"])
    assert all(r >= 0 for r in rec["held_out_rank"] + rec["trained_rank"])
    assert picker.contract["recipe"]["calibration_holdout"] == pytest.approx(0.33)
    off = train(col, res.ground_truth, epochs=2, out=tmp_path / "run_off", **fast)  # the default: none
    assert "calibration" not in off.contract
