"""The 2.5D picking networks: shapes, heads, receptive field, registry and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from milotile.nn import build_model, create, load_checkpoint, save_checkpoint
from milotile.refine.model import HM_PRIOR_BIAS

SMALL = {
    "unet4": {"start_filts": 4, "stem_ch": 4, "feat_dim": 8},
    "unet5": {"start_filts": 4, "stem_ch": 4, "feat_dim": 8},
    "ressmall": {"widths": (4, 8), "stem_ch": 4, "feat_dim": 8},
}


@pytest.mark.parametrize("arch", ["unet4", "unet5", "ressmall"])
def test_output_shapes_and_heads(arch):
    torch.manual_seed(0)
    model = create(arch, n_classes=2, **SMALL[arch]).eval()
    x = torch.rand(2, 5, 33, 46)
    with torch.no_grad():
        out = model(x)
    assert out["hm"].shape == (2, 2, 5, math.ceil(33 / 2), 23)
    assert out["feat"].shape == (2, 8, 5, 17, 23)
    norms = out["feat"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    # heatmap prior: sigmoid(-2.19) ~ 0.1 everywhere at initialisation (no early instability)
    p = torch.sigmoid(out["hm"])
    assert abs(float(p.mean()) - 1 / (1 + math.exp(-HM_PRIOR_BIAS))) < 0.02


def test_aliases_build_the_same_architecture():
    a = create("unet_4", **SMALL["unet4"])
    b = create("unet4", **SMALL["unet4"])
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert len(create("unet5", **SMALL["unet5"]).trunk.down) == 5


@pytest.mark.parametrize("arch", ["unet4", "ressmall"])
def test_receptive_field_bounds_the_gradient_support(arch):
    torch.manual_seed(1)
    model = create(arch, **SMALL[arch]).eval()
    for p in model.parameters():  # positive weights: no cancellation, the support is the full field
        p.data.abs_()
    x = torch.rand(1, 13, 300, 300, requires_grad=True)
    out = model(x)["hm"]
    cz, cy, cx = 6, 75, 75  # output voxel; input centre (6, 150, 150)
    out[0, 0, cz, cy, cx].backward()
    g = x.grad[0].abs()
    nz = torch.nonzero(g.sum(dim=(1, 2))).flatten()
    ny = torch.nonzero(g.sum(dim=(0, 2))).flatten()
    rz, ry, _ = model.receptive_field()
    assert int(nz.min()) >= 6 - rz // 2 and int(nz.max()) <= 6 + rz // 2
    assert int(ny.min()) >= 150 - ry // 2 and int(ny.max()) <= 150 + ry // 2
    assert int(nz.max()) - int(nz.min()) + 1 == rz  # z field is exact: 7 slices


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    model = create("ressmall", n_classes=3, **SMALL["ressmall"]).eval()
    path = save_checkpoint(tmp_path / "m.pt", arch="ressmall", config={"n_classes": 3, **SMALL["ressmall"]},
                           model=model, contract={"kind": "refine-picker"})
    again = build_model(load_checkpoint(path))
    x = torch.rand(1, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["hm"], again(x)["hm"])
