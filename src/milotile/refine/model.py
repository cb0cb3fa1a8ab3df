"""2.5D picking networks: per-slice 2D U-Net (or small ResNet) + dilated 3D head.

Every architecture maps an input ``(B, D, H, W)`` (preprocessed, possibly z-compressed slices) to

* ``out["hm"]``: heatmap **logits** ``(B, n_classes, D, ceil(H/2), ceil(W/2))``
* ``out["feat"]``: features ``(B, feat_dim, D, ceil(H/2), ceil(W/2))``, L2-normalised over channels

The output stride in y and x is 2 (the stride-2 stem), in z it is 1. Each model exposes
``receptive_field()`` (z, y, x in model-input voxels, conservative) and ``xy_alignment`` (tiles whose
origins differ by a multiple of it give identical outputs away from their borders).

Registered names: ``unet4``, ``unet5`` (aliases ``unet_4``, ``unet_5``) and ``ressmall``
(alias ``ressmall_18``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from milotile.errors import InputError
from milotile.nn.device import channels_last
from milotile.nn.registry import register

__all__ = ["UNet2D", "TomoUNet", "TomoResSmall", "unet4", "unet5", "ressmall", "HM_PRIOR_BIAS"]

#: initial heatmap bias: sigmoid(-2.19) ~ 0.1, so early focal terms are bounded (CenterNet prior)
HM_PRIOR_BIAS = -2.19


#: Input voxels per batch of slices in :meth:`_Base2p5D.predict_volume` (at most 8 slices: 8 of 256²,
#: 2 of 1024²). Small batches and head windows keep activations in cache: on 2 CPU cores a 128×256×256
#: volume took 2.7 s with 8-slice batches and 8-slice head windows, 3.0 / 3.4 s with 16 / 32-slice
#: windows, 3.8 s with 16-slice batches, and 5.3 s as one whole forward pass.
TRUNK_BATCH_VOXELS = 2 * 1024 * 1024


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order on the CPU (:func:`milotile.nn.device.channels_last`).

    On this project's 2-core CPU the 2D trunk took 0.18 instead of 0.22 CPU s per 8 slices of 256² in fp32 and
    0.08 instead of 0.15 under bf16 autocast, a 3D head convolution 0.24 instead of 0.33 s (fp32) and 0.15
    instead of 0.29 s (bf16) per 32 slices of 128² (issue 26). Only activations change order: in-place model
    conversion would not apply to the 3D head's weights (and training shares the model with validation).
    """
    return channels_last(x, x.device)


def _conv_z_windows(conv: nn.Conv3d, x: torch.Tensor, window: int) -> torch.Tensor:
    """``conv(x)`` computed over z windows of ``window`` output slices, each reading its z context.

    Exact: the z padding of ``conv`` is applied as zeros at the volume's faces only.
    """
    pz = int(conv.padding[0])
    d = x.shape[2]
    out = []
    for s in range(0, d, max(int(window), 1)):
        e = min(d, s + int(window))
        a, b = s - pz, e + pz
        xa = x[:, :, max(a, 0) : min(b, d)]
        if a < 0 or b > d:
            xa = F.pad(xa, (0, 0, 0, 0, max(0, -a), max(0, b - d)))
        out.append(F.conv3d(xa, conv.weight, conv.bias, conv.stride, (0, *conv.padding[1:]), conv.dilation))
    return torch.cat(out, dim=2)


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class UNet2D(nn.Module):
    """Plain 2D U-Net: ``levels`` encoder levels with ``start_filts * 2**i`` channels.

    Encoder levels are two [3×3 conv → BN → ReLU] followed by a ceil-mode 2×2 max-pool (not after
    the last level). The decoder upsamples with a 2×2 stride-2 transposed conv → BN → ReLU,
    concatenates the skip connection and applies two [3×3 conv → BN → ReLU]. A final 1×1 conv
    maps to ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, levels: int = 4, start_filts: int = 32) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"U-Net needs at least 2 levels, got {levels}")
        self.levels = levels
        widths = [start_filts * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(nn.Sequential(*_conv_bn_relu(c, w), *_conv_bn_relu(w, w)))
            c = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(
                nn.Sequential(nn.ConvTranspose2d(c, w, 2, stride=2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            )
            self.dec.append(nn.Sequential(*_conv_bn_relu(2 * w, w), *_conv_bn_relu(w, w)))
            c = w
        self.out = nn.Conv2d(c, out_channels, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2, ceil_mode=True)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = up(x)
            # ceil-mode pooling makes the upsampled map at most one pixel larger: crop it
            x = x[..., : skip.shape[-2], : skip.shape[-1]]
            x = dec(torch.cat([x, skip], dim=1))
        return self.out(x)

    def receptive_field_xy(self, jump: int = 1) -> tuple[int, int]:
        """Conservative receptive field and final jump (pixel spacing) for an input spacing ``jump``."""
        r, j = 1, jump
        for i in range(self.levels):
            r += 2 * 2 * j
            if i < self.levels - 1:
                r += j
                j *= 2
        for _ in range(self.levels - 1):
            j //= 2
            r += j + 2 * 2 * j  # +j: a 2×2/2 transposed conv shifts the centre by up to one fine pixel
        return r, j


class _Head3D(nn.Module):
    """Dilated 3D feature head and the heatmap / feature heads shared by all architectures."""

    def __init__(self, c_in: int, feat_dim: int, n_classes: int, dilation: int = 4, head_k: int = 3,
                 z_dilation: int = 1) -> None:
        super().__init__()
        if int(z_dilation) < 1:
            raise InputError(f"z_dilation must be at least 1, got {z_dilation!r}.")
        zd = int(z_dilation)
        pad = (zd, dilation, dilation)
        self.body = nn.Sequential(
            nn.Conv3d(c_in, feat_dim, 3, padding=pad, dilation=(zd, dilation, dilation), bias=False),
            nn.ReLU(inplace=True),
            nn.Conv3d(feat_dim, feat_dim, 3, padding=pad, dilation=(zd, dilation, dilation), bias=False),
            nn.ReLU(inplace=True),
        )
        self.hm = nn.Conv3d(feat_dim, n_classes, (head_k, 1, 1), padding=(head_k // 2, 0, 0))
        self.proj = nn.Conv3d(feat_dim, feat_dim, (head_k, 1, 1), padding=(head_k // 2, 0, 0))
        self.dilation = dilation
        self.z_dilation = zd
        self.head_k = head_k
        for m in self.body.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(self.hm.weight, std=1e-3)
        nn.init.constant_(self.hm.bias, HM_PRIOR_BIAS)
        nn.init.normal_(self.proj.weight, std=1e-2)
        nn.init.normal_(self.proj.bias, std=1e-2)  # never an all-zero feature vector

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.body(x)
        hm = self.hm(x)
        feat = F.normalize(self.proj(x), dim=1, eps=1e-6)
        return {"hm": hm, "feat": feat}

    @property
    def z_context(self) -> int:
        """Slices of context the head needs on each side of an output slice."""
        return self.rf_add(1)[0] // 2

    def rf_add(self, jump_xy: int) -> tuple[int, int]:
        """Receptive-field growth (z, xy) of the head at xy spacing ``jump_xy``."""
        z = 2 * self.z_dilation + 2 * self.z_dilation + (self.head_k - 1)
        xy = 2 * (2 * self.dilation * jump_xy)
        return z, xy


class _Base2p5D(nn.Module):
    """Shared plumbing: (B, D, H, W) -> per-slice 2D trunk -> (B, C, D, H/2, W/2) -> 3D head."""

    stem: nn.Module
    trunk: nn.Module
    head: _Head3D
    xy_alignment: int = 2

    def _stem(self, stem_ch: int) -> nn.Sequential:
        stem = nn.Sequential(nn.Conv2d(1, stem_ch, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(stem[0].weight, nonlinearity="relu")
        return stem

    def slice_features(self, slices: torch.Tensor) -> torch.Tensor:
        """Per-slice 2D stem + trunk: ``(N, H, W)`` slices -> ``(N, C, ceil(H/2), ceil(W/2))``.

        Slices are independent here (the only z context is in the 3D head), so a volume's slice
        features can be computed once, in any grouping, and the head run over the whole stack.
        """
        n, h, w = slices.shape
        y = self.trunk(_channels_last(self.stem(slices.reshape(n, 1, h, w))))
        return y[..., : math.ceil(h / 2), : math.ceil(w / 2)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"expected input (B, D, H, W), got shape {tuple(x.shape)}")
        b, d, h, w = x.shape
        y = self.slice_features(x.reshape(b * d, h, w))
        c, h2, w2 = y.shape[1:]
        y = y.reshape(b, d, c, h2, w2).permute(0, 2, 1, 3, 4)
        return self.head(_channels_last(y) if y.device.type == "cpu" else y.contiguous())

    def predict_volume(self, x: torch.Tensor, slices_per_batch: int | None = None, head_slices: int = 8) -> torch.Tensor:
        """Heatmap logits ``(C, D, H/2, W/2)`` of one ``(D, H, W)`` volume, equal to ``forward(x[None])["hm"][0]``.

        The 2D trunk runs once per slice, ``slices_per_batch`` at a time (default: about
        :data:`TRUNK_BATCH_VOXELS` input voxels, 1-8 slices), bounding its activations. The 3D
        head then runs layer by layer over z windows of ``head_slices`` output slices, each layer reading
        only the z context it needs from the previous layer's full-depth output, so no slice of any
        layer is computed twice (windows of the whole head would recompute its z context: 1.6x the
        head's work for 16-slice windows with z dilation 2, 2.2x for 8-slice windows).
        """
        d, h, w = x.shape
        n = slices_per_batch or int(min(8, max(1, TRUNK_BATCH_VOXELS // max(h * w, 1))))
        feats = [self.slice_features(x[i : i + n]) for i in range(0, d, n)]
        y = _channels_last(torch.cat(feats).permute(1, 0, 2, 3).unsqueeze(0))  # (1, C, D, H2, W2)
        del feats
        for layer in self.head.body:
            y = _conv_z_windows(layer, y, head_slices) if isinstance(layer, nn.Conv3d) else layer(y)
        return _conv_z_windows(self.head.hm, y, head_slices)[0]

    def receptive_field(self) -> tuple[int, int, int]:
        """Conservative receptive field (z, y, x) of one output voxel, in model-input voxels."""
        r, j = 7, 2  # 7×7 stride-2 stem
        r_t, j = self._trunk_rf_from(r, j)
        z_add, xy_add = self.head.rf_add(j)
        return (1 + z_add, r_t + xy_add, r_t + xy_add)

    def _trunk_rf_from(self, r: int, j: int) -> tuple[int, int]:
        raise NotImplementedError


class TomoUNet(_Base2p5D):
    """MiLoPYP's 2.5D U-Net picker (``unet_4`` / ``unet_5``).

    Parameters
    ----------
    levels : int
        U-Net depth (4 or 5 in MiLoPYP).
    n_classes : int
        Heatmap channels (one per species).
    start_filts : int
        Channels of the first U-Net level (32 in MiLoPYP; smaller for tests).
    stem_ch : int
        Channels of the stride-2 stem (16).
    feat_dim : int
        Width of the 3D head and of the L2-normalised feature map (32).
    dilation : int
        In-plane dilation of the two 3D head convolutions (4).
    z_dilation : int
        Dilation of the head convolutions along z (1: seven slices of z context; 2: eleven).
    """

    def __init__(
        self,
        levels: int = 4,
        n_classes: int = 1,
        start_filts: int = 32,
        stem_ch: int = 16,
        feat_dim: int = 32,
        dilation: int = 4,
        z_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.stem = self._stem(stem_ch)
        self.trunk = UNet2D(stem_ch, feat_dim, levels=levels, start_filts=start_filts)
        self.head = _Head3D(feat_dim, feat_dim, n_classes, dilation=dilation, z_dilation=z_dilation)
        self.n_classes = n_classes
        self.xy_alignment = 2 * 2 ** (levels - 1)

    def _trunk_rf_from(self, r: int, j: int) -> tuple[int, int]:
        r_u, j_u = self.trunk.receptive_field_xy(jump=j)
        return r + r_u - 1, j_u


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        return F.relu(self.b2(self.c2(y)) + self.short(x), inplace=True)


class _ResTrunk(nn.Module):
    """Max-pool/2, two residual stages (the second /2) and two upsampling stages back to stride 1."""

    def __init__(self, c_in: int, widths: tuple[int, int], out_ch: int) -> None:
        super().__init__()
        w1, w2 = widths
        self.layer1 = nn.Sequential(_ResBlock(c_in, w1), _ResBlock(w1, w1))
        self.layer2 = nn.Sequential(_ResBlock(w1, w2, stride=2), _ResBlock(w2, w2))
        self.up1 = nn.Sequential(
            nn.Conv2d(w2, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w1, w1, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        )
        self.up2 = nn.Sequential(
            nn.Conv2d(w1, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(out_ch, out_ch, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer2(self.layer1(x))
        x = self.up2(self.up1(x))
        return x[..., :h, :w]


class TomoResSmall(_Base2p5D):
    """Small ResNet variant (MiLoPYP's ``ressmall_18``, which was broken there): total stride 8
    inside, two deconvolution stages back to output stride 2, then the same dilated 3D head.

    Parameters
    ----------
    n_classes : int
        Heatmap channels.
    widths : tuple of int
        Channels of the two residual stages (64, 128 in MiLoPYP).
    stem_ch, feat_dim, dilation, z_dilation
        As for :class:`TomoUNet`.
    """

    def __init__(
        self,
        n_classes: int = 1,
        widths: tuple[int, int] = (64, 128),
        stem_ch: int = 32,
        feat_dim: int = 32,
        dilation: int = 4,
        z_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.stem = self._stem(stem_ch)
        self.trunk = _ResTrunk(stem_ch, tuple(widths), feat_dim)
        self.head = _Head3D(feat_dim, feat_dim, n_classes, dilation=dilation, z_dilation=z_dilation)
        self.n_classes = n_classes
        self.xy_alignment = 8
        for m in self.trunk.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _trunk_rf_from(self, r: int, j: int) -> tuple[int, int]:
        r += 2 * j  # max-pool 3/2
        j *= 2
        r += 4 * 2 * j  # layer1: four 3×3
        r += 2 * j  # first conv of layer2 (stride 2)
        j *= 2
        r += 3 * 2 * j  # rest of layer2
        r += 2 * j  # up1 3×3 conv
        j //= 2
        r += 3 * j  # 4×4/2 transposed conv
        r += 2 * j  # up2 3×3
        j //= 2
        r += 3 * j
        r += 16  # asymmetric padding of the strided layers shifts the field by a few pixels
        return r, j


@register("unet4")
def unet4(**config) -> TomoUNet:
    """2.5D U-Net with 4 levels (see :class:`TomoUNet` for the keyword config)."""
    return TomoUNet(levels=4, **config)


@register("unet5")
def unet5(**config) -> TomoUNet:
    """2.5D U-Net with 5 levels (see :class:`TomoUNet` for the keyword config)."""
    return TomoUNet(levels=5, **config)


@register("ressmall")
def ressmall(**config) -> TomoResSmall:
    """2.5D small-ResNet picker (see :class:`TomoResSmall`)."""
    return TomoResSmall(**config)


register("unet_4")(unet4)
register("unet_5")(unet5)
register("ressmall_18")(ressmall)

#: canonical names of the picking architectures
ARCHS = ("unet4", "unet5", "ressmall")
