"""Tests of the exploration module: augmentation, model, patch streaming, training, embedding."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from milotile.errors import InputError
from milotile.explore import (
    AugmentConfig,
    Encoder,
    PatchLoader,
    augment,
    channel_stats,
    default_config,
    embed,
    load_weights,
    make_views,
    ntxent_loss,
    open_bank,
    pair_loss,
    simsiam_loss,
    train,
)
from milotile.explore.data import minmax_unit, model_channels
from milotile.explore.model import SimSiam, centre_ring_pool, centre_side
from milotile.nn import create, load_checkpoint

TINY = {"widths": [8, 16, 32], "blocks": [1, 1, 1]}


def _shape(kind: int, b: int, dx: float, dy: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:b, :b].astype(np.float32) - (b - 1) / 2
    yy, xx = yy - dy, xx - dx
    r = np.hypot(yy, xx)
    if kind == 0:  # filled disk
        img = (r < b / 5).astype(np.float32)
    else:  # ring
        img = ((r > b / 6) & (r < b / 3.2)).astype(np.float32)
    return img + rng.normal(0, 0.3, (b, b)).astype(np.float32)


def write_bank(
    col_path,
    key: str = "k",
    n: int = 48,
    b: int = 16,
    channels: int = 1,
    shifts: int = 4,
    chunk: int = 16,
    seed: int = 0,
    offset: float = 0.0,
    table: bool = True,
):
    """Write a patch bank like the mining stage does: patches/<key>/data + tables/patches-<key>."""
    from milotile.store import open_collection

    rng = np.random.default_rng(seed)
    col = open_collection(col_path, mode="a")
    kinds = rng.integers(0, 2, n)
    s = 1 + shifts
    data = np.empty((n, s, channels, b, b), np.float32)
    offs = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for i in range(n):
        for j in range(s):
            for c in range(channels):
                dx, dy = offs[j % len(offs)]
                data[i, j, c] = _shape(int(kinds[i]), b, dx, dy, rng) * (1 + c) + offset
    g = col.zarr_group.require_group("patches").require_group(key)
    arr = g.create_array("data", shape=data.shape, chunks=(chunk, s, channels, b, b), dtype="float32", overwrite=True)
    arr[:] = data
    modes = {1: ["slab"], 2: ["tilt_sum", "slice"], 3: ["tilthalves", "slice"]}[channels]
    g.attrs["milotile"] = {
        "complete": True,
        "params": {"bbox": b, "shifts": offs[1:s], "modes": modes, "gauss": 0.8, "dog": [3, 5]},
    }
    if table:
        x = rng.uniform(10, 50, n)
        df = pd.DataFrame({
            "tomogram": "t0", "x": x, "y": x + 1, "z": x + 2, "x_A": x * 10, "y_A": (x + 1) * 10,
            "z_A": (x + 2) * 10, "score": rng.random(n), "patch_index": np.arange(n), "species": kinds,
        })
        col.write_table(f"patches-{key}", df)
    return col, data, kinds


@pytest.fixture
def bank3d(tmp_path):
    col, data, kinds = write_bank(tmp_path / "s.zarr")
    return col, data, kinds


# -- augmentation ---------------------------------------------------------------------------------


def test_augment_geometry_only_permutes_pixels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 12, 12)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
    y = augment(x, cfg, g)
    assert y.shape == x.shape
    for i in range(16):  # flips/rot90 move pixels, never change values; both channels get the same move
        assert torch.equal(y[i].flatten().sort().values, x[i].flatten().sort().values)
        moved = [torch.equal(y[i, 0], torch.rot90(xi, k, (0, 1))) for xi in (x[i, 0], x[i, 0].flip(1)) for k in range(4)]
        assert any(moved)
        k_idx = moved.index(True)
        xi1 = x[i, 1] if k_idx < 4 else x[i, 1].flip(1)
        assert torch.equal(y[i, 1], torch.rot90(xi1, k_idx % 4, (0, 1)))
    # not all samples get the identity
    assert not torch.equal(y, x)


def test_augment_deterministic_and_per_sample():
    x = torch.randn(32, 1, 16, 16)
    cfg = default_config("3d", "strong")
    a = augment(x, cfg, torch.Generator().manual_seed(3))
    b = augment(x, cfg, torch.Generator().manual_seed(3))
    c = augment(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # same input patch repeated gets different augmentations per sample
    rep = augment(x[:1].repeat(8, 1, 1, 1), cfg, torch.Generator().manual_seed(0))
    assert len({tuple(r.flatten()[:20].tolist()) for r in rep}) > 1


def test_corner_erasing_avoids_centre_band():
    cfg = AugmentConfig(flip=False, rot90=False, crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0,
                        erase_p=1.0, erase_area=(0.02, 0.04), erase_value=5.0)
    x = torch.zeros(64, 2, 36, 36)
    y = augment(x, cfg, torch.Generator().manual_seed(0))
    m = y == 5.0
    assert m.any(dim=(1, 2, 3)).all()  # every sample erased (p = 1)
    assert torch.equal(m[:, 0], m[:, 1])  # identical rectangle in both channels
    c = 18
    assert not m[:, :, c - 6 : c + 6, :].any() and not m[:, :, :, c - 6 : c + 6].any()
    area = m[:, 0].sum(dim=(1, 2)).float() / (36 * 36)
    assert area.min() >= 0.005 and area.max() <= 0.06


def test_augment_gaussian_noise_scales_with_sample_std():
    x = torch.randn(64, 2, 24, 24) * torch.linspace(0.5, 4.0, 64).view(64, 1, 1, 1)
    plain = AugmentConfig(flip=False, rot90=False, crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
    noisy = AugmentConfig(**{**plain.to_dict(), "noise": 0.5})
    assert torch.equal(augment(x, plain, torch.Generator().manual_seed(0)), x)  # noise 0: untouched
    y = augment(x, noisy, torch.Generator().manual_seed(0))
    ratio = (y - x).std(dim=(2, 3)) / x.std(dim=(2, 3))  # per sample and channel
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=0.08)
    assert torch.equal(y, augment(x, noisy, torch.Generator().manual_seed(0)))  # seeded


def test_make_views_pair_from_shifts():
    g = torch.Generator().manual_seed(0)
    batch = torch.zeros(10, 5, 1, 8, 8)
    for s in range(5):
        batch[:, s] = float(s)
    ident = AugmentConfig(flip=False, rot90=False, crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
    v1, v2 = make_views(batch, g, ident, ident)
    assert torch.all(v1 == 0)
    vals = v2[:, 0, 0, 0]
    assert torch.all((vals >= 1) & (vals <= 4)) and len(set(vals.tolist())) > 1
    # normalisation uses the given statistics
    v1n, _ = make_views(batch, g, ident, ident, mean=[2.0], std=[4.0])
    assert torch.allclose(v1n, torch.full_like(v1n, -0.5))


def test_make_views_tilt_halves_share_no_tilt_noise():
    """A halves bank (even tilts, odd tilts, slice): the two views never hold the same tilt half."""
    g = torch.Generator().manual_seed(0)
    n, b = 64, 8
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.random((n, 5, 3, b, b)).astype(np.float32))
    ident = AugmentConfig(flip=False, rot90=False, crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
    v1, v2 = make_views(batch, g, ident, ident, halves=True)
    assert v1.shape == (n, 2, b, b) and v2.shape == (n, 2, b, b)
    mm = minmax_unit
    src_a, src_b = mm(batch[:, :, 0]), mm(batch[:, :, 1])  # (n, S, b, b)
    first_a = torch.tensor([torch.allclose(v1[i, 0], src_a[i, 0]) for i in range(n)])
    first_b = torch.tensor([torch.allclose(v1[i, 0], src_b[i, 0]) for i in range(n)])
    assert torch.all(first_a ^ first_b)  # view 1: exactly one half of the original patch
    assert 10 < int(first_a.sum()) < n - 10  # which half is random per sample
    for i in range(n):
        j = next(k for k in range(1, 5) if torch.equal(v2[i, 1], batch[i, k, 2]))  # view 2's shift, by its slice
        other = src_b[i, j] if first_a[i] else src_a[i, j]
        torch.testing.assert_close(v2[i, 0], other)  # ... and the other half, at that shift
        torch.testing.assert_close(v1[i, 1], batch[i, 0, 2])


def test_model_channels_of_halves_is_the_tilt_sum():
    rng = np.random.default_rng(1)
    a, b_, sl = (rng.random((4, 6, 6)).astype(np.float32) for _ in range(3))
    lo = np.minimum(a, b_).min(axis=(1, 2), keepdims=True)
    hi = np.maximum(a, b_).max(axis=(1, 2), keepdims=True)
    joint = np.stack([(a - lo) / (hi - lo), (b_ - lo) / (hi - lo), sl], 1)  # the bank's joint min-max
    out = model_channels(joint, "halves")
    s = a + b_
    ref = (s - s.min(axis=(1, 2), keepdims=True)) / np.ptp(s, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out[:, 0], ref, atol=1e-5)
    np.testing.assert_array_equal(out[:, 1], sl)
    assert model_channels(joint[:, :2], "2d3d") is not None and model_channels(joint, "3d") is joint
    np.testing.assert_array_equal(minmax_unit(torch.ones(2, 3, 3)), torch.zeros(2, 3, 3))  # constant -> 0


# -- model ----------------------------------------------------------------------------------------


def test_centre_ring_pooling():
    fmap = torch.zeros(2, 3, 6, 6)
    fmap[:, :, 2:4, 2:4] = 4.0  # the central third (2x2 of 6x6)
    fmap[1, 1] += 1.0
    out = centre_ring_pool(fmap)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out[0], torch.tensor([4.0, 4, 4, 0, 0, 0]))
    torch.testing.assert_close(out[1, [1, 4]], torch.tensor([5.0, 1.0]))
    assert [centre_side(s) for s in (2, 4, 5, 6, 7, 8, 9)] == [2, 2, 1, 2, 3, 2, 3]
    torch.testing.assert_close(centre_ring_pool(torch.ones(1, 2, 2, 2)), torch.ones(1, 4))  # no ring: the mean
    m = create("simsiam-2d3d", **TINY).eval()
    x = torch.randn(3, 2, 16, 16)
    f = m.features(x, "centre")
    assert f.shape == (3, 4 * 32)
    torch.testing.assert_close(f[:, :64], centre_ring_pool(m.trunk.feature_map(x[:, :1])))
    # the trunk's global mean is the area-weighted mix of the centre and the ring (4 of 16 cells)
    torch.testing.assert_close(m.features(x, "trunk")[:, :32], (f[:, :32] * 4 + f[:, 32:64] * 12) / 16)
    mc = create("simsiam-3d", pool="centre", **TINY)
    assert mc.fc.in_features == 2 * 32
    p1, _, z1, _ = mc(torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16))
    assert p1.shape == (4, 128)
    with pytest.raises(InputError, match="pooling"):
        create("simsiam-3d", pool="max", **TINY)



def test_simsiam_models_and_loss():
    torch.manual_seed(0)
    m3 = create("simsiam-3d", **TINY)
    m23 = create("simsiam-2d3d", **TINY)
    x1 = torch.randn(6, 1, 16, 16)
    p1, p2, z1, z2 = m3(x1, x1 + 0.1)
    assert p1.shape == (6, 128) and not z1.requires_grad and p1.requires_grad
    loss = simsiam_loss(p1, p2, z1, z2)
    # the loss is the mean negative cosine similarity of predictions and (stopped) projections
    cos = torch.nn.functional.cosine_similarity
    expect = -0.5 * (cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean())
    assert loss.item() == pytest.approx(expect.item(), abs=1e-6)
    loss.backward()
    assert m3.trunk.stem[0].weight.grad is not None
    # identical inputs / perfect predictor -> loss -1
    z = torch.randn(4, 8)
    assert simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0)
    # 2d3d: shared trunk on both channels, late fusion 2*32 -> fc
    assert m23.fc.in_features == 2 * 32
    x2 = torch.randn(5, 2, 16, 16)
    m23.eval()
    f = m23.features(x2, "trunk")
    torch.testing.assert_close(f[:, :32], m23.trunk(x2[:, :1]))
    torch.testing.assert_close(f[:, 32:], m23.trunk(x2[:, 1:]))
    with pytest.raises(InputError, match="expects batches"):
        m23.features(torch.randn(2, 1, 16, 16))


def test_ntxent_loss_is_simclr_cross_entropy():
    """Each view's positive is its partner; the other 2N-2 views are negatives (checked against a direct sum)."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    t = 0.3
    loss = ntxent_loss(a, b, t)
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    total = 0.0
    for i in range(10):
        j = (i + 5) % 10
        logits = torch.stack([z[i] @ z[k] / t for k in range(10) if k != i])
        pos = z[i] @ z[j] / t
        total += -(pos - torch.logsumexp(logits, 0))
    assert loss.item() == pytest.approx(total.item() / 10, rel=1e-5)
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # orthogonal patches, views equal: near zero; views of other patches: about log(2N - 1)
    e = torch.eye(5, 8)
    assert ntxent_loss(e, e, 0.05).item() < 1e-6
    assert pair_loss("ntxent", e, e.roll(1, 0), e, e, 0.05).item() > 10
    with pytest.raises(InputError, match="objective"):
        pair_loss("byol", e, e, e, e)


@pytest.mark.parametrize("pool", ["mean", "centre"])
def test_mixed_precision_covers_the_trunk_only(pool):
    """Under bf16 autocast the convolutions run in bf16, the pooling, head and outputs in fp32."""
    torch.manual_seed(0)
    m = create("simsiam-3d", pool=pool, **TINY)
    seen = {}
    m.trunk.stem[0].register_forward_hook(lambda mod, inp, out: None if seen.setdefault("conv", out.dtype) else None)
    m.fc.register_forward_hook(lambda mod, inp, out: None if seen.setdefault("fc_in", inp[0].dtype) else None)
    x = torch.randn(4, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p1, p2, z1, z2 = m(x, x.flip(-1))
        f = m.features(x, "pred")
    assert seen == {"conv": torch.bfloat16, "fc_in": torch.float32}
    assert {t.dtype for t in (p1, p2, z1, z2, f)} == {torch.float32}
    # the same network in fp32 agrees to bf16's rounding of the trunk, not worse
    with torch.no_grad():
        ref = m.project(x)
    assert torch.nn.functional.cosine_similarity(z1.detach(), ref, dim=1).min() > 0.98
    simsiam_loss(p1, p2, z1, z2).backward()
    assert m.fc.weight.grad.dtype == torch.float32


def _knn_accuracy(x: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy on standardised features."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    votes = y[np.argsort(d, axis=1)[:, :k]].mean(axis=1)
    return float(((votes > 0.5) == y).mean())


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simsiam", "ntxent"])
def test_simsiam_learns_on_generated_patches(tmp_path, objective):
    """Fixed seed: the loss falls over 4 epochs and 5-NN on the embedding beats chance (0.5), with either objective."""
    col, data, kinds = write_bank(tmp_path / "s.zarr", n=128, chunk=32, seed=1)
    enc = train(col, out=tmp_path / "run", epochs=4, batch_size=32, lr=0.05, device="cpu", model_config=TINY,
                seed=3, objective=objective)
    assert enc.contract["recipe"]["objective"] == objective
    losses = [r["loss"] for r in mt_runlog(tmp_path / "run")]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0] - 0.02, losses
    acc = _knn_accuracy(enc.embed(col).values(), kinds)
    assert acc >= 0.8, acc  # two balanced shapes: chance is 0.5


def mt_runlog(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_load_weights_partial_torchvision_names(tmp_path, caplog):
    src = create("resnet18-trunc", widths=(8, 16, 32), blocks=(1, 1, 1))
    sd = {}
    # rename into torchvision style (conv1/bn1/layerN) and add tensors that do not exist here
    for k, v in src.state_dict().items():
        k = k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.")
        for i in range(3):
            k = k.replace(f"layers.{i}.", f"layer{i + 1}.")
        sd[k] = v + 1.0 if v.is_floating_point() else v
    sd["layer4.0.conv1.weight"] = torch.randn(3, 3)
    sd["fc.weight"] = torch.randn(1000, 512)  # torchvision fc: shape mismatch, skipped
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    m = SimSiam("3d", **TINY)
    with caplog.at_level(logging.INFO, logger="milotile.explore.model"):
        counts = load_weights(m, p)
    assert len([r for r in caplog.records if "weights" in r.getMessage()]) == 1
    assert counts["unused"] == 1 and counts["shape_mismatch"] == 1
    torch.testing.assert_close(m.trunk.stem[0].weight, src.stem[0].weight + 1.0)
    torch.testing.assert_close(m.trunk.layers[2][0].conv1.weight, src.layers[2][0].conv1.weight + 1.0)
    with pytest.raises(InputError, match="does not exist"):
        load_weights(m, tmp_path / "nope.pt")


# -- data ------------------------------------------------------------------------------------------


def test_open_bank_and_errors(tmp_path):
    col, data, _ = write_bank(tmp_path / "s.zarr", n=20)
    bank = open_bank(col)
    assert (bank.n, bank.n_shifts, bank.channels, bank.bbox, bank.mode) == (20, 5, 1, 16, "3d")
    np.testing.assert_array_equal(bank.read(3, 7, crop=12), data[3:7, :, :, 2:14, 2:14])
    with pytest.raises(InputError, match="2d3d"):
        open_bank(col, mode="2d3d")
    with pytest.raises(InputError, match="no patch bank 'zz'"):
        open_bank(col, key="zz")
    write_bank(tmp_path / "s.zarr", key="two", n=8, channels=2)
    with pytest.raises(InputError, match="choose one"):
        open_bank(col)
    assert open_bank(col, mode="2d3d").key == "two"


def test_loader_streams_every_row_once(tmp_path):
    col, data, _ = write_bank(tmp_path / "s.zarr", n=50, chunk=8)
    bank = open_bank(col)
    loader = PatchLoader(bank, 16, shuffle=True, drop_last=False, seed=1, buffer_rows=20)
    loader.read_rows = 8  # several reads per epoch
    batches = list(loader.epoch(0))
    allb = np.concatenate(batches)
    assert allb.shape == data.shape
    # every row exactly once (match by content)
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(allb) == key(data)
    assert not np.array_equal(allb, data)  # shuffled
    again = np.concatenate(list(loader.epoch(0)))
    np.testing.assert_array_equal(again, allb)  # per-epoch seeding replays
    dl = PatchLoader(bank, 16, drop_last=True, seed=1)
    assert all(len(b) == 16 for b in dl.epoch(1)) and len(dl) == 3


def test_channel_stats_streaming(tmp_path):
    col, data, _ = write_bank(tmp_path / "s.zarr", n=30, channels=2, chunk=7)
    mean, std = channel_stats(open_bank(col))
    ref = data[:, 0].astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-5)


# -- training & embedding --------------------------------------------------------------------------


@pytest.mark.slow
def test_train_resume_embed_3d(tmp_path, bank3d):
    col, data, kinds = bank3d
    kw = dict(epochs=2, batch_size=16, lr=0.05, device="cpu", model_config=TINY, save_every=1)
    enc = train(col, out=tmp_path / "run", **kw)
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["output_std"] > 0 and r["seconds"] > 0 for r in recs)
    assert recs[1]["lr"] < recs[0]["lr"]  # cosine schedule
    assert (run / "loss.png").is_file() and (run / "options.json").is_file()
    assert (run / "checkpoints" / "epoch-0001.pt").is_file()
    ck = load_checkpoint(run / "last.pt")
    c = ck["contract"]
    assert c["mode"] == "3d" and c["bbox"] == 16 and c["gauss"] == 0.8 and c["dog"] == [3, 5]
    np.testing.assert_allclose(c["mean"], [data[:, 0].mean()], rtol=1e-5)
    assert ck["epoch"] == 2 and ck["arch"] == "simsiam-3d"

    # resume: 1 epoch, then continue to 2 == 2 epochs straight
    train(col, out=tmp_path / "r2", **{**kw, "epochs": 1})
    enc2 = train(col, out=tmp_path / "r2", resume=True, **kw)
    for (k, a), b in zip(enc.model.state_dict().items(), enc2.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    recs2 = [json.loads(line) for line in (tmp_path / "r2" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs2] == [1, 2]
    assert recs2[1]["loss"] == pytest.approx(recs[1]["loss"], rel=1e-5)

    # embedding in process: aligned with the bank table, deterministic, stats from the checkpoint
    emb = enc.embed(col, batch_size=10)
    vals = emb.values()
    assert vals.shape == (48, enc.embedding_dim()) == (48, 2 * TINY["widths"][-1])  # default output: centre + ring
    assert c["feature"] == "centre" and c["tta"] is True and c["layout"] == "3d"
    assert vals.dtype == np.float32 and np.isfinite(vals).all()
    tab = col.read_table("embeddings-k")
    assert list(tab["embedding_index"]) == list(range(48))
    np.testing.assert_array_equal(tab["x"].to_numpy(), col.read_table("patches-k")["x"].to_numpy())
    assert dict(col.zarr_group["embeddings"]["k"].attrs["milotile"])["complete"] is True
    direct = Encoder.from_checkpoint(run / "last.pt").transform(data[:5])
    np.testing.assert_allclose(vals[:5], direct, rtol=1e-4, atol=1e-5)

    # a second bank with shifted intensities: embedding of a patch must not depend on the bank
    col_b, data_b, _ = write_bank(tmp_path / "t.zarr", n=12, seed=5, offset=3.0)
    emb_b = embed(col_b, model=run / "last.pt")
    expect = Encoder.from_checkpoint(run / "last.pt").transform(data_b)
    np.testing.assert_allclose(emb_b.values(), expect, rtol=1e-4, atol=1e-5)


def test_tta_embedding_is_orientation_invariant(tmp_path, bank3d):
    col, data, _ = bank3d
    enc = train(col, epochs=1, batch_size=16, device="cpu", model_config=TINY, out=tmp_path / "run", tta=True)
    assert enc.contract["tta"] is True
    x = data[:6, 0]
    for feature in ("trunk", "pred", "centre"):
        base = enc.transform(x, feature=feature)
        turned = enc.transform(np.ascontiguousarray(np.rot90(x, 1, (-2, -1))[..., ::-1]), feature=feature)
        np.testing.assert_allclose(turned, base, rtol=1e-4, atol=1e-5)
        plain = enc.transform(x, feature=feature, tta=False)  # the override
        assert not np.allclose(plain, base, atol=1e-5)
    emb = embed(col, model=tmp_path / "run" / "last.pt", feature="trunk")
    np.testing.assert_allclose(emb.values()[:6], enc.transform(x, feature="trunk"), rtol=1e-4, atol=1e-5)
    plain = embed(col, model=tmp_path / "run" / "last.pt", feature="trunk", tta=False, out_key="plain")
    assert not np.allclose(plain.values()[:6], emb.values()[:6], atol=1e-5)


def test_train_on_tilt_halves_and_embed_their_sum(tmp_path):
    """A tilthalves,slice bank trains a 2d3d model whose contract records the layout; embedding the halves
    bank equals embedding the tilt-sum bank of the same patches (the model sees the halves' sum)."""
    col, data, _ = write_bank(tmp_path / "s.zarr", key="h", n=32, channels=3, chunk=8)
    bank = open_bank(col, "h")
    assert (bank.layout, bank.mode, bank.channels) == ("halves", "2d3d", 3)
    assert open_bank(col, mode="2d3d").key == "h"  # found by mode although it holds 3 channels
    mean, std = channel_stats(bank)
    halves = minmax_unit(torch.from_numpy(data[:, 0, :2])).numpy()
    np.testing.assert_allclose(mean, [halves.mean(), data[:, 0, 2].mean()], rtol=1e-4)
    enc = train(col, key="h", epochs=1, batch_size=16, device="cpu", model_config=TINY, out=tmp_path / "run")
    c = enc.contract
    assert (c["mode"], c["channels"], c["layout"], len(c["mean"])) == ("2d3d", 3, "halves", 2)
    summed = model_channels(data[:, 0], "halves")  # (n, 2): tilt sum of both halves, slice
    np.testing.assert_allclose(enc.transform(data), enc.transform(summed), rtol=1e-4, atol=1e-5)
    emb = embed(col, model=tmp_path / "run" / "last.pt")
    np.testing.assert_allclose(emb.values(), enc.transform(summed), rtol=1e-4, atol=1e-5)
    # the same patches as a MiLoPYP tilt-sum bank: the halves model embeds it too, identically
    from milotile.store import open_collection

    g = col.zarr_group["patches"].require_group("ts")
    arr = g.create_array("data", shape=(32, 1, 2, 16, 16), chunks=(8, 1, 2, 16, 16), dtype="float32")
    arr[:] = summed[:, None]
    g.attrs["milotile"] = {"complete": True, "params": {"bbox": 16, "shifts": [], "modes": ["tiltsum", "slice"]}}
    col.write_table("patches-ts", col.read_table("patches-h"))
    col = open_collection(tmp_path / "s.zarr", mode="a")
    emb_ts = embed(col, model=tmp_path / "run" / "last.pt", key="ts")
    np.testing.assert_allclose(emb_ts.values(), emb.values(), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"1-channel \(3d\) patches but mode '2d3d'"):  # refused by the 2d3d model
        write_bank(tmp_path / "s.zarr", key="one", n=8, channels=1, chunk=8)
        embed(open_collection(tmp_path / "s.zarr", mode="a"), model=tmp_path / "run" / "last.pt", key="one")


@pytest.mark.slow
def test_train_2d3d_and_embed_on_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    col, data, _ = write_bank(tmp_path / "s.zarr", key="tt", n=32, channels=2, chunk=8)
    enc = train(col, mode="2d3d", bbox=12, epochs=1, batch_size=16, device="cpu",
                model_config=TINY, out=tmp_path / "run", feature="fc")
    assert enc.contract["channels"] == 2 and enc.bbox == 12 and len(enc.contract["mean"]) == 2
    local = enc.transform(data)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as lc, distributed.Client(lc) as client:
        emb = embed(col, model=tmp_path / "run" / "last.pt", rows_per_task=8)
        loads = client.run(lambda: __import__("milotile.nn.cache", fromlist=["cache_info"]).cache_info()["loads"])
    np.testing.assert_allclose(emb.values(), local, rtol=1e-4, atol=1e-5)
    assert list(loads.values()) == [1]  # 4 tasks, the model loaded once on the worker


def test_train_input_errors(tmp_path, bank3d):
    col, _, _ = bank3d
    with pytest.raises(InputError, match="bbox 20"):
        train(col, bbox=20, epochs=1, out=tmp_path / "r")
    with pytest.raises(InputError, match="optimizer"):
        train(col, optimizer="lbfgs", epochs=1, out=tmp_path / "r")
    with pytest.raises(InputError, match="cannot resume"):
        train(col, resume=True, epochs=1, out=tmp_path / "fresh")
    with pytest.raises(InputError, match="2-channel|1-channel"):
        train(col, mode="2d3d", epochs=1, out=tmp_path / "r")
    with pytest.raises(InputError, match="no patch bank"):
        train(tmp_path / "s.zarr", key="nope", epochs=1, out=tmp_path / "r")


def test_cli_defaults_spell_the_library_constants():
    """The CLI spells some defaults out so that parsing does not import torch or dask; they must agree."""
    import argparse

    from milotile.commands import explore as cmd_explore
    from milotile.commands import patches as cmd_patches
    from milotile.explore.model import FEATURES
    from milotile.stages.patches import DEFAULT_TILT_WINDOW

    assert cmd_explore._FEATURES == FEATURES
    ap = argparse.ArgumentParser()
    cmd_patches.register(ap.add_subparsers(dest="cmd"))
    assert tuple(ap.parse_args(["patches", "s.zarr"]).tilt_window) == DEFAULT_TILT_WINDOW


@pytest.mark.slow
def test_cli_train_embed_and_errors(tmp_path, capsys):
    from milotile.cli import main

    write_bank(tmp_path / "s.zarr", n=24)
    rc = main(["-q", "explore", "train", str(tmp_path / "s.zarr"), "--mode", "3d", "--bbox", "12",
               "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"), "--device", "cpu",
               "--strong-aug", '{"noise": 0.3, "crop_scale": [0.9, 1.0]}', "--no-tta", "--feature", "trunk"])
    assert rc == 0 and (tmp_path / "run" / "last.pt").is_file()
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["contract"]["bbox"] == 12 and ck["contract"]["tta"] is False and ck["contract"]["feature"] == "trunk"
    opts = json.loads((tmp_path / "run" / "options.json").read_text())
    assert opts["strong_aug"]["noise"] == 0.3 and opts["strong_aug"]["crop_scale"] == [0.9, 1.0]
    assert opts["weak_aug"]["noise"] == 0.0  # the weak view keeps the mode's recipe
    with pytest.raises(SystemExit):  # not JSON: argparse error
        main(["explore", "train", str(tmp_path / "s.zarr"), "--strong-aug", "noise=1"])
    rc = main(["explore", "train", str(tmp_path / "s.zarr"), "--weak-aug", '{"nosie": 1}', "--out", str(tmp_path / "r3")])
    assert rc == 2 and "invalid augmentation option" in capsys.readouterr().err
    from milotile.commands.explore import run_embed

    ns = __import__("argparse").Namespace(
        store=str(tmp_path / "s.zarr"), model=str(tmp_path / "run" / "last.pt"), key=None, batch_size=7,
        feature=None, out_key=None, device="cpu", overwrite=False)
    assert run_embed(ns) == 0  # handler without the CLI's cluster
    from milotile.store import open_collection

    assert open_collection(tmp_path / "s.zarr").read_table("embeddings-k").shape[0] == 24
    with pytest.raises(InputError, match="does not exist"):
        run_embed(__import__("argparse").Namespace(**{**vars(ns), "model": str(tmp_path / "missing.pt")}))
    rc = main(["explore", "train", str(tmp_path / "s.zarr"), "--key", "nope", "--out", str(tmp_path / "r2")])
    assert rc == 2 and "no patch bank 'nope'" in capsys.readouterr().err


def test_bank_preprocessing_from_stage_params():
    from milotile.explore.data import bank_preprocessing

    p = {"preprocess": {"a": {"gauss": 0.8, "compress": False}, "b": {"gauss": 0.8, "compress": False}}}
    assert bank_preprocessing(p) == {"gauss": 0.8, "dog": None, "compress": False, "bin": None}
    p["preprocess"]["b"]["gauss"] = 1.2
    assert bank_preprocessing(p)["gauss"] == [0.8, 1.2]
    assert bank_preprocessing({"gauss": 2.0, "dog": [3, 5]})["dog"] == [3, 5]


def test_existing_run_folder_is_not_overwritten(tmp_path, bank3d):
    """A second training into the same folder must not destroy the first run's checkpoint."""
    col, _data, _kinds = bank3d
    out = tmp_path / "run"
    train(col, epochs=1, batch_size=16, device="cpu", out=out, seed=1)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(InputError, match="already holds a checkpoint"):
        train(col, epochs=1, batch_size=16, device="cpu", out=out, seed=2)
    assert (out / "last.pt").read_bytes() == before
