"""PU focal risk, subsampled debiased contrastive loss and flip consistency."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from milotile.refine.losses import (
    consistency_loss,
    debiased_contrastive_loss,
    pu_focal_loss,
    sample_voxels,
)


def _target(b=2, c=1, shape=(4, 8, 8)):
    t = -torch.ones(b, c, *shape)
    t[:, 0, 2, 4, 4] = 1.0
    t[:, 0, 2, 4, 5] = 0.5
    t[:, 0, 2, 3, 4] = 0.3
    return t


def test_pu_loss_is_finite_for_extreme_logits():
    t = _target()
    for val in (-1e4, 1e4, 0.0):
        z = torch.full_like(t, val, requires_grad=True)
        loss, parts = pu_focal_loss(z, t, tau=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_pu_loss_rewards_positives_and_penalises_unlabeled():
    t = _target()
    base = torch.full_like(t, -2.0)
    l0, _ = pu_focal_loss(base, t, tau=0.1)
    up = base.clone()
    up[t == 1] = 3.0
    assert pu_focal_loss(up, t, tau=0.1)[0] < l0
    # raising every unlabeled voxel above the prior costs more risk
    bad = base.clone()
    bad[t < 0] = 2.0
    assert pu_focal_loss(bad, t, tau=0.1)[0] > l0


def test_non_negative_correction_stops_negative_risk_gradient():
    t = _target()
    z = torch.full_like(t, -8.0)  # unlabeled risk ~0
    z[t == 1] = 4.0  # positives confidently positive: tau * L_pn dominates, R_neg < 0
    z.requires_grad_(True)
    loss, parts = pu_focal_loss(z, t, tau=0.5)
    assert parts["r_neg"] < 0
    loss.backward()
    assert torch.all(z.grad[t < 0] == 0)  # clipped: no gradient through R_U


def test_nnpu_steps_back_and_pn_treats_unlabeled_as_negatives():
    t = _target()
    z = torch.full_like(t, -8.0)
    z[t == 1] = 4.0  # the same over-confident state: R_neg < 0
    z.requires_grad_(True)
    loss, parts = pu_focal_loss(z, t, tau=0.5, risk="nnpu")
    assert parts["r_neg"] < 0 and float(loss.detach()) == pytest.approx(-parts["r_neg"], rel=1e-5)
    loss.backward()
    assert (z.grad[t == 1] > 0).all()  # descending -R_neg lowers the over-confident positives
    assert (z.grad[t < 0] < 0).all()  # and no longer ignores the unlabeled voxels
    z2 = z.detach().clone().requires_grad_(True)
    loss2, _ = pu_focal_loss(z2, t, tau=0.5, risk="pn")
    loss2.backward()
    assert float(loss2.detach()) > 0 and (z2.grad[t < 0] > 0).all()  # unlabeled pushed down like negatives
    with pytest.raises(ValueError, match="unknown PU risk"):
        pu_focal_loss(z, t, tau=0.5, risk="upu")


def test_channel_without_positives_contributes_unlabeled_risk():
    t = _target(c=2)
    t[:, 1] = -1.0
    z = torch.zeros_like(t, requires_grad=True)
    loss, _ = pu_focal_loss(z, t, tau=0.1)
    loss.backward()
    assert torch.isfinite(loss) and (z.grad[:, 1] > 0).all()


def test_voxel_subsample_is_bounded():
    t = -torch.ones(3, 2, 6, 32, 32)
    t[:, 0, 3, 10:20, 10:20] = 1.0
    t[:, 1, 3, 0:2, 0:2] = 1.0
    t[:, 0, 3, 20:22, 20:30] = 0.5
    g = torch.Generator().manual_seed(0)
    idx, lab = sample_voxels(t, max_pos=50, n_unlabeled=40, n_soft=5, generator=g)
    assert len(idx) == 3 * (50 + 40 + 5)
    assert (lab >= 0).sum() == 150 and (lab == -1).sum() == 120 and (lab == -2).sum() == 15
    assert set(lab[lab >= 0].tolist()) <= {0, 1}
    flat = t.permute(0, 2, 3, 4, 1).reshape(-1, 2)
    assert torch.all(flat[idx[lab == -1]] < 0)


def _features(t, informative, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, _, d, h, w = t.shape
    f = torch.randn(b, 16, d, h, w, generator=g)
    if informative:  # particles share one direction, background another
        pos = (t[:, :1] >= 1).expand_as(f)
        f = torch.where(pos, torch.zeros_like(f), f)
        f[:, 0][t[:, 0] >= 1] = 10.0
    return F.normalize(f, dim=1)


def test_contrastive_prefers_features_that_separate_particles():
    t = -torch.ones(2, 1, 4, 16, 16)
    t[:, 0, 1:3, 4:8, 4:8] = 1.0
    prob = torch.full_like(t, 0.05)
    good = _features(t, True)
    bad = _features(t, False)
    kw = dict(tau=0.1, temp=0.1, max_pos=64, n_unlabeled=64, generator=torch.Generator().manual_seed(0))
    lg = debiased_contrastive_loss(good, good, t, prob, prob, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    lb = debiased_contrastive_loss(bad, bad, t, prob, prob, **kw)
    assert torch.isfinite(lg) and torch.isfinite(lb)
    assert lg < lb


def test_contrastive_gradients_and_no_self_pairs():
    t = -torch.ones(2, 1, 2, 8, 8)
    t[:, 0, 1, 3, 3] = 1.0
    f1 = torch.randn(2, 8, 2, 8, 8, requires_grad=True)
    f2 = torch.randn(2, 8, 2, 8, 8, requires_grad=True)
    p = torch.full_like(t, 0.5)
    loss = debiased_contrastive_loss(F.normalize(f1, dim=1), F.normalize(f2, dim=1), t, p, p, tau=0.1,
                                     generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f1.grad).all() and f1.grad.abs().sum() > 0
    # identical views: the positive pair is perfect, the loss depends only on the negatives
    same = F.normalize(torch.randn(2, 8, 2, 8, 8), dim=1)
    assert torch.isfinite(debiased_contrastive_loss(same, same, t, p, p, tau=0.1))


def test_consistency():
    a = torch.rand(2, 1, 3, 5, 5)
    assert consistency_loss(a, a) == 0
    assert consistency_loss(a, a + 0.1) == pytest.approx(0.01, rel=1e-4)
