"""The shape check of the picks (milotile.refine.shape): radial profiles, the labels' model, the penalty."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from milotile.errors import InputError
from milotile.ops.volume_reader import VolumeReader
from milotile.refine.shape import (
    MIN_LABELS,
    SHAPE_CAP,
    SHAPE_VERSION,
    SHAPE_WEIGHT,
    ShapeModel,
    ShapeReference,
    apply_shape_check,
    fit_shape_models,
    radial_profiles,
    shape_descriptors,
)

R_PART, R_DECOY = 6.0, 8.5


def _scene(seed: int = 0, noise: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark balls of radius 6 (particles) and 8.5 (decoys) on a noisy volume with a ramp."""
    rng = np.random.default_rng(seed)
    shape = (48, 160, 160)
    vol = rng.normal(0, noise, shape).astype(np.float32)
    vol += np.linspace(0, 2, shape[2], dtype=np.float32)[None, None, :]  # an ice gradient
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    parts, decoys = [], []
    centres = [(24, y, x) for y in range(24, 150, 32) for x in range(24, 150, 32)]
    rng.shuffle(centres)
    for i, c in enumerate(centres):
        r = R_PART if i % 2 == 0 else R_DECOY
        vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] -= 1.0
        (parts if r == R_PART else decoys).append(c)
    return vol, np.asarray(parts, float), np.asarray(decoys, float)


def _reader(vol: np.ndarray) -> VolumeReader:
    return VolumeReader(da.from_array(vol, chunks=(24, 64, 64)), "t")


def test_profiles_follow_the_ball_and_ignore_the_ramp() -> None:
    vol, parts, decoys = _scene(noise=0.0)
    prof = radial_profiles(_reader(vol), parts, R_PART, std=1.0)
    assert prof.shape == (len(parts), int(np.ceil(1.6 * R_PART)))
    assert np.allclose(prof, prof[0], atol=1e-3)  # same ball anywhere on the ramp: same profile
    assert (prof[0, :5] < -0.9).all() and np.abs(prof[0, 7:]).max() < 0.1  # dark inside r, background outside
    big = radial_profiles(_reader(vol), decoys, R_PART, std=1.0)
    assert big[0, 7] < -0.5  # the larger ball is still dark at 7 voxels


def test_model_separates_the_particles_from_larger_decoys() -> None:
    vol, parts, decoys = _scene(seed=1)
    rd = _reader(vol)
    std = float(vol.std())
    model = ShapeModel.fit(radial_profiles(rd, parts[:6], R_PART, std), R_PART)
    # unseen particles of the same kind in another noisy volume vs the decoys
    vol2, parts2, decoys2 = _scene(seed=2)
    rd2 = _reader(vol2)
    d_part = model.d2(radial_profiles(rd2, parts2, R_PART, float(vol2.std()))) / model.scale
    d_decoy = model.d2(radial_profiles(rd2, decoys2, R_PART, float(vol2.std()))) / model.scale
    assert np.median(d_part) < 3.0
    assert d_decoy.min() > np.median(d_part) * 3  # every decoy is further than a typical particle
    pen = model.penalty(model.d2(radial_profiles(rd2, decoys2, R_PART, float(vol2.std()))))
    assert (pen > 0.5 * SHAPE_WEIGHT * SHAPE_CAP).mean() > 0.8 and pen.max() <= SHAPE_WEIGHT * SHAPE_CAP + 1e-9


def test_apply_lowers_decoys_and_keeps_columns() -> None:
    vol, parts, decoys = _scene(seed=3)
    rd, std = _reader(vol), float(vol.std())
    labels = pd.DataFrame({"tomogram": "t", "z": parts[:6, 0], "y": parts[:6, 1], "x": parts[:6, 2]})
    models = fit_shape_models({"t": rd}, {"t": std}, labels, ["particle"], R_PART)
    assert set(models) == {"particle"} and models["particle"]["n_labels"] == 6
    pts = np.concatenate([parts, decoys])
    picks = pd.DataFrame({"tomogram": "t", "z": pts[:, 0], "y": pts[:, 1], "x": pts[:, 2], "score": 0.9,
                          "class": "particle"})
    out = apply_shape_check(picks, rd, std, models)
    assert list(out.index) == list(picks.index)
    assert np.allclose(out["score_model"], 0.9)
    kept = out["score"].to_numpy()
    assert np.median(kept[: len(parts)]) > 0.8  # particles keep (nearly) their score
    assert kept[len(parts):].max() < np.median(kept[: len(parts)])  # decoys fall below them
    assert ((0 < kept) & (kept < 1)).all()
    # a class without a model is left alone
    other = apply_shape_check(picks.assign(**{"class": "other"}), rd, std, models)
    assert np.allclose(other["score"], 0.9) and other["shape_d2"].isna().all()


def test_round_trip_and_too_few_labels() -> None:
    vol, parts, _ = _scene(seed=4)
    rd = _reader(vol)
    prof = radial_profiles(rd, parts, R_PART, 1.0)
    m = ShapeModel.fit(prof, R_PART)
    m2 = ShapeModel.from_dict(m.to_dict())
    assert np.allclose(m.d2(prof), m2.d2(prof)) and m2.n_labels == len(parts)
    with pytest.raises(InputError, match="at least"):
        ShapeModel.fit(prof[: MIN_LABELS - 1], R_PART)
    few = pd.DataFrame({"tomogram": "t", "z": parts[:2, 0], "y": parts[:2, 1], "x": parts[:2, 2]})
    assert fit_shape_models({"t": rd}, {"t": 1.0}, few, ["particle"], R_PART) == {}  # logged, not checked
    with pytest.raises(InputError, match="radius"):
        radial_profiles(rd, parts, 0.0, 1.0)
    two = pd.DataFrame({"tomogram": ["t", "u"], "z": parts[:2, 0], "y": parts[:2, 1], "x": parts[:2, 2], "score": 0.9,
                        "class": "particle"})
    with pytest.raises(InputError, match="one tomogram, got 2"):
        apply_shape_check(two, rd, 1.0, {"particle": m.to_dict()})


def test_peaks_on_labels_get_their_leave_one_out_distance() -> None:
    vol, parts, _ = _scene(seed=5)
    rd = _reader(vol)
    pts = pd.DataFrame({"tomogram": "t", "z": parts[:, 0], "y": parts[:, 1], "x": parts[:, 2]})
    prof = radial_profiles(rd, parts, R_PART, 1.0)
    m = ShapeModel.fit(prof, R_PART, points=pts)
    loo = np.asarray([r[4] for r in m.labels])
    inside = m.d2(prof)
    assert (loo > inside).all()  # a label is further from a model fitted without it
    got = m.peak_d2(prof, "t", parts + 1.0)  # peaks one voxel off each label
    assert np.allclose(got, np.maximum(inside, loo))
    assert np.allclose(m.peak_d2(prof, "other", parts), inside)  # no labels in that tomogram


def _rods_and_balls(seed: int, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark balls of radius 6 and dark rods (radius 2.5, half-length 6: the same extent) on noise."""
    rng = np.random.default_rng(seed)
    shape = (40, 192, 192)
    vol = rng.normal(0, noise, shape).astype(np.float32)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    balls, rods = [], []
    centres = [(20, y, x) for y in range(20, 180, 30) for x in range(20, 180, 30)]
    rng.shuffle(centres)
    for i, (cz, cy, cx) in enumerate(centres):
        if i % 2 == 0:
            vol[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= R_PART**2] -= 1.0
            balls.append((cz, cy, cx))
        else:  # a rod along a random in-plane direction
            a = rng.uniform(0, np.pi)
            u = np.array([0.0, np.sin(a), np.cos(a)])
            d = np.stack([zz - cz, yy - cy, xx - cx])
            along = np.tensordot(u, d, axes=1)
            perp2 = (d**2).sum(0) - along**2
            vol[(np.abs(along) <= R_PART) & (perp2 <= 2.5**2)] -= 1.5
            rods.append((cz, cy, cx))
    return vol, np.asarray(balls, float), np.asarray(rods, float)


def test_descriptors_see_the_angular_variation() -> None:
    vol, balls, rods = _rods_and_balls(0, noise=0.0)
    d_ball = shape_descriptors(_reader(vol), balls, R_PART, 1.0)
    d_rod = shape_descriptors(_reader(vol), rods, R_PART, 1.0)
    n = int(np.ceil(1.6 * R_PART))
    assert d_ball.shape == (len(balls), 2 * n)
    assert np.abs(d_ball[:, n + 1 : n + 5]).max() < 0.3  # a ball is round: shells inside it are uniform
    assert (d_rod[:, n + 2 : n + 5].mean(1) > 0.4).all()  # a rod is not: its shells vary with direction


def test_reference_ranks_label_shapes_above_look_alikes_of_the_same_size() -> None:
    vol, balls, rods = _rods_and_balls(1)
    rd = _reader(vol)
    lab = balls[:6]
    ref = ShapeReference(R_PART, shape_descriptors(rd, lab, R_PART, float(vol.std())),
                         [["t", *p] for p in lab.tolist()])
    peaks = np.concatenate([balls, rods])
    desc = shape_descriptors(rd, peaks, R_PART, float(vol.std()))
    llr, m = ref.log_ratio(desc, desc, ["t"] * len(peaks), peaks)
    is_ball = np.arange(len(peaks)) < len(balls)
    assert llr[is_ball].min() > llr[~is_ball].max()  # every ball above every rod
    adj = ref.adjustment(llr, m)
    assert (adj <= 0).all() and np.median(adj[is_ball]) > -0.5 and (adj[~is_ball] < -2).all()
    # a peak on a label is scored without that label (leave-one-out), not by the model that saw it
    llr_off, _ = ref.log_ratio(desc, desc)
    assert (llr[:6] < llr_off[:6]).all()
    again = ShapeReference.from_dict(ref.to_dict())
    assert np.allclose(again.log_ratio(desc, desc)[0], llr_off)


@pytest.mark.slow
def test_trained_picker_carries_the_check_and_pick_applies_it(tmp_path) -> None:
    import milotile as mt
    from milotile.refine.predict import pick
    from milotile.refine.train import train
    from milotile.synth import synth

    res = synth(tmp_path / "synth", seed=2, n_tomograms=1, size=(32, 96, 96), n_particles=12, filament=False)
    col = mt.ingest(res.manifest, tmp_path / "store.zarr")
    lab = res.ground_truth.iloc[:6]
    picker = train(col, lab, epochs=1, out=tmp_path / "run", bbox=12, crop=(4, 32, 32), batch_size=2, seed=3,
                   device="cpu", repeats=1, tta=1, arch_config={"start_filts": 4, "stem_ch": 4, "feat_dim": 8})
    assert set(picker.contract["shape"]) == set(picker.classes)
    spec = picker.contract["shape"][picker.classes[0]]
    assert spec["version"] == SHAPE_VERSION and spec["radius"] == 6.0 and len(spec["labels"]) == 6
    assert np.asarray(spec["descriptors"]).shape == (6, 2 * int(np.ceil(1.6 * 6.0)))
    kw = dict(threshold=0.01, max_picks=None, write_heatmaps=False, table=None)
    checked = pick(col, picker, **kw)
    plain = pick(col, picker, shape_check=False, **kw)
    assert {"score_model", "shape_d2"} <= set(checked) and "score_model" not in plain
    assert (checked["score"] <= checked["score_model"] + 1e-12).all()
    assert (checked["score"] > 0.01).all()  # the threshold applies to the checked score
    merged = checked.merge(plain, on=["tomogram", "x", "y", "z"], suffixes=("", "_plain"))
    assert len(merged) == len(checked)
    assert np.allclose(merged["score_model"], merged["score_plain"])
    assert np.isfinite(merged["shape_d2"]).all()  # every peak was compared with the labels


def test_labels_off_their_peaks_are_measured_at_the_peaks() -> None:
    """Labels 2 voxels off their particles' centres (where the network's peaks are) make a reference that
    penalises the unseen particles' peaks; measured at the peaks nearest the labels it does not."""
    vol, balls, rods = _rods_and_balls(1)
    rd = _reader(vol)
    std = float(vol.std())
    lab = balls[:6] + np.array([0.0, 2.0, 0.0])
    far = np.array([[24.0, 5.0, 5.0]])  # a label with no peak within half a radius keeps its own descriptor
    lab_all = np.concatenate([lab, far])
    ref = ShapeReference(R_PART, shape_descriptors(rd, lab_all, R_PART, std), [["t", *p] for p in lab_all.tolist()])
    peaks = np.concatenate([balls, rods])
    desc = shape_descriptors(rd, peaks, R_PART, std)
    tom = ["t"] * len(peaks)
    moved = ref.on_peaks(desc, tom, peaks)
    assert np.allclose(moved.descriptors[:6], desc[:6]) and np.allclose(moved.descriptors[6], ref.descriptors[6])
    assert [r[1:] for r in moved.labels[:6]] == balls[:6].tolist() and moved.labels[6] == ref.labels[6]
    unseen = np.arange(6, len(balls))
    off = ref.adjustment(*ref.log_ratio(desc, desc, tom, peaks))
    on = moved.adjustment(*moved.log_ratio(desc, desc, tom, peaks))
    assert (off[unseen] < -2).all() and np.median(on[unseen]) > -0.5
    assert (on[len(balls):] < -1).all()  # the rods still lose their score
    assert ref.on_peaks(desc[:0], [], peaks[:0]) is ref
