"""Losses of the positive-unlabeled picker.

* :func:`pu_focal_loss` — MiLoPYP's PU focal risk with class prior ``tau`` and the non-negative
  correction, computed from logits with ``logsigmoid`` (no ``log(0)``; fixes the NaN losses of
  cet_pick issue #6), averaged over channels (one per class).
* :func:`debiased_contrastive_loss` — debiased voxel InfoNCE (Chuang et al. 2020) on a **voxel
  subsample** (all positives up to a cap + a bounded number of unlabeled/soft voxels per crop), so
  memory is ``O(n²)`` with ``n`` a few thousand at most instead of MiLoPYP's dense 24 576² matrices;
  self-similarity is excluded.
* :func:`consistency_loss` — MSE between the probabilities of a view and the un-flipped flipped view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from milotile.refine.recipe import PU_RISKS

__all__ = ["PU_RISKS", "pu_focal_loss", "debiased_contrastive_loss", "consistency_loss", "sample_voxels"]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    return torch.where(n > 0, (x * mask).sum() / n.clamp_min(1), x.new_zeros(()))




def pu_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, tau: float, beta: float = 0.0, risk: str = "clip",
    negative_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Non-negative PU focal risk, plus a term for labelled negatives.

    With ``p = sigmoid(logits)``, T = {g == 1}, S = {0 < g < 1}, U = {g == -1} (unlabeled),
    N = {g == -2} (labelled negatives, :data:`milotile.refine.targets.NEGATIVE`):

    * ``L_pos = -mean_T[(1-p)² log p] - mean_S[(1-g)⁴ p² log(1-p)]``
    * ``L_pn  = -mean_T[p² log(1-p)] - mean_S[g⁴ p² log(1-p)]`` (labelled voxels counted as negatives)
    * ``R_U = -mean_U[p² log(1-p)]``
    * ``R_neg = R_U - tau · L_pn`` (the negative risk estimated from the unlabeled voxels)
    * ``R_N = -negative_weight · tau · mean_N[log(1-p)]``, added to every variant: the labelled
      negatives weigh like the labelled positives (both scaled by the prior) and are not part of U.
      Plain cross-entropy, not focal: a labelled negative is certain, and the focal factor ``p²``
      silenced it exactly where it matters (a look-alike's centre at p 0.2-0.5 kept 4-25 % of its
      gradient; the term stayed near 1e-4 on the look-alike benchmark and did not lower them).

    and the risk by ``risk``:

    * ``"nnpu"`` — Kiryo et al. (2017): ``tau · L_pos + R_neg`` while ``R_neg >= -beta``; once the
      estimate falls below ``-beta`` (the net fits the labelled voxels so confidently that
      ``tau · L_pn`` exceeds ``R_U``) the step *descends* ``-R_neg`` instead, which lowers the
      over-confident positives and pushes the unlabeled voxels down, until the estimate is valid again;
    * ``"clip"`` — MiLoPYP: ``tau · L_pos + max(R_neg, -beta)``. Its defect: from the moment
      ``R_neg < -beta`` (on the hard benchmark: from the second epoch on, for the rest of training)
      the unlabeled voxels get no gradient at all, so decoys that look like the labels are never
      pushed down;
    * ``"pn"`` — the unlabeled voxels as plain negatives: ``tau · L_pos + R_U``.

    ``"clip"`` stays the default: on the hard benchmark (big species, 18 labels, the seed whose false
    positives are all same-sized crowders) F1 at the automatic / best threshold was 0.634 / 0.663
    with ``clip``, 0.508 / 0.609 with ``nnpu`` (the scores of particles and crowders both fall to
    about 0.7) and 0.655 / 0.680 with ``pn``: the crowders are not lost for want of negative
    gradient, the network cannot tell them apart (:mod:`milotile.refine.shape` does that).

    Voxels with g == 0 (labelled background, validation only) are ignored. A channel without
    positives in the batch contributes ``R_U`` (and ``R_N``) only.

    Parameters
    ----------
    logits, target
        ``(B, C, D, H, W)``.
    tau
        Class prior (fraction of unlabeled voxels that are positives), in (0, 1).
    beta
        Non-negative clip level (0).
    risk : {"nnpu", "clip", "pn"}
        How the negative risk is corrected (above).
    negative_weight
        Weight of the labelled-negative term ``R_N`` relative to the positive one.

    Returns
    -------
    loss, parts
        Scalar loss (mean over channels) and floats ``r_pos``, ``r_neg``, ``neg_loss`` for logging.
    """
    if risk not in PU_RISKS:
        raise ValueError(f"unknown PU risk {risk!r}; use one of {', '.join(PU_RISKS)}")
    z = logits.float()
    g = target.float()
    logp = F.logsigmoid(z)
    log1mp = F.logsigmoid(-z)
    p = torch.sigmoid(z)
    losses = []
    r_pos_all, r_neg_all, r_lab_all = 0.0, 0.0, 0.0
    for c in range(z.shape[1]):
        gc, lp, l1p, pc = g[:, c], logp[:, c], log1mp[:, c], p[:, c]
        t = (gc >= 1.0).float()
        s = ((gc > 0) & (gc < 1.0)).float()
        u = ((gc < 0) & (gc > -1.5)).float()
        n_lab = (gc <= -1.5).float()
        neg_term = -(pc**2) * l1p  # cost of calling a voxel negative
        l_pos = _masked_mean(-((1 - pc) ** 2) * lp, t) + _masked_mean((1 - gc).clamp(0, 1) ** 4 * neg_term, s)
        l_pn = _masked_mean(neg_term, t) + _masked_mean(gc.clamp(0, 1) ** 4 * neg_term, s)
        r_u = _masked_mean(neg_term, u)
        r_pos = tau * l_pos
        r_neg = r_u - tau * l_pn
        r_lab = negative_weight * tau * _masked_mean(-l1p, n_lab)
        if risk == "pn":
            losses.append(r_pos + r_u + r_lab)
        elif risk == "clip" or float(r_neg.detach()) >= -beta:
            losses.append(r_pos + torch.clamp(r_neg, min=-beta) + r_lab)
        else:  # nnPU: step back along the negative risk until it is a valid estimate again
            losses.append(-r_neg + r_lab)
        r_pos_all += float(r_pos.detach())
        r_neg_all += float(r_neg.detach())
        r_lab_all += float(r_lab.detach())
    loss = torch.stack(losses).mean()
    n = z.shape[1]
    return loss, {"r_pos": r_pos_all / n, "r_neg": r_neg_all / n, "neg_loss": r_lab_all / n}


def sample_voxels(
    target: torch.Tensor,
    *,
    max_pos: int = 256,
    n_unlabeled: int = 256,
    n_soft: int = 64,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the voxels used by the contrastive loss, per crop.

    Parameters
    ----------
    target
        ``(B, C, D, H, W)`` targets.
    max_pos, n_unlabeled, n_soft
        Per-crop caps on hard positives, unlabeled voxels and soft (labelled, not hard) voxels.
    generator
        Random generator for the subsample.

    Returns
    -------
    flat_index, label
        Indices into the flattened ``(B·D·H·W)`` voxels and labels: class index ``>= 0`` for hard
        positives, -1 unlabeled, -2 soft.
    """
    b = target.shape[0]
    nvox = target[0, 0].numel()
    t = target.detach().reshape(b, target.shape[1], nvox)
    is_pos = t >= 1.0
    any_pos = is_pos.any(dim=1)
    cls = torch.argmax(is_pos.to(torch.int8), dim=1)
    unl = (t < 0).all(dim=1)
    soft = ~any_pos & ~unl
    idx_list, lab_list = [], []
    for i in range(b):
        for mask, cap, lab in ((any_pos[i], max_pos, None), (unl[i], n_unlabeled, -1), (soft[i], n_soft, -2)):
            cand = torch.nonzero(mask, as_tuple=False).flatten()
            if len(cand) == 0 or cap <= 0:
                continue
            if len(cand) > cap:
                perm = torch.randperm(len(cand), generator=generator, device="cpu")[:cap]
                cand = cand[perm.to(cand.device)]
            idx_list.append(cand + i * nvox)
            lab_list.append(cls[i, cand] if lab is None else torch.full_like(cand, lab))
    if not idx_list:
        e = torch.zeros(0, dtype=torch.long, device=target.device)
        return e, e
    return torch.cat(idx_list), torch.cat(lab_list)


def _debiased(pos: torch.Tensor, neg: torch.Tensor, prior: float, floor: torch.Tensor) -> torch.Tensor:
    ng = (neg - prior * pos) / (1.0 - prior)
    return torch.maximum(ng, floor)


def debiased_contrastive_loss(
    feat1: torch.Tensor,
    feat2: torch.Tensor,
    target: torch.Tensor,
    prob1: torch.Tensor,
    prob2: torch.Tensor,
    *,
    tau: float,
    temp: float = 0.07,
    unsup_weight: float = 0.1,
    max_pos: int = 256,
    n_unlabeled: int = 256,
    n_soft: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Debiased voxel InfoNCE on a voxel subsample of two aligned views.

    Parameters
    ----------
    feat1, feat2
        ``(B, F, D, H, W)`` L2-normalised features of view 1 and of view 2 **already un-flipped**, so
        voxel ``i`` is the same place in both.
    target
        ``(B, C, D, H, W)`` targets (shared by both views).
    prob1, prob2
        ``(B, C, D, H, W)`` predicted probabilities (used detached as soft pseudo-labels).
    tau
        Class prior used for debiasing.
    temp
        InfoNCE temperature.
    unsup_weight
        Weight of the unlabeled-anchor term (MiLoPYP's hard-coded 0.1).
    max_pos, n_unlabeled, n_soft
        Per-crop subsample sizes (see :func:`sample_voxels`).

    Returns
    -------
    torch.Tensor
        Scalar ``L_sup + unsup_weight · L_unsup``.

    Notes
    -----
    For a positive anchor, positives are the other sampled voxels of the same class (including its
    counterpart in the other view); negatives all remaining sampled voxels. The negative mean is
    debiased, ``Ng = max((neg - tau·pos) / (1 - tau), e^{-1/temp})``. For an unlabeled anchor the
    positive is its counterpart in the other view and the loss mixes a particle hypothesis (prior
    ``tau``) and a background hypothesis (prior ``1 - tau``) weighted by the predicted probability.
    Self-similarity is excluded everywhere.
    """
    idx, lab = sample_voxels(target, max_pos=max_pos, n_unlabeled=n_unlabeled, n_soft=n_soft, generator=generator)
    if len(idx) < 2:
        return feat1.new_zeros(()).float()
    b, f = feat1.shape[:2]

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, x.shape[1], -1).permute(0, 2, 1).reshape(-1, x.shape[1])[idx]

    v = torch.cat([gather(feat1), gather(feat2)], dim=0).float()
    v = F.normalize(v, dim=1, eps=1e-6)
    q = torch.cat([gather(prob1).amax(dim=1), gather(prob2).amax(dim=1)]).detach().float()
    labels = torch.cat([lab, lab])
    n = len(idx)
    m = 2 * n
    eye = torch.eye(m, dtype=torch.bool, device=v.device)
    sim = (v @ v.t()) / temp
    sim = sim.masked_fill(eye, float("-inf"))
    rowmax = sim.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(sim - rowmax)  # diagonal is exp(-inf) = 0: no self-similarity
    floor = torch.exp(-1.0 / temp - rowmax.squeeze(1))
    partner = torch.cat([torch.arange(n, m), torch.arange(0, n)]).to(v.device)

    total = v.new_zeros(())
    pos_anchor = labels >= 0
    if pos_anchor.any():
        la = labels[pos_anchor]
        same = (la[:, None] == labels[None, :]) & ~eye[pos_anchor]
        other = ~same & ~eye[pos_anchor]
        ea = e[pos_anchor]
        pos = (ea * same).sum(1) / same.sum(1).clamp_min(1)
        neg = (ea * other).sum(1) / other.sum(1).clamp_min(1)
        ok = (same.sum(1) > 0) & (other.sum(1) > 0)
        if ok.any():
            ng = _debiased(pos, neg, tau, floor[pos_anchor])
            l_sup = torch.log(pos + ng) - torch.log(pos.clamp_min(1e-30))
            total = total + l_sup[ok].mean()
    unl_anchor = labels == -1
    if unl_anchor.any() and unsup_weight > 0:
        rows = torch.nonzero(unl_anchor).flatten()
        eu = e[rows]
        pos = eu[torch.arange(len(rows), device=v.device), partner[rows]]
        others = ~eye[rows]
        others[torch.arange(len(rows), device=v.device), partner[rows]] = False
        neg = (eu * others).sum(1) / others.sum(1).clamp_min(1)
        fl = floor[rows]
        lp = torch.log(pos + _debiased(pos, neg, tau, fl)) - torch.log(pos.clamp_min(1e-30))
        ln = torch.log(pos + _debiased(pos, neg, 1.0 - tau, fl)) - torch.log(pos.clamp_min(1e-30))
        qu = q[rows]
        total = total + unsup_weight * (qu * lp + (1 - qu) * ln).mean()
    return total


def consistency_loss(prob1: torch.Tensor, prob2_unflipped: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two views' probabilities (same voxel grid)."""
    return F.mse_loss(prob1.float(), prob2_unflipped.float())
