"""Batch augmentation in torch (CPU or GPU), vectorised over the batch.

MiLoPYP turned every patch into an 8-bit PIL image and augmented it in a per-sample Python loop
in the main process. Here one ``affine_grid``/``grid_sample`` call applies flips, a multiple of
90° rotation, a small rotation and a random resized crop (one box per sample) to the whole batch;
intensity jitter and corner erasing are masked tensor ops. All channels of a sample share the
same geometry (the tilt-sum and slice channels of ``2d3d`` stay registered).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from milotile.explore.data import minmax_unit

__all__ = ["AugmentConfig", "default_config", "augment", "add_noise", "make_views", "normalize"]


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one view's augmentation chain.

    Attributes
    ----------
    flip : bool
        Random horizontal and vertical flips (p 0.5 each).
    rot90 : bool
        Random multiple of 90°.
    rotate_deg : float
        Uniform rotation in ``[-rotate_deg, rotate_deg]`` (0 disables).
    crop_scale : tuple of float
        Random resized crop area fraction range (square boxes, ratio 1).
    brightness, contrast : float
        ColorJitter-style factors: brightness ×U(1-b, 1+b), contrast about the per-sample mean ×U(1-c, 1+c).
    jitter_p : float
        Probability of applying the intensity jitter to a sample.
    erase_p : float
        Probability of corner erasing (0 disables).
    erase_area : tuple of float
        Rectangle area as a fraction of the patch.
    erase_ratio : tuple of float
        Rectangle aspect-ratio range.
    erase_band : int
        Half width (pixels) of the central band the rectangle must avoid in each axis.
    erase_value : float
        Fill value before normalisation (1 = white for min-max normalised patches, as MiLoPYP).
    padding : str
        ``grid_sample`` padding for pixels rotated in from outside (``"reflection"``, ``"zeros"``, ``"border"``).
    noise : float
        Additive Gaussian noise with standard deviation ``noise`` times the sample's (per channel)
        standard deviation, applied after the intensity jitter (0 disables).
    """

    flip: bool = True
    rot90: bool = True
    rotate_deg: float = 0.0
    crop_scale: tuple[float, float] = (0.8, 1.0)
    brightness: float = 0.5
    contrast: float = 0.2
    jitter_p: float = 1.0
    erase_p: float = 0.0
    erase_area: tuple[float, float] = (0.01, 0.02)
    erase_ratio: tuple[float, float] = (0.5, 1.5)
    erase_band: int = 6
    erase_value: float = 1.0
    padding: str = "reflection"
    noise: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in run options and checkpoints)."""
        return asdict(self)


def default_config(mode: str, view: str) -> AugmentConfig:
    """The recipe's chains: ``view="strong"`` for the original patch, ``"weak"`` for the shifted one.

    ``3d`` (chosen on the hard benchmark, ``benchmarks/explore.py --preset hard``): flips, any
    in-plane rotation (±180°), no random resized crop (a particle's size tells species apart, so
    views keep it), ColorJitter(0.2, 0.2), and Gaussian noise of 0.5 × the patch std on the strong
    view. MiLoPYP's chain (RRC 0.8–1.0 / 0.9–1.0, ColorJitter(0.5, 0.2), rot90, no noise) is
    ``replace(AugmentConfig(), ...)`` of the dataclass defaults.
    ``2d3d``: flips, any in-plane rotation (both views), corner erasing (p 0.5), noise 0.5 on the
    strong view; no jitter, no crop (MiLoPYP: rotation ±30° on the strong view only, no noise).
    """
    if mode == "3d":
        base = AugmentConfig(rotate_deg=180.0, crop_scale=(1.0, 1.0), brightness=0.2, contrast=0.2)
        return replace(base, noise=0.5) if view == "strong" else base
    if mode == "2d3d":
        base = AugmentConfig(rotate_deg=180.0, crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0, erase_p=0.5)
        return replace(base, noise=0.5) if view == "strong" else base
    raise ValueError(f"unknown mode {mode!r}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def affine_params(n: int, cfg: AugmentConfig, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per-sample ``(n, 2, 3)`` matrices mapping output to input normalised coordinates."""
    one = torch.ones(n, device=device)
    # random resized crop: square box of side sqrt(area) placed inside the patch
    side = torch.sqrt(_uniform(n, cfg.crop_scale[0], cfg.crop_scale[1], g, device)).clamp(max=1.0)
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - side)
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - side)
    ang = torch.zeros(n, device=device)
    if cfg.rotate_deg:
        ang = ang + _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g, device) * (math.pi / 180)
    if cfg.rot90:
        ang = ang + torch.randint(0, 4, (n,), generator=g, device=device).float() * (math.pi / 2)
    fx = torch.where(_coin(n, 0.5, g, device), -one, one) if cfg.flip else one
    fy = torch.where(_coin(n, 0.5, g, device), -one, one) if cfg.flip else one
    c, s = torch.cos(ang), torch.sin(ang)
    # exact values for multiples of 90° so that flips/rot90 alone reproduce pixels exactly
    c = torch.where(c.abs() < 1e-6, torch.zeros_like(c), c)
    s = torch.where(s.abs() < 1e-6, torch.zeros_like(s), s)
    theta = torch.empty(n, 2, 3, device=device)
    theta[:, 0, 0] = side * c * fx
    theta[:, 0, 1] = -side * s * fy
    theta[:, 1, 0] = side * s * fx
    theta[:, 1, 1] = side * c * fy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def corner_erase(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Fill one rectangle per selected sample, away from the central band, with ``erase_value``."""
    n, _, h, w = x.shape
    dev = x.device
    sel = _coin(n, cfg.erase_p, g, dev)
    area = _uniform(n, cfg.erase_area[0], cfg.erase_area[1], g, dev) * h * w
    ratio = torch.exp(_uniform(n, math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1]), g, dev))
    band_lo_y, band_hi_y = h // 2 - cfg.erase_band, h // 2 + cfg.erase_band
    band_lo_x, band_hi_x = w // 2 - cfg.erase_band, w // 2 + cfg.erase_band
    room_y = max(band_lo_y, h - band_hi_y)
    room_x = max(band_lo_x, w - band_hi_x)
    if room_y < 1 or room_x < 1:
        return x
    eh = torch.sqrt(area * ratio).round().clamp(1, room_y).long()
    ew = torch.sqrt(area / ratio).round().clamp(1, room_x).long()
    # choose the top/bottom and left/right corner region, then a position inside it
    top = _coin(n, 0.5, g, dev)
    left = _coin(n, 0.5, g, dev)
    ry = torch.rand(n, generator=g, device=dev)
    rx = torch.rand(n, generator=g, device=dev)
    y_top = (ry * (band_lo_y - eh + 1).clamp(min=1)).long()
    y_bot = band_hi_y + (ry * (h - band_hi_y - eh + 1).clamp(min=1)).long()
    x_lft = (rx * (band_lo_x - ew + 1).clamp(min=1)).long()
    x_rgt = band_hi_x + (rx * (w - band_hi_x - ew + 1).clamp(min=1)).long()
    y0 = torch.where(top, y_top, y_bot).clamp(0, h - 1)
    x0 = torch.where(left, x_lft, x_rgt).clamp(0, w - 1)
    yy = torch.arange(h, device=dev)[None, :, None]
    xx = torch.arange(w, device=dev)[None, None, :]
    mask = (
        (yy >= y0[:, None, None]) & (yy < (y0 + eh)[:, None, None])
        & (xx >= x0[:, None, None]) & (xx < (x0 + ew)[:, None, None])
        & sel[:, None, None]
    )
    return torch.where(mask[:, None], torch.as_tensor(cfg.erase_value, dtype=x.dtype, device=dev), x)


def jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness (multiplicative) then contrast (about the per-sample, per-channel mean)."""
    n = x.shape[0]
    dev = x.device
    on = _coin(n, cfg.jitter_p, g, dev)
    if cfg.brightness:
        b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, g, dev)
        b = torch.where(on, b, torch.ones_like(b))
        x = x * b[:, None, None, None]
    if cfg.contrast:
        c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, g, dev)
        c = torch.where(on, c, torch.ones_like(c))
        m = x.mean(dim=(2, 3), keepdim=True)
        x = (x - m) * c[:, None, None, None] + m
    return x


def add_noise(x: torch.Tensor, level: float, g: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``level`` times each sample's per-channel std."""
    sd = x.std(dim=(2, 3), keepdim=True)
    return x + torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * (level * sd)


def normalize(x: torch.Tensor, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` for ``(n, C, h, w)`` batches."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def augment(
    x: torch.Tensor,
    cfg: AugmentConfig,
    g: torch.Generator,
    mean: torch.Tensor | list[float] | None = None,
    std: torch.Tensor | list[float] | None = None,
) -> torch.Tensor:
    """Augment a batch ``(n, C, h, w)``: geometry (one grid_sample), jitter, noise, erasing, normalisation.

    Parameters
    ----------
    x : torch.Tensor
        Raw patches ``(n, C, h, w)`` float.
    cfg : AugmentConfig
    g : torch.Generator
        Generator on ``x.device`` (seeded per epoch for reproducible runs).
    mean, std : per-channel statistics, optional
        Applied last (the bank's training statistics).

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.
    """
    n, _, h, w = x.shape
    theta = affine_params(n, cfg, g, x.device)
    needs_interp = cfg.rotate_deg or cfg.crop_scale != (1.0, 1.0)
    if needs_interp or cfg.flip or cfg.rot90:
        grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
        mode = "bilinear" if needs_interp else "nearest"
        x = F.grid_sample(x, grid, mode=mode, padding_mode=cfg.padding, align_corners=False)
    if (cfg.brightness or cfg.contrast) and cfg.jitter_p > 0:
        x = jitter(x, cfg, g)
    if cfg.noise > 0:
        x = add_noise(x, cfg.noise, g)
    if cfg.erase_p > 0:
        x = corner_erase(x, cfg, g)
    if mean is not None and std is not None:
        x = normalize(x, mean, std)
    return x


def make_views(
    batch: torch.Tensor,
    g: torch.Generator,
    strong: AugmentConfig,
    weak: AugmentConfig,
    mean: torch.Tensor | list[float] | None = None,
    std: torch.Tensor | list[float] | None = None,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimSiam positive pair from a bank batch ``(n, S, C, h, w)``.

    View 1 is the original patch (shift 0) under the strong chain; view 2 is one randomly chosen
    neighbour-shifted copy (shift 1..S-1; the original itself if S == 1) under the weak chain.
    ``halves``: the bank holds the even- and odd-tilt sums and the tomogram slice (C = 3); each view
    gets the slice and *one* tilt half, the other view the other half (which one is random per
    sample), min-maxed, so the two views' tilt channels share no noise.
    """
    n, s = batch.shape[:2]
    dev = batch.device
    v1 = batch[:, 0]
    if s > 1:
        pick = torch.randint(1, s, (n,), generator=g, device=dev)
        v2 = batch[torch.arange(n, device=dev), pick]
    else:
        v2 = v1
    if halves:
        swap = _coin(n, 0.5, g, dev)[:, None, None, None]
        t1 = torch.where(swap, v1[:, 1:2], v1[:, 0:1])
        t2 = torch.where(swap, v2[:, 0:1], v2[:, 1:2])
        v1 = torch.cat([minmax_unit(t1), v1[:, 2:3]], dim=1)
        v2 = torch.cat([minmax_unit(t2), v2[:, 2:3]], dim=1)
    return augment(v1, strong, g, mean, std), augment(v2, weak, g, mean, std)
