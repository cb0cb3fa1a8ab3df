"""Tiled heatmap prediction: equality with a whole-volume pass, worker-local model cache, store output,
and collection-wide picking."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import milotile as mt
from milotile.errors import InputError
from milotile.nn import cache
from milotile.refine import predict as P
from milotile.refine.picker import Picker
from milotile.store import write_mrc


class ConvPicker:
    """A small real torch model with the Picker interface (deterministic weights).

    conv3d 3x3x3 -> ReLU -> avg-pool (1, 2, 2) (ceil) -> conv3d 3x3x3 -> sigmoid: output stride
    (1, 2, 2); receptive field 1 + 2 voxels in z, 1 + 2*2 in y/x, so a halo of (2, 6, 6) suffices.
    """

    loads = 0
    _lock = threading.Lock()

    def __init__(self, path: str | None = None, n_classes: int = 1, halo=(2, 6, 6)):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AvgPool3d((1, 2, 2), ceil_mode=True),
            torch.nn.Conv3d(4, n_classes, 3, padding=1),
        ).eval()
        self.path = path
        self._halo = tuple(halo)
        self.contract = {"down_ratio": 2, "out_stride": (1, 2, 2), "out_offset": (0.0, 0.5, 0.5), "bbox": 8,
                         "classes": [f"c{i}" for i in range(n_classes)] if n_classes > 1 else ["particle"]}
        self.n_classes = n_classes
        self.classes = self.contract["classes"]
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, path: str) -> ConvPicker:
        with cls._lock:
            cls.loads += 1
        cfg = json.loads(Path(path).read_text())
        return cls(path, **cfg)

    @property
    def halo(self):
        return self._halo

    @torch.no_grad()
    def predict_block(self, raw_block: np.ndarray, stats) -> np.ndarray:
        x = (torch.from_numpy(np.asarray(raw_block, np.float32)) - stats[0]) / stats[1]
        return torch.sigmoid(self.net(x[None, None]))[0].numpy()


def _blob_volume(shape, centres, sigma=1.5, seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    vol = rng.normal(0, 0.2, size=shape).astype(np.float32)
    for cx, cy, cz in centres:
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2)).astype(np.float32) * 3
    return vol


@pytest.fixture
def col(tmp_path):
    shape = (20, 45, 52)  # odd y so the last output row is a half-covered one
    vol = _blob_volume(shape, [(10, 10, 5), (31, 15, 9), (25, 32, 14), (40, 40, 10)])
    write_mrc(tmp_path / "t1.mrc", vol, voxel_size=5.0)
    write_mrc(tmp_path / "t2.mrc", vol[:, ::-1, :].copy(), voxel_size=5.0)
    return mt.ingest([tmp_path / "t1.mrc", tmp_path / "t2.mrc"], tmp_path / "s.zarr", chunks=(8, 16, 16))


def test_tiled_heatmap_equals_whole_volume_pass(col):
    picker = ConvPicker(n_classes=2)
    t = col["t1"]
    vol = np.asarray(t.data(0))
    stats = (float(vol.mean()), float(vol.std()))
    hm = P.predict_heatmap(col, "t1", picker, stats=stats, tile=(8, 16, 16))
    assert hm.numblocks[1:] == (3, 3, 4)  # one task per (8, 16, 16) tile
    assert hm.shape == (2, 20, math.ceil(45 / 2), math.ceil(52 / 2))
    whole = picker.predict_block(vol, stats)
    np.testing.assert_allclose(hm.compute(scheduler="threads"), whole, atol=1e-5, rtol=0)
    # a halo smaller than the receptive field does show the seams: the test can fail
    short = ConvPicker(n_classes=2, halo=(0, 0, 0))
    bad = P.predict_heatmap(col, "t1", short, stats=stats, tile=(8, 16, 16)).compute(scheduler="threads")
    assert np.abs(bad - whole).max() > 1e-3
    # the same through the halo override of a correct picker
    capped = P.predict_heatmap(col, "t1", picker, stats=stats, tile=(8, 16, 16), halo=(0, 0, 0))
    np.testing.assert_allclose(capped.compute(scheduler="threads"), bad, atol=1e-6)
    # default tiles are planned from the halo: this small volume is one tile (no halo to recompute)
    default = P.predict_heatmap(col, "t1", picker, stats=stats)
    assert default.numblocks[1:] == (1, 1, 1)
    np.testing.assert_allclose(default.compute(scheduler="threads"), whole, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="halo must be three"):
        P.predict_heatmap(col, "t1", picker, stats=stats, halo=(1, 2))


def test_custom_tile_and_bad_tile(col):
    picker = ConvPicker()
    vol = np.asarray(col["t1"].data(0))
    stats = (float(vol.mean()), float(vol.std()))
    hm = P.predict_heatmap(col, "t1", picker, stats=stats, tile=(20, 32, 32))
    assert hm.numblocks[1:] == (1, 2, 2)
    np.testing.assert_allclose(hm.compute(), picker.predict_block(vol, stats), atol=1e-5)
    with pytest.raises(InputError, match="multiple"):
        P.predict_heatmap(col, "t1", picker, stats=stats, tile=(20, 31, 32))


def test_model_loaded_once_per_process(col, tmp_path):
    ckpt = tmp_path / "run1" / "best.json"
    ckpt.parent.mkdir()
    ckpt.write_text(json.dumps({"n_classes": 1}))
    picker = ConvPicker.load(str(ckpt))
    cache.clear()
    ConvPicker.loads = 0
    hm = P.predict_heatmap(col, "t1", picker, stats=(0.0, 1.0), tile=(8, 16, 16))
    cache.clear()  # as on a fresh worker: the tasks must load it themselves
    hm.compute(scheduler="threads", num_workers=2)
    assert hm.npartitions == 36 and ConvPicker.loads == 1
    assert cache.cache_info() == {"cached": 1, "loads": 1}


def test_pick_writes_heatmap_and_picks(col, tmp_path):
    picker = ConvPicker()
    picker.path = None
    out = tmp_path / "out" / "picks.csv"
    picks = P.pick(col, picker, threshold=0.5, nms_distance=4, border=0, out=out, run="r1")
    assert list(picks.columns) == ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "class"]
    assert set(picks["tomogram"]) <= {"t1", "t2"}
    assert (picks["score"] > 0.5).all()
    np.testing.assert_allclose(picks["x_A"], picks["x"] * 5.0)
    # NMS in level-0 voxels
    for _, g in picks.groupby("tomogram"):
        p = g[["x", "y", "z"]].to_numpy()
        d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(len(p)) * 99
        assert d.min() > 4
    assert col.has_table("picks") and len(col.read_table("picks")) == len(picks)
    assert len(pd.read_csv(out)) == len(picks)
    grp = col.zarr_group["derived/heatmaps/r1/t1"]
    meta = dict(grp.attrs)
    assert meta["milotile"]["complete"] is True
    ms = meta["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 5.0, 10.0, 10.0]
    assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == [0.0, 0.0, 2.5, 2.5]
    assert grp["0"].shape == (1, 20, 23, 26)
    # the stored heatmap is the whole-volume prediction
    vol = np.asarray(col["t1"].data(0))
    whole = picker.predict_block(vol, (float(vol.mean()), float(vol.std())))
    np.testing.assert_allclose(grp["0"][:], whole, atol=1e-4)


def test_pick_rejects_bad_input(col):
    picker = ConvPicker()
    with pytest.raises(InputError, match="not in the collection"):
        P.pick(col, picker, names=["nope"])
    with pytest.raises(InputError, match="threshold"):
        P.pick(col, picker, threshold=1.5)
    with pytest.raises(InputError, match="Picker.load"):
        P.pick(col, "/no/such/ckpt.pt")
    with pytest.raises(InputError, match="does not exist|no such|not found"):
        Picker.load("/no/such/ckpt.pt")


def test_pick_on_inprocess_distributed_cluster(col):
    distributed = pytest.importorskip("distributed")
    picker = ConvPicker()
    picker.path = None
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"):
        a = P.pick(col, picker, threshold=0.5, nms_distance=4, border=0, write_heatmaps=False, table=None,
                   names=["t1"])
    b = P.pick(col, picker, threshold=0.5, nms_distance=4, border=0, write_heatmaps=False, table=None,
               names=["t1"])
    pd.testing.assert_frame_equal(a, b)


def test_cli_export_from_store_table(col, tmp_path, capsys):
    import starfile

    from milotile.cli import main

    picks = pd.DataFrame({"tomogram": ["t1", "t2"], "x": [10.0, 20.5], "y": [5.0, 6.0], "z": [3.0, 4.0],
                          "score": [0.9, 0.5], "class": ["particle", "particle"]})
    col.write_table("picks", picks)
    star = tmp_path / "p.star"
    assert main(["export", "picks", "--store", str(col.path), "--format", "star", "--out", str(star)]) == 0
    df = starfile.read(star)
    np.testing.assert_allclose(df["rlnCenteredCoordinateXAngst"], (picks["x"] - 52 / 2) * 5.0)
    assert main(["export", "picks", "--store", str(col.path), "--format", "copick", "--out",
                 str(tmp_path / "cp"), "--user-id", "bad_user"]) == 2
    assert "underscores" in capsys.readouterr().err
    assert main(["export", "nothing", "--format", "csv", "--out", str(tmp_path / "x.csv")]) == 2


@pytest.mark.slow
def test_real_picker_tiled_equals_whole(tmp_path):
    """The refinement engineer's Picker (a real 2.5D U-Net, random weights) tiled over store chunks."""
    from milotile.refine.model import unet4
    from milotile.refine.picker import Picker

    torch.manual_seed(0)
    model = unet4(start_filts=4, stem_ch=4, feat_dim=4).eval()
    rf = model.receptive_field()
    al = model.xy_alignment
    halo = [int(math.ceil((rf[0] - 1) / 2))] + [int(math.ceil(math.ceil((r - 1) / 2) / al) * al) for r in rf[1:]]
    contract = {"kind": "refine-picker", "classes": ["particle"], "n_classes": 1, "bbox": 12.0, "crop": [8, 64, 64],
                "down_ratio": 2, "out_stride": [1, 2, 2], "out_offset": [0.0, 0.0, 0.0], "gauss": 0.0,
                "compress": False, "clip": [-3.0, 3.0], "receptive_field_model": list(rf), "halo": halo,
                "xy_alignment": al}
    picker = Picker(model, contract, device="cpu")
    shape = (12, 320, 288)
    vol = _blob_volume(shape, [(40, 50, 5), (150, 200, 6), (260, 300, 8)], sigma=3.0)
    write_mrc(tmp_path / "big.mrc", vol, voxel_size=8.0)
    col = mt.ingest(tmp_path / "big.mrc", tmp_path / "s.zarr", chunks=(12, 128, 128))
    stats = (float(vol.mean()), float(vol.std()))
    hm = P.predict_heatmap(col, "big", picker, stats=stats, tile=(12, 128, 128))
    assert hm.numblocks == (1, 1, 3, 3)
    whole = picker.predict_block(vol, stats)
    np.testing.assert_allclose(hm.compute(scheduler="threads"), whole, atol=1e-4, rtol=0)


def test_concurrent_pick_equals_serial_pick(tmp_path):
    """Tomograms predicted and decoded at the same time give the serial table, in the same order."""
    shape = (16, 40, 44)
    paths = []
    for i in range(4):
        vol = _blob_volume(shape, [(8 + 3 * i, 10, 5), (30, 14 + 2 * i, 9), (22, 30, 12)], seed=i)
        write_mrc(tmp_path / f"t{i}.mrc", vol, voxel_size=5.0)
        paths.append(tmp_path / f"t{i}.mrc")
    col = mt.ingest(paths, tmp_path / "s.zarr", chunks=(8, 16, 16))
    picker = ConvPicker(n_classes=2)
    picker.path = None
    kw = {"threshold": 0.5, "nms_distance": 4, "border": 0, "tile": (8, 16, 16)}
    serial = P.pick(col, picker, inflight=1, run="serial", table="serial", **kw)
    conc = P.pick(col, picker, inflight=3, run="conc", table="conc", **kw)
    assert len(serial) > 8 and serial["tomogram"].nunique() == 4
    pd.testing.assert_frame_equal(serial, conc)
    assert list(col.table_sources("conc")["sources"]) == [
        k.replace("serial", "conc") for k in col.table_sources("serial")["sources"]]
    import zarr

    # the stage end consolidated the heatmaps it wrote (from its own outputs, not a walk of the store)
    flat = zarr.open_group(str(tmp_path / "s.zarr"), mode="r", use_consolidated=True).metadata.consolidated_metadata
    assert all(flat.flattened_metadata[f"derived/heatmaps/conc/t{i}"].attributes["milotile"]["complete"]
               for i in range(4))
    nohm = P.pick(col, picker, inflight=2, write_heatmaps=False, table=None, **kw)
    pd.testing.assert_frame_equal(serial, nohm)
    with pytest.raises(InputError, match="positive integer"):
        P.pick(col, picker, inflight=0, **kw)


def test_in_order_keeps_order_and_bounds_the_work_in_flight():
    running, peak, lock = [0], [0], threading.Lock()
    first = threading.Barrier(3, timeout=120)  # the first three only finish once all three run at once

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i < 3:
            first.wait()
        with lock:
            running[0] -= 1
        return i * i

    assert list(P._in_order(work, list(range(10)), 3)) == [i * i for i in range(10)]
    assert peak[0] == 3


def test_cpu_bf16_picker_switch(tmp_path, monkeypatch):
    """``contract["cpu_bf16"]`` runs prediction under bf16 autocast on a CPU with native bf16 (close to fp32),
    ``MILOTILE_CPU_BF16=0`` turns it off, and a stored heatmap is not reused across the switch."""
    from milotile.nn.device import amp_dtype, cpu_has_bf16
    from milotile.refine.model import unet4

    torch.manual_seed(0)
    model = unet4(start_filts=4, stem_ch=4, feat_dim=4).eval()
    rf = model.receptive_field()
    halo = [int(math.ceil((rf[0] - 1) / 2))] + [int(math.ceil(math.ceil((r - 1) / 2) / 2) * 2) for r in rf[1:]]
    contract = {"kind": "refine-picker", "classes": ["particle"], "n_classes": 1, "bbox": 12.0, "crop": [8, 64, 64],
                "down_ratio": 2, "out_stride": [1, 2, 2], "out_offset": [0.0, 0.0, 0.0], "gauss": 0.0,
                "compress": False, "clip": [-3.0, 3.0], "receptive_field_model": list(rf), "halo": halo,
                "xy_alignment": 2}
    vol = _blob_volume((8, 64, 64), [(20, 20, 4), (40, 44, 4)], sigma=3.0)
    stats = (float(vol.mean()), float(vol.std()))
    fp32 = Picker(model, contract, device="cpu").predict_block(vol, stats)
    picker = Picker(model, {**contract, "cpu_bf16": True}, device="cpu")
    assert picker.cpu_bf16
    bf = picker.predict_block(vol, stats)
    if cpu_has_bf16():
        assert amp_dtype(torch.device("cpu"), cpu=True) == torch.bfloat16
        assert not np.array_equal(bf, fp32)  # really ran in bf16
        np.testing.assert_allclose(bf, fp32, atol=0.05)
    else:
        np.testing.assert_array_equal(bf, fp32)
    monkeypatch.setenv("MILOTILE_CPU_BF16", "0")
    assert amp_dtype(torch.device("cpu"), cpu=True) is None
    np.testing.assert_array_equal(picker.predict_block(vol, stats), fp32)
    monkeypatch.delenv("MILOTILE_CPU_BF16")
    # the stored heatmap's parameters record the switch: the fp32 heatmap is not reused for bf16
    write_mrc(tmp_path / "t.mrc", vol, voxel_size=8.0)
    col = mt.ingest(tmp_path / "t.mrc", tmp_path / "s.zarr")
    ck = tmp_path / "run" / "last.pt"
    from milotile.nn.checkpoint import save_checkpoint

    save_checkpoint(ck, arch="unet4", config={"start_filts": 4, "stem_ch": 4, "feat_dim": 4}, model=model,
                    contract={**contract, "preprocessing": 2})
    loaded = Picker.load(ck, device="cpu")
    P.pick(col, loaded, threshold=0.01, table=None)
    params = dict(col.zarr_group["derived/heatmaps/run/t"].attrs)["milotile"]["params"]
    assert params["cpu_bf16"] is False
    loaded.contract["cpu_bf16"] = True
    P.pick(col, loaded, threshold=0.01, table=None)
    params = dict(col.zarr_group["derived/heatmaps/run/t"].attrs)["milotile"]["params"]
    assert params["cpu_bf16"] is True
