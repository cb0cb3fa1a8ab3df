"""Tests of the shared torch pieces in milotile.nn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from milotile.errors import InputError
from milotile.nn import (
    RunLog,
    autocast,
    available,
    build_model,
    create,
    load_checkpoint,
    pick_device,
    register,
    save_checkpoint,
    seed_everything,
)


def test_pick_device_cpu_and_auto():
    assert pick_device("cpu").type == "cpu"
    expect = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expect
    assert pick_device("auto").type == expect
    with pytest.raises(InputError, match="nonsense"):
        pick_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            pick_device("cuda")


def test_autocast_noop_on_cpu():
    x = torch.randn(4, 4)
    with autocast(torch.device("cpu")):
        y = x @ x
    assert y.dtype == torch.float32


def test_seed_everything_repeats():
    seed_everything(5)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(5)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_registry_resnet_trunk_shapes():
    assert "resnet18-trunc" in available()
    m = create("resnet18-trunc")
    out = m(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 256)
    fmap = create("resnet18-trunc", pool=False)(torch.randn(2, 1, 16, 16))
    assert fmap.shape == (2, 256, 4, 4)  # two stride-2 stages, no max-pool, stride-1 stem
    # no max-pool and no layer4: exactly 3 stages of 2 blocks
    assert len(m.layers) == 3 and all(len(s) == 2 for s in m.layers)


def test_registry_unknown_and_bad_config():
    with pytest.raises(InputError, match="resnet18-trunc"):
        create("does-not-exist")
    with pytest.raises(InputError, match="configuration"):
        create("resnet18-trunc", not_an_argument=1)


def test_register_duplicate_name_rejected():
    @register("test-linear-a")
    def _a(n: int = 2) -> torch.nn.Module:
        return torch.nn.Linear(n, n)

    with pytest.raises(ValueError, match="already registered"):

        @register("test-linear-a")
        def _b(n: int = 2) -> torch.nn.Module:
            return torch.nn.Linear(n, 1)

    assert create("test-linear-a", n=3).out_features == 3


def test_checkpoint_roundtrip(tmp_path):
    seed_everything(0)
    m = create("resnet18-trunc", widths=(8, 16, 32), blocks=(1, 1, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 12, 12)
    m(x).sum().backward()
    opt.step()
    m.eval()
    ref = m(x)
    contract = {"bbox": 12, "mean": [0.1], "std": [1.2]}
    p = save_checkpoint(
        tmp_path / "run" / "ckpt.pt",
        arch="resnet18-trunc",
        config={"widths": [8, 16, 32], "blocks": [1, 1, 1]},
        model=m,
        contract=contract,
        optimizer=opt,
        epoch=3,
        extra={"note": "x"},
    )
    assert p.is_file() and not list(p.parent.glob("*.tmp"))
    ck = load_checkpoint(p)
    assert ck["epoch"] == 3 and ck["contract"] == contract and ck["extra"]["note"] == "x"
    assert ck["torch_version"] == torch.__version__ and "milotile_version" in ck
    assert "optimizer" in ck
    m2 = build_model(ck)
    assert not m2.training
    torch.testing.assert_close(m2(x), ref)
    # build from a path too
    torch.testing.assert_close(build_model(p)(x), ref)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="is not a PyTorch checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 1, "state_dict": {}}, foreign)
    with pytest.raises(InputError, match="not a milotile checkpoint"):
        load_checkpoint(foreign)


def test_runlog_append_resume_plot(tmp_path):
    rl = RunLog(tmp_path / "run")
    rl.save_options({"lr": 0.05, "path": tmp_path, "arr": np.float32(2.0)})
    opts = json.loads((tmp_path / "run" / "options.json").read_text())
    assert opts["lr"] == 0.05 and opts["arr"] == 2.0 and opts["path"] == str(tmp_path)
    rl.log_epoch({"epoch": 1, "loss": -0.1, "std": torch.tensor(0.05)})
    rl.log_epoch({"epoch": 2, "loss": -0.3, "std": 0.04})
    # a new RunLog on the same folder (resume) keeps existing rows
    rl2 = RunLog(tmp_path / "run")
    rl2.log_epoch({"epoch": 3, "loss": -0.5, "std": 0.03, "lr": 0.01})
    recs = rl2.records()
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert recs[0]["std"] == pytest.approx(0.05)
    csv_lines = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert csv_lines[0].split(",") == ["epoch", "loss", "std", "lr"] and len(csv_lines) == 4
    rl2.truncate(2)
    assert [r["epoch"] for r in rl2.records()] == [1, 2]
    assert len((tmp_path / "run" / "log.csv").read_text().strip().splitlines()) == 3
    png = rl2.plot(["loss", "std"], tmp_path / "run" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_channels_last_cpu_same_outputs_and_checkpoint():
    from milotile.explore.model import SimSiam
    from milotile.nn.device import channels_last

    torch.manual_seed(0)
    ref = SimSiam("3d", widths=(8, 16, 32)).eval()
    cl = SimSiam("3d", widths=(8, 16, 32)).eval()
    cl.load_state_dict(ref.state_dict())
    assert channels_last(cl, "cpu") is cl
    assert cl.state_dict()[next(k for k, v in cl.state_dict().items() if v.ndim == 4)].is_contiguous(
        memory_format=torch.channels_last)
    x = torch.randn(4, 1, 24, 24)
    xc = channels_last(x, "cpu")
    m = torch.randn(2, 3, 8, 8)  # one channel has the same layout either way: check the order on three
    assert channels_last(m, "cpu").is_contiguous(memory_format=torch.channels_last)
    assert not m.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = ref.features(x, "proj"), cl.features(xc, "proj")
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # weights saved from the channels-last model load into a default-layout model unchanged
    fresh = SimSiam("3d", widths=(8, 16, 32)).eval()
    fresh.load_state_dict(cl.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh.features(x, "proj"), a, atol=1e-4, rtol=1e-4)
    # other ranks and other devices pass through
    v = torch.randn(3, 5)
    assert channels_last(v, "cpu") is v
    assert channels_last(torch.randn(1, 3, 4, 8, 8), "cpu").is_contiguous(memory_format=torch.channels_last_3d)
    assert channels_last(x, "meta") is x
