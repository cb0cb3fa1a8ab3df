"""End-to-end picker training on a tiny synthetic collection: run folder, checkpoints, resume,
Picker.predict_block geometry, multi-class, input errors and the CLI."""

from __future__ import annotations

import argparse
import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import milotile as mt
from milotile.errors import InputError
from milotile.ops.preprocess import preprocess_block
from milotile.refine import Picker
from milotile.refine.contract import picker_contract
from milotile.refine.predict import pick, picker_stats
from milotile.refine.targets import target_geometry
from milotile.refine.train import train
from milotile.refine.validation import predict_region_picks

train_mod = importlib.import_module("milotile.refine.train")

TINY = {"start_filts": 4, "stem_ch": 4, "feat_dim": 8}
FAST = dict(bbox=12, arch_config=TINY, crop=(4, 32, 32), batch_size=2, seed=3, device="cpu", random_fraction=0.25,
            max_pos=32, n_unlabeled=32, repeats=1, contrastive=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from milotile.synth import synth

    root = tmp_path_factory.mktemp("refine")
    res = synth(root / "synth", seed=2, n_tomograms=2, size=(32, 96, 96), n_particles=12, filament=False)
    col = mt.ingest(res.manifest, root / "store.zarr")
    return root, col, res.ground_truth


@pytest.mark.slow
def test_train_resume_and_picker(data):
    root, col, gt = data
    out = root / "run"
    lab = gt[gt.tomogram == "tomo_000"]
    val = gt[gt.tomogram == "tomo_001"]
    picker = train(col, lab, val_labels=val, epochs=1, out=out, debug_slices=[16], **FAST)
    for f in ("best.pt", "last.pt", "options.json", "log.csv", "log.jsonl", "losses.png", "validation.png"):
        assert (out / f).is_file(), f
    assert list((out / "debug").glob("epoch001_tomo_001_z16.png"))
    rec = mt.nn.RunLog(out).records()
    assert [r["epoch"] for r in rec] == [1]
    assert rec[0]["val_n_true"] == len(val)
    # the F1-optimal threshold of the validation becomes the checkpoint's default for pick
    assert picker.contract["suggested_threshold"] == pytest.approx(rec[0]["val_threshold"])
    assert np.isfinite(rec[0]["loss"]) and rec[0]["seconds"] > 0 and rec[0]["n_batches"] >= 2
    opts = json.loads((out / "options.json").read_text())
    assert opts["bbox"] == 12 and opts["n_train_labels"] == len(lab)

    c = picker.contract
    for key in ("gauss", "compress", "clip", "normalization", "bbox", "crop", "down_ratio", "classes",
                "receptive_field", "halo", "voxel_size", "out_stride", "out_offset"):
        assert key in c, key
    assert c["voxel_size"] == pytest.approx(col["tomo_000"].voxel_size)
    hz, hy, hx = picker.halo
    assert hz >= c["receptive_field"][0] // 2 and hy >= c["receptive_field"][1] // 2 and hy % c["xy_alignment"] == 0

    loaded = Picker.load(out / "best.pt", device="cpu")
    block = col["tomo_001"].data(0)[:20, :50, :45].compute()
    stats = picker_stats(col, "tomo_001", loaded)
    prob = loaded.predict_block(block, stats)
    assert prob.shape == (1, 20, 25, 23) and prob.dtype == np.float32
    assert prob.min() >= 0 and prob.max() <= 1
    np.testing.assert_allclose(prob, picker.predict_block(block, stats), atol=1e-6)

    with pytest.raises(InputError, match="already holds a checkpoint"):
        train(col, lab, val_labels=val, epochs=2, out=out, **FAST)
    train(col, lab, val_labels=val, epochs=2, out=out, resume=True, **FAST)
    assert [r["epoch"] for r in mt.nn.RunLog(out).records()] == [1, 2]
    assert mt.nn.load_checkpoint(out / "last.pt")["epoch"] == 2


def test_resume_keeps_the_runs_z_context(data):
    """A run started with other z context / crop than today's defaults resumes with its own; asking for
    another z dilation is refused (same weight shapes, a different network)."""
    root, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"]
    out = root / "zctx"
    kw = {k: v for k, v in FAST.items() if k not in ("crop", "arch_config")}
    train(col, lab, epochs=1, out=out, val_fraction=0.0, crop=(5, 32, 32), arch_config={**TINY, "z_dilation": 3}, **kw)
    assert train_mod.default_z_context(12) == (2, 12)  # today's defaults differ from the run's
    picker = train(col, lab, epochs=2, out=out, val_fraction=0.0, resume=True, arch_config=TINY, **kw)
    assert tuple(picker.contract["crop"]) == (5, 33, 33)  # the run's model crop (x, y made odd)
    assert mt.nn.load_checkpoint(out / "last.pt")["config"]["z_dilation"] == 3
    with pytest.raises(InputError, match="z_dilation=3"):
        train(col, lab, epochs=3, out=out, val_fraction=0.0, resume=True, arch_config={**TINY, "z_dilation": 2}, **kw)
    with pytest.raises(InputError, match="bbox must be positive"):
        train_mod.default_z_context(0)
    with pytest.raises(InputError, match="pu_risk must be one of clip, nnpu, pn"):
        train(col, lab, epochs=1, out=root / "badrisk", pu_risk="upu", **kw)
    assert not (root / "badrisk").exists()  # refused before the run folder is made


def _fresh_picker(compress: bool) -> Picker:
    torch.manual_seed(0)
    model = mt.nn.create("unet4", **TINY).eval()
    contract = picker_contract(arch="unet4", model=model, classes=["p"], bbox=12, crop=(4, 32, 32), gauss=0.7,
                         compress=compress, clip=(-3, 3), thresh=0.8, tau=0.1, geom=target_geometry(12, 2, compress),
                         voxel_size=10.0, train_stats={}, val_radius=3.0)
    return Picker(model, contract, device="cpu")


def test_predict_block_z_slabs_equal_one_forward():
    picker = _fresh_picker(compress=False)
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(37, 30, 34)).astype(np.float32)
    prob = picker.predict_block(raw, (0.0, 1.0))
    x = preprocess_block(raw, mean=0.0, std=1.0, gauss=0.7)
    with torch.no_grad():
        ref = torch.sigmoid(picker.model(torch.from_numpy(x)[None])["hm"])[0].numpy()
    assert prob.shape == ref.shape == (1, 37, 15, 17)
    np.testing.assert_allclose(prob, ref, atol=1e-5)
    pc = _fresh_picker(compress=True)
    assert pc.predict_block(raw, (0.0, 1.0)).shape == (1, 19, 15, 17)
    assert pc.halo[0] % 2 == 0
    np.testing.assert_allclose(pc.grid.to_level0(np.array([[3, 4, 5]])), [[6.5, 8, 10]])


@pytest.mark.slow
def test_multiclass_training_with_the_resnet_variant(data):
    root, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"]
    kw = {**FAST, "arch": "ressmall", "arch_config": {"widths": (4, 8), "stem_ch": 4, "feat_dim": 8},
          "contrastive": False}
    picker = train(col, lab, epochs=1, out=root / "multi", classes=True, val_fraction=0.0, **kw)
    assert picker.contract["arch"] == "ressmall"
    species = sorted(set(lab["species"]))
    assert picker.classes == species and picker.n_classes == len(species)
    prob = picker.predict_block(col["tomo_000"].data(0)[:8, :32, :32].compute(), (0.0, 1.0))
    assert prob.shape == (len(species), 8, 16, 16)
    # whole-collection picking goes through milotile.refine.predict with the same picker
    picks = picker.pick(col, threshold=0.0, max_picks=5)
    assert {"tomogram", "x", "y", "z", "score", "class"} <= set(picks.columns)
    assert set(picks["class"]) <= set(species) and len(picks) > 0


def test_bad_labels_are_reported_before_training(data):
    root, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"][["tomogram", "x", "y", "z"]]
    with pytest.raises(InputError, match="nope"):
        train(col, lab.assign(tomogram="nope"), epochs=1, out=root / "e1", **FAST)
    with pytest.raises(InputError, match="zero positives|no points|no particles"):
        train(col, lab.iloc[:0], epochs=1, out=root / "e2", **FAST)
    far = lab.copy()
    far["x"] = far["x"] + 500
    with pytest.raises(InputError):
        train(col, far, epochs=1, out=root / "e3", **FAST)
    with pytest.raises(InputError, match="ghost"):
        train(col, lab.assign(**{"class": "a"}), classes=["ghost"], epochs=1, out=root / "e4", **FAST)
    with pytest.raises(InputError, match="architecture"):
        train(col, lab, epochs=1, out=root / "e5", **{**FAST, "arch": "vgg"})
    assert not (root / "e1").exists()


def test_nan_loss_names_epoch_and_tomogram(data, monkeypatch):
    root, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"]

    def nan_loss(logits, target, tau, beta=0.0, risk="clip", negative_weight=1.0):
        return logits.sum() * float("nan"), {"r_pos": 0.0, "r_neg": 0.0, "neg_loss": 0.0}

    monkeypatch.setattr(train_mod, "pu_focal_loss", nan_loss)
    with pytest.raises(RuntimeError, match=r"epoch 1 .*tomo_000"):
        train(col, lab, epochs=1, out=root / "nan", val_fraction=0.0, **FAST)


@pytest.mark.slow
def test_cli_refine_train(data):
    from milotile.commands import refine as cmd

    root, col, gt = data
    csv = root / "labels.csv"
    gt[gt.tomogram == "tomo_000"][["tomogram", "x", "y", "z"]].to_csv(csv, index=False)
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["refine", "train", str(col.path), "--labels", str(csv), "--out", str(root / "cli"),
                              "--epochs", "1", "--bbox", "12", "--crop", "4,32,32", "--batch-size", "2",
                              "--start-filts", "4", "--val-fraction", "0", "--device", "cpu", "--no-contrastive", "--repeats", "1",
                              "--num-workers", "1"])
    assert args.handler(args) == 0
    assert (root / "cli" / "best.pt").is_file()
    bad = root / "bad.csv"
    pd.DataFrame({"tomogram": ["zzz"], "x": [1.0], "y": [1.0], "z": [1.0]}).to_csv(bad, index=False)
    args = parser.parse_args(["refine", "train", str(col.path), "--labels", str(bad), "--out", str(root / "cli2")])
    with pytest.raises(InputError, match="zzz"):
        args.handler(args)


def test_validation_decodes_exactly_like_pick(data):
    """One tiler, one decoder: a validation region covering a tomogram gives pick's table."""
    _, col, _ = data
    picker = _fresh_picker(compress=True)
    name = "tomo_001"
    stats = picker_stats(col, name, picker)
    region = {"tomogram": name, "start": (0, 0, 0), "stop": tuple(col[name].shape)}
    val, _, _ = predict_region_picks(picker, col, region, stats)
    picked = pick(col, picker, threshold=0.05, max_picks=None, names=[name], write_heatmaps=False, table=None)
    assert len(picked) > 0
    cols = ["x", "y", "z", "score"]
    np.testing.assert_allclose(val[cols].to_numpy(), picked[cols].to_numpy(), atol=1e-5)


def test_pseudo_labels_and_stopping_rule():
    from milotile.refine.self_training import converged, pseudo_labels

    labels = pd.DataFrame({"tomogram": ["t"] * 2, "x": [10.0, 50.0], "y": 10.0, "z": 5.0, "class": "p"})
    picks = pd.DataFrame({"tomogram": ["t"] * 6 + ["u"], "x": [10.0, 50.0, 90.0, 130.0, 170.0, 52.0, 10.0],
                          "y": 10.0, "z": 5.0, "score": [0.95, 0.9, 0.93, 0.92, 0.2, 0.85, 0.99], "class": "p"})
    new = pseudo_labels(picks, labels, bbox=16)
    # above the labels' PU threshold (0.9), away from the labels, only in labelled tomograms
    assert sorted(new["x"]) == [90.0, 130.0] and set(new["tomogram"]) == {"t"}
    assert len(pseudo_labels(picks, labels, bbox=16, max_ratio=0.5)) == 1  # capped per label, best first
    assert not converged(None, new, 4.0) and converged(new, new, 4.0) and converged(new, new.iloc[:0], 4.0)
    moved = new.assign(x=new["x"] + 20)
    assert not converged(new, moved, 4.0)


def test_self_training_round_adds_positives_and_keeps_user_labels(data, tmp_path):
    root, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"].iloc[:4]
    out = tmp_path / "st"
    picker = train(col, lab, epochs=1, out=out, self_training=1, **FAST)
    assert (out / "round-0" / "last.pt").is_file() and (out / "best.pt").is_file()
    # the picker's own threshold labels are the user's labels, never its pseudo-labels
    assert len(picker.contract["train_labels"]) == len(lab)
    if (out / "round-1" / "last.pt").is_file():
        assert picker.contract["n_extra_positives"] >= 1
    with pytest.raises(InputError, match="self_training"):
        train(col, lab, epochs=1, out=tmp_path / "st2", self_training=1, extra_positives=lab, **FAST)


def test_head_z_dilation_widens_z_context():
    from milotile.nn import registry

    m1 = registry.create("unet4", **TINY).eval()
    m2 = registry.create("unet4", z_dilation=2, **TINY).eval()
    assert m2.receptive_field()[0] > m1.receptive_field()[0] and m2.head.z_context == 5
    x = torch.randn(1, 14, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m2(x)["hm"][0], m2.predict_volume(x[0]), atol=1e-5)
    with pytest.raises(InputError, match="z_dilation"):
        registry.create("unet4", z_dilation=0, **TINY)


def test_cpu_bf16_recipe_trains_under_bf16_autocast(data, tmp_path, monkeypatch):
    """``cpu_bf16=True`` trains under bf16 autocast on a CPU with AMX / AVX512-BF16 (fp32 elsewhere), records the
    switch in the contract, and gives a finite loss; ``cpu_bf16=False`` trains in fp32."""
    from milotile.nn.device import amp_dtype, cpu_has_bf16

    _, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"]
    used = []
    real = train_mod.autocast

    def spy(device, enabled=True, cpu=False):
        used.append(amp_dtype(torch.device(device), cpu=cpu) if enabled else None)
        return real(device, enabled=enabled, cpu=cpu)

    monkeypatch.setattr(train_mod, "autocast", spy)
    picker = train(col, lab, epochs=1, out=tmp_path / "bf16", cpu_bf16=True, **{**FAST, "contrastive": False})
    assert used and set(used) == {torch.bfloat16 if cpu_has_bf16() else None}
    assert picker.contract["cpu_bf16"] is True
    assert np.isfinite(mt.nn.RunLog(tmp_path / "bf16").records()[0]["loss"])
    used.clear()
    train(col, lab, epochs=1, out=tmp_path / "fp32", cpu_bf16=False, **{**FAST, "contrastive": False})
    assert used and set(used) == {None}


@pytest.mark.slow
def test_atlas_selections_are_recentred_and_merged(data):
    """Candidates off their particles' centres (two per particle, as a DoG pyramid finds on a large particle)
    become one centred label per particle when they come from the atlas; manual labels are trained as given."""
    root, col, gt = data
    lab = gt[gt.tomogram == "tomo_000"].reset_index(drop=True)
    r = float(lab["radius"].max())
    off = pd.concat([lab.assign(x=lab["x"] + r / 2), lab.assign(x=lab["x"] - r / 2)], ignore_index=True)
    sel = off.assign(id=np.arange(len(off)), cluster=0)
    picker = train(col, sel, epochs=1, out=root / "run_sel", **{**FAST, "bbox": 2 * r})
    info = picker.contract["recentred"]
    assert info["why"] == "auto: an atlas selection" and info["n_before"] == len(off)
    assert len(lab) <= info["n_after"] < len(off) and info["median_shift"] > r / 4
    rows = pd.DataFrame(picker.contract["train_labels"], columns=["tomogram", "x", "y", "z", "class"])
    from scipy.spatial import cKDTree

    d, _ = cKDTree(lab[["x", "y", "z"]].to_numpy()).query(rows[["x", "y", "z"]].to_numpy(np.float64))
    assert np.median(d) < r / 4, d
    manual = train(col, off, epochs=1, out=root / "run_manual", **{**FAST, "bbox": 2 * r})
    assert "recentred" not in manual.contract and len(manual.contract["train_labels"]) == len(off)
    forced = train(col, off, epochs=1, out=root / "run_forced", recentre="on", **{**FAST, "bbox": 2 * r})
    assert forced.contract["recentred"]["why"] == "on"
    # the CLI reads --labels into a table first: a selection parquet from the store stays known as one
    from milotile.refine.labels import is_atlas_selection, load_label_table

    col.write_table("labels-sel", sel[["tomogram", "x", "y", "z", "id", "cluster"]], params={"atlas": "a1"})
    read = load_label_table(str(col._table_path("labels-sel")), col)
    assert "id" not in read.columns and read.attrs["atlas_selection"] and is_atlas_selection(read)
    plain = root / "manual.parquet"
    off[["tomogram", "x", "y", "z"]].to_parquet(plain)
    assert not is_atlas_selection(load_label_table(str(plain), col))
    # recentre once: a selection of candidates `mine` already recentred is trained as it is (from a table that
    # says so, or from the selection parquet through the CLI's reader)
    mined = sel.copy()
    mined.attrs["candidates_recentred"] = 12.0
    once = train(col, mined, epochs=1, out=root / "run_once", **{**FAST, "bbox": 2 * r})
    assert once.contract["recentred"]["skipped"] and "radius 12.0" in once.contract["recentred"]["why"]
    assert len(once.contract["train_labels"]) == len(off)
    col.write_table("labels-once", sel[["tomogram", "x", "y", "z", "id", "cluster"]],
                    params={"atlas": "a1", "candidates_recentred": 12.0})
    read = load_label_table(str(col._table_path("labels-once")), col)
    assert read.attrs["atlas_selection"] and read.attrs["candidates_recentred"] == 12.0
