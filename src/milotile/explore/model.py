"""SimSiam exploration models ("simsiam-3d", "simsiam-2d3d") on the truncated ResNet-18 trunk."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from milotile.errors import InputError
from milotile.explore.recipe import (  # SimSiam.features' outputs; pair_loss' objectives
    FEATURES,
    OBJECTIVES,
)
from milotile.nn.registry import register
from milotile.nn.resnet import ResNetTrunk

log = logging.getLogger(__name__)

__all__ = ["FEATURES", "OBJECTIVES", "SimSiam", "load_weights", "ntxent_loss", "output_std", "pair_loss",
           "simsiam_loss"]

#: how the trunk's last map is pooled before the fc head (training)
POOLS = ("mean", "centre")


def centre_side(side: int) -> int:
    """Side of the central window of a ``side × side`` map: the one nearest a third of it with the
    parity of ``side`` (so that the window is centred), at least 1."""
    same_parity = range(2 - side % 2, side + 1, 2)
    return min(same_parity, key=lambda c: (abs(c - side / 3), c))


def centre_ring_pool(fmap: torch.Tensor) -> torch.Tensor:
    """``(n, d, s, s)`` map → ``(n, 2d)``: mean over the central window, mean over the rest (the ring).

    The candidate sits at the patch centre; global pooling mixes it with its neighbours (crowders,
    membranes), the centre/ring split keeps the two apart. On a map too small for a ring (side <= 2)
    the ring is the global mean.
    """
    s = fmap.shape[-1]
    c = centre_side(s)
    o = (s - c) // 2
    centre = fmap[..., o : o + c, o : o + c].mean(dim=(2, 3))
    if c >= s:
        return torch.cat([centre, centre], dim=1)
    ring = (fmap.sum(dim=(2, 3)) - centre * (c * c)) / (s * s - c * c)
    return torch.cat([centre, ring], dim=1)


def _projector(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


def _predictor(dim: int, pred_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False),
        nn.BatchNorm1d(pred_dim),
        nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class SimSiam(nn.Module):
    """Trunk → fc → projector (z) → predictor (p), MiLoPYP's ``TomoResClassifier2D``/``2D3D``.

    Parameters
    ----------
    mode : {"3d", "2d3d"}
        ``3d``: one channel through the trunk, fc 256→dim. ``2d3d``: the tilt-sum (channel 0) and
        slice (channel 1) go through the *shared* trunk, their pooled features are concatenated
        (512) → fc 512→dim (late fusion).
    dim : int
        Embedding width (``head_conv`` = 128 in MiLoPYP).
    pred_dim : int
        Predictor hidden width.
    widths, blocks : trunk configuration (see :class:`milotile.nn.resnet.ResNetTrunk`).
    """

    def __init__(
        self,
        mode: str = "3d",
        dim: int = 128,
        pred_dim: int = 128,
        widths: tuple[int, ...] | list[int] = (64, 128, 256),
        blocks: tuple[int, ...] | list[int] = (2, 2, 2),
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if mode not in ("3d", "2d3d"):
            raise InputError(f"unknown exploration mode {mode!r}; use '3d' or '2d3d'.")
        if pool not in POOLS:
            raise InputError(f"unknown trunk pooling {pool!r}; use one of {', '.join(POOLS)}.")
        self.mode = mode
        self.pool = pool
        self.in_channels = 1 if mode == "3d" else 2
        self.trunk = ResNetTrunk(1, widths, blocks)
        feat = self.trunk.out_dim * self.in_channels * (2 if pool == "centre" else 1)
        self.fc = nn.Linear(feat, dim)
        self.projector = _projector(dim)
        self.predictor = _predictor(dim, pred_dim)
        self.dim = dim
        nn.init.normal_(self.fc.weight, std=0.001)  # MiLoPYP's fill_fc_weights
        nn.init.constant_(self.fc.bias, 0.001)

    def encode(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Pooled trunk features of a batch ``(n, C, h, w)`` (channels share the trunk).

        ``pool="mean"``: global average, ``(n, 256·C)``; ``"centre"``: :func:`centre_ring_pool`,
        ``(n, 2·256·C)``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"{self.mode} model expects batches (n, {self.in_channels}, h, w), got {tuple(x.shape)}."
            )
        n = x.shape[0]

        def pooled(fmap: torch.Tensor) -> torch.Tensor:
            return fmap.mean(dim=(2, 3)) if pool == "mean" else centre_ring_pool(fmap)

        # shared backbone: stack channels along the batch, split after pooling, fuse late
        xs = x if self.in_channels == 1 else x.transpose(0, 1).reshape(self.in_channels * n, 1, *x.shape[2:])
        # pooling in fp32 even under bf16 autocast: the ring is a difference of two sums, which bf16 would round
        f = pooled(self.trunk.feature_map(xs).float())
        if self.in_channels == 1:
            return f
        return f.view(self.in_channels, n, -1).transpose(0, 1).reshape(n, -1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output z (the head runs in fp32 under autocast; see :meth:`forward`)."""
        f = self.encode(x, self.pool)
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self.projector(self.fc(f))

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two views → ``(p1, p2, z1.detach(), z2.detach())`` (stop-gradient on z)."""
        # separate passes: BatchNorm statistics per view, as in SimSiam/MiLoPYP
        # Mixed precision covers the convolutional trunk only (nearly all the FLOPs): the pooled features,
        # fc, projector, predictor and loss stay fp32, since the cosine loss of SimSiam is sensitive to rounding.
        z1 = self.project(x1)
        z2 = self.project(x2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            return self.predictor(z1), self.predictor(z2), z1.detach(), z2.detach()

    @torch.no_grad()
    def features(self, x: torch.Tensor, kind: str = "pred") -> torch.Tensor:
        """Embedding of a batch: ``"pred"`` (MiLoPYP's choice), ``"proj"``, ``"fc"``, ``"trunk"`` or ``"centre"``.

        ``trunk`` is the globally pooled backbone, ``centre`` the backbone's last map pooled over its
        central third and over the ring around it (twice as wide; see :func:`centre_ring_pool`).
        """
        if kind not in FEATURES:
            raise InputError(f"unknown embedding feature {kind!r}; use one of {', '.join(FEATURES)}.")
        if kind in ("trunk", "centre"):
            return self.encode(x, pool="mean" if kind == "trunk" else "centre")
        f = self.encode(x, self.pool)
        with torch.autocast(device_type=f.device.type, enabled=False):  # the head in fp32, as in training
            h = self.fc(f)
            if kind == "fc":
                return h
            z = self.projector(h)
            return z if kind == "proj" else self.predictor(z)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine: ``-(cos(p1, z2) + cos(p2, z1)) / 2`` with z already detached."""
    return -0.5 * (
        F.cosine_similarity(p1.float(), z2.float(), dim=1).mean()
        + F.cosine_similarity(p2.float(), z1.float(), dim=1).mean()
    )


def ntxent_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's contrastive loss (normalised temperature-scaled cross entropy) over two views of a batch.

    Each row of ``a`` has its positive in the same row of ``b`` (and the reverse); the other ``2N - 2``
    views of the batch are its negatives, so the loss pushes different patches apart as well as pulling
    two views of one patch together (SimSiam only pulls).
    """
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    sim = (z @ z.T) / float(temperature)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def pair_loss(objective: str, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
              temperature: float = 0.2) -> torch.Tensor:
    """The training loss of :meth:`SimSiam.forward`'s outputs: ``simsiam`` (:func:`simsiam_loss`) or ``ntxent``
    (:func:`ntxent_loss` of the predictor outputs ``p1``, ``p2``, which keep their gradient)."""
    if objective == "simsiam":
        return simsiam_loss(p1, p2, z1, z2)
    if objective == "ntxent":
        return ntxent_loss(p1, p2, temperature)
    raise InputError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}.")


@torch.no_grad()
def output_std(p: torch.Tensor) -> float:
    """Collapse monitor: mean per-dimension std of L2-normalised outputs (≈ 1/sqrt(d) when healthy, 0 collapsed)."""
    return float(F.normalize(p.float(), dim=1).std(dim=0).mean())


@register("simsiam-3d")
def simsiam_3d(**config: Any) -> SimSiam:
    """SimSiam on single-channel slab patches."""
    config.pop("mode", None)
    return SimSiam(mode="3d", **config)


@register("simsiam-2d3d")
def simsiam_2d3d(**config: Any) -> SimSiam:
    """SimSiam with a shared trunk on tilt-sum + slice patches, fused late."""
    config.pop("mode", None)
    return SimSiam(mode="2d3d", **config)


_TV_LAYER = {"layer1": "0", "layer2": "1", "layer3": "2"}


def _translate_key(k: str) -> str | None:
    """Map torchvision ResNet / bare-trunk names onto ``SimSiam`` parameter names."""
    for pre in ("module.", "backbone.", "encoder."):
        if k.startswith(pre):
            k = k[len(pre) :]
    if k.startswith(("trunk.", "fc.", "projector.", "predictor.")):
        return k
    if k.startswith("stem."):
        return "trunk." + k
    if k.startswith("layers."):
        return "trunk." + k
    if k.startswith("conv1."):
        return "trunk.stem.0." + k[len("conv1.") :]
    if k.startswith("bn1."):
        return "trunk.stem.1." + k[len("bn1.") :]
    head = k.split(".", 1)[0]
    if head in _TV_LAYER:
        return f"trunk.layers.{_TV_LAYER[head]}." + k.split(".", 1)[1]
    return None  # layer4, torchvision fc, ... have no counterpart


def load_weights(model: SimSiam, path: str | os.PathLike[str]) -> dict[str, int]:
    """Partially load a local weights file (no download) and report it in one log line.

    Accepts a milotile checkpoint, a plain ``state_dict`` (this model, a bare trunk, or a
    torchvision ResNet-18; its 7×7 RGB ``conv1`` is summed over RGB and used only if shapes fit).

    Returns
    -------
    dict
        Counts: ``loaded``, ``shape_mismatch``, ``unused``, ``missing``.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"weights file {p!r} does not exist.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"weights file {p!r} could not be read ({type(exc).__name__}).") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"weights file {p!r} does not hold a state_dict of tensors.")
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    mismatch = unused = 0
    for k, v in obj.items():
        tk = _translate_key(k)
        if tk is None or tk not in own:
            unused += 1
            continue
        if v.ndim == 4 and v.shape[1] == 3 and own[tk].ndim == 4 and own[tk].shape[1] == 1:
            v = v.sum(dim=1, keepdim=True)  # RGB → grey
        if v.shape != own[tk].shape:
            mismatch += 1
            continue
        new[tk] = v
    model.load_state_dict(new, strict=False)
    counts = {
        "loaded": len(new),
        "shape_mismatch": mismatch,
        "unused": unused,
        "missing": len(own) - len(new),
    }
    log.info(
        "weights %s: loaded %d tensors, %d shape mismatches skipped, %d unused, %d model tensors left at init",
        p, counts["loaded"], mismatch, unused, counts["missing"],
    )
    if not new:
        raise InputError(f"weights file {p!r} has no tensor matching the {model.mode} model.")
    return counts
