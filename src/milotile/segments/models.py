"""Tiny shape models for per-object embeddings: 3-D SimSiam, 3-D VAE and a point-cloud auto-encoder.

Registered in :mod:`milotile.nn.registry` as ``seg-simsiam3d``, ``seg-vae3d`` and ``seg-pointae``.
They are small on purpose (tens of thousands of parameters; an epoch over a few hundred 32³ cubes
takes seconds on one CPU core) and run unchanged on a GPU.

Fixes relative to EManalysis: the VAE has no U-Net skip connections (the latent is a real
bottleneck), no activation on the μ / log σ² heads, and the embedding is μ (not a random sample);
the point-cloud AE keeps aspect ratio (isotropic normalisation, scale kept as a feature), is
trained with random rotations, and its Chamfer loss is the sum of both directions (not the max);
no ``.cuda()`` is hard-coded anywhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from milotile.explore.model import _predictor, _projector
from milotile.nn.registry import register

__all__ = ["ConvEncoder3d", "SegSimSiam", "SegVAE", "PointAE", "chamfer", "vae_loss", "ARCHS"]

#: learned-feature kind -> registered architecture
ARCHS = {"simsiam": "seg-simsiam3d", "vae": "seg-vae3d", "pointae": "seg-pointae"}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
        nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
    )


class ConvEncoder3d(nn.Module):
    """Three stride-2 conv stages (``size → size/8``) on a one-channel cube ``(n, 1, S, S, S)``."""

    def __init__(self, widths: tuple[int, ...] | list[int] = (8, 16, 32)) -> None:
        super().__init__()
        chans = [1, *widths]
        self.stages = nn.Sequential(*[_block(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)])
        self.out_channels = int(widths[-1])
        self.factor = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


class SegSimSiam(nn.Module):
    """SimSiam on shape cubes: encoder → global pool → fc (the embedding) → projector → predictor."""

    def __init__(self, dim: int = 32, pred_dim: int = 16, widths: tuple[int, ...] | list[int] = (8, 16, 32)) -> None:
        super().__init__()
        self.encoder = ConvEncoder3d(widths)
        self.fc = nn.Linear(self.encoder.out_channels, dim)
        self.projector = _projector(dim)
        self.predictor = _predictor(dim, pred_dim)
        self.dim = dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (fc output) of a batch of cubes."""
        return self.fc(self.encoder(x).mean(dim=(2, 3, 4)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z1 = self.projector(self.embed(x1))
        z2 = self.projector(self.embed(x2))
        return self.predictor(z1), self.predictor(z2), z1.detach(), z2.detach()


class SegVAE(nn.Module):
    """Convolutional VAE on shape cubes ``(n, 1, S, S, S)``, values in [0, 1]; decoder returns logits."""

    def __init__(self, size: int = 32, latent: int = 16, widths: tuple[int, ...] | list[int] = (8, 16, 32)) -> None:
        super().__init__()
        self.encoder = ConvEncoder3d(widths)
        if size % self.encoder.factor:
            raise ValueError(f"cube size {size} must be a multiple of {self.encoder.factor}")
        self.bottom = size // self.encoder.factor
        flat = self.encoder.out_channels * self.bottom**3
        self.mu = nn.Linear(flat, latent)
        self.logvar = nn.Linear(flat, latent)
        self.dec_in = nn.Linear(latent, flat)
        rev = list(widths)[::-1]
        ups: list[nn.Module] = []
        for a, b in zip(rev, [*rev[1:], 8], strict=True):
            ups += [nn.ConvTranspose3d(a, b, 4, stride=2, padding=1), nn.BatchNorm3d(b), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*ups, nn.Conv3d(8, 1, 3, padding=1))
        self.latent = latent

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z).view(z.shape[0], -1, self.bottom, self.bottom, self.bottom)
        return self.decoder(F.relu(h))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decode(z), mu, logvar

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """μ of the posterior (deterministic)."""
        return self.encode(x)[0]


def vae_loss(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-object reconstruction (binary cross-entropy summed over voxels) + β·KL, averaged over the batch."""
    rec = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return rec + beta * kl, rec, kl


class PointAE(nn.Module):
    """PointNet encoder (shared MLP + max-pool) and an MLP decoder to ``n_points`` points."""

    def __init__(self, n_points: int = 256, latent: int = 16, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(3, width // 2, 1), nn.BatchNorm1d(width // 2), nn.ReLU(inplace=True),
            nn.Conv1d(width // 2, width, 1), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Conv1d(width, 2 * width, 1),
        )
        self.code = nn.Linear(2 * width, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, 4 * width), nn.ReLU(inplace=True),
            nn.Linear(4 * width, n_points * 3),
        )
        self.n_points = n_points
        self.latent = latent

    def embed(self, pts: torch.Tensor) -> torch.Tensor:
        """Codeword of clouds ``(n, P, 3)``."""
        return self.code(self.encoder(pts.transpose(1, 2)).amax(dim=2))

    def forward(self, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.embed(pts)
        return self.decoder(code).view(-1, self.n_points, 3), code


def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance: mean squared nearest-neighbour distance a→b plus b→a, batch mean."""
    d = torch.cdist(a.float(), b.float()).pow(2)
    return (d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1)).mean()


@register("seg-simsiam3d")
def seg_simsiam3d(**config: Any) -> SegSimSiam:
    """Build :class:`SegSimSiam` (``dim``, ``pred_dim``, ``widths``)."""
    return SegSimSiam(**config)


@register("seg-vae3d")
def seg_vae3d(**config: Any) -> SegVAE:
    """Build :class:`SegVAE` (``size``, ``latent``, ``widths``)."""
    return SegVAE(**config)


@register("seg-pointae")
def seg_pointae(**config: Any) -> PointAE:
    """Build :class:`PointAE` (``n_points``, ``latent``, ``width``)."""
    return PointAE(**config)
