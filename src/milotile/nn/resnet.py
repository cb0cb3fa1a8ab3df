"""Truncated ResNet-18 trunk for small single-channel patches (MiLoPYP's exploration backbone)."""

from __future__ import annotations

import torch
from torch import nn

from milotile.nn.registry import register

__all__ = ["BasicBlock", "ResNetTrunk", "resnet18_trunc"]


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out, momentum=bn_momentum),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class ResNetTrunk(nn.Module):
    """ResNet-18 without max-pool and layer4: stem 3×3/1 (64) → 64 → 128/2 → 256/2 → global pool.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for tomogram patches).
    widths : sequence of int
        Channels of the stem/layer1, layer2, layer3 (default ``(64, 128, 256)``).
    blocks : sequence of int
        BasicBlocks per layer (default ``(2, 2, 2)`` as in ResNet-18).
    bn_momentum : float
        BatchNorm momentum.
    pool : bool
        Global average pool to ``(N, out_dim)``; False returns the feature map.

    Attributes
    ----------
    out_dim : int
        Feature size after pooling (``widths[-1]``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: tuple[int, ...] | list[int] = (64, 128, 256),
        blocks: tuple[int, ...] | list[int] = (2, 2, 2),
        bn_momentum: float = 0.1,
        pool: bool = True,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        blocks = tuple(int(b) for b in blocks)
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} must have the same non-zero length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0], momentum=bn_momentum),
            nn.ReLU(inplace=True),
        )
        layers = []
        c_in = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            blk = [BasicBlock(c_in, w, stride, bn_momentum)]
            blk += [BasicBlock(w, w, 1, bn_momentum) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blk))
            c_in = w
        self.layers = nn.Sequential(*layers)
        self.pool = pool
        self.out_dim = widths[-1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions (fan-out, ReLU gain), BatchNorm weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's map ``(N, out_dim, h/4, w/4)`` (before pooling)."""
        return self.layers(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_map(x)
        if self.pool:
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return x


@register("resnet18-trunc")
def resnet18_trunc(
    in_channels: int = 1,
    widths: tuple[int, ...] | list[int] = (64, 128, 256),
    blocks: tuple[int, ...] | list[int] = (2, 2, 2),
    bn_momentum: float = 0.1,
    pool: bool = True,
) -> ResNetTrunk:
    """Truncated ResNet-18 trunk (see :class:`ResNetTrunk`)."""
    return ResNetTrunk(in_channels, widths, blocks, bn_momentum, pool)
