"""Tile plans from the receptive field (halo overhead) and the per-slice trunk computed once per volume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from milotile.ops.tiling import axis_cost, plan_tiles


def _brute_computed(shape, tile, halo):
    total = 0
    starts = [range(0, n, t) for n, t in zip(shape, tile, strict=True)]
    for origin in itertools.product(*starts):
        vol = 1
        for s, t, n, h in zip(origin, tile, shape, halo, strict=True):
            vol *= min(n, s + t + h) - max(0, s - h)
        total += vol
    return total


def test_small_volume_is_one_tile_without_halo_cost():
    p = plan_tiles((128, 256, 256), (3, 128, 128), (1, 16, 16), 2**25)
    assert p.tile == (128, 256, 256) and p.counts == (1, 1, 1) and p.halo_overhead == 0.0


def test_large_volume_keeps_halo_overhead_low_within_budget():
    shape, halo, align = (256, 1024, 1024), (3, 128, 128), (1, 16, 16)
    budget = 2**25
    p = plan_tiles(shape, halo, align, budget)
    assert p.largest_tile_voxels <= budget
    assert p.halo_overhead < 0.30
    assert p.computed_voxels == _brute_computed(shape, p.tile, halo)  # the separable count is exact
    assert all(t % a == 0 or t == n for t, a, n in zip(p.tile, align, shape, strict=True))
    # the old default (z chunks of 64, 512 x 512 in y/x) recomputed much more halo
    old = _brute_computed(shape, (64, 512, 512), halo)
    assert 1 - math.prod(shape) / old > 0.3 > p.halo_overhead


def test_axis_cost_clips_at_faces():
    assert axis_cost(100, 100, 10) == (100, 100)
    assert axis_cost(100, 50, 10) == (120, 60)


def test_unfittable_budget_returns_smallest_tiles():
    p = plan_tiles((32, 64, 64), (3, 16, 16), (1, 16, 16), 10)
    assert p.largest_tile_voxels > 10 and p.tile[0] == 1  # the smallest tiles there are (1 slice)
    assert p.largest_tile_voxels == (1 + 2 * 3) * 48 * 48  # y/x tiles of 16 or 32 read 48 with the halo


@pytest.mark.parametrize("head_slices", [1, 4, 64])
def test_predict_volume_equals_forward(head_slices):
    from milotile.refine.model import unet4

    torch.manual_seed(0)
    m = unet4(start_filts=4, stem_ch=4, feat_dim=8).eval()
    x = torch.randn(13, 48, 48)
    with torch.no_grad():
        ref = m(x[None])["hm"][0]
        got = m.predict_volume(x, slices_per_batch=5, head_slices=head_slices)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_channels_last_on_the_cpu_gives_the_contiguous_result(monkeypatch):
    """The CPU path runs trunk and head on channels-last activations (faster in oneDNN); outputs are those of the
    plain contiguous layout, for training's forward and for predict_volume."""
    from milotile.refine import model as M

    torch.manual_seed(1)
    m = M.unet4(start_filts=4, stem_ch=4, feat_dim=8, z_dilation=2).eval()
    x = torch.randn(11, 40, 40)
    seen = []

    def probe(mod, inp, out):
        seen.append(inp[0].is_contiguous(memory_format=torch.channels_last))

    hook = m.trunk.down[1].register_forward_hook(probe)
    with torch.no_grad():
        fast = m(x[None])["hm"][0], m.predict_volume(x, head_slices=4)
    hook.remove()
    assert seen and all(seen)  # the trunk really saw channels-last inputs
    monkeypatch.setattr(M, "_channels_last", lambda t: t)
    with torch.no_grad():
        plain = m(x[None])["hm"][0], m.predict_volume(x, head_slices=4)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
