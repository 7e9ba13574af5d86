"""Convolution blocks (plain, residual, dense) and the 2x downsampling between encoder levels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segsearch.registry import Registry


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with gcd(channels, 8) groups (any channel count divides)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.BatchNorm2d(channels)


def conv3x3(
    in_channels: int, out_channels: int, *, dilation: int = 1, bias: bool = False
) -> nn.Conv2d:
    """A 3x3 convolution that keeps the spatial size at any dilation."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)


def dropout_layer(p: float) -> nn.Module:
    """Spatial dropout (whole channels), or nothing when p is 0."""
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


# Blocks from in_channels to out_channels at one resolution: (in, out, *, dilation, norm, dropout).
BLOCKS: Registry[type[nn.Module]] = Registry("block")


@BLOCKS.register("plain")
class PlainBlock(nn.Sequential):
    """Two conv-norm-ReLU layers (U-Net, VGG), dropout between them."""

    def __init__(
        self, in_channels: int, out_channels: int, *, dilation: int, norm: str, dropout: float
    ) -> None:
        super().__init__(
            conv3x3(in_channels, out_channels, dilation=dilation),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            dropout_layer(dropout),
            conv3x3(out_channels, out_channels, dilation=dilation),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


@BLOCKS.register("residual")
class ResidualBlock(nn.Module):
    """ResNet basic block: two convs plus a shortcut (1x1 conv where the width changes)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, dilation: int, norm: str, dropout: float
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, dilation=dilation),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            dropout_layer(dropout),
            conv3x3(out_channels, out_channels, dilation=dilation),
            norm_layer(norm, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class DenseBlock(nn.Module):
    """FC-DenseNet dense block: each BN-ReLU-conv3x3-dropout layer adds `growth_rate` maps.

    Returns the input with all new maps (`keep_input`) or only the new maps: Jégou et al. pass
    only the new maps up the upsampling path so its width does not explode.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        growth_rate: int,
        num_layers: int,
        dilation: int,
        norm: str,
        dropout: float,
        keep_input: bool,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(
                norm_layer(norm, in_channels + i * growth_rate),
                nn.ReLU(inplace=True),
                conv3x3(in_channels + i * growth_rate, growth_rate, dilation=dilation),
                dropout_layer(dropout),
            )
            for i in range(num_layers)
        )
        self.keep_input = keep_input
        new = growth_rate * num_layers
        self.out_channels = in_channels + new if keep_input else new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x]
        for layer in self.layers:
            maps.append(layer(torch.cat(maps, dim=1)))
        return torch.cat(maps if self.keep_input else maps[1:], dim=1)


def transition_down(channels: int, *, norm: str, dropout: float) -> nn.Sequential:
    """FC-DenseNet transition down before its max-pool: BN-ReLU-1x1 conv-dropout."""
    return nn.Sequential(
        norm_layer(norm, channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1, bias=False),
        dropout_layer(dropout),
    )


class Downsample(nn.Module):
    """Optional layers, then a 2x2 max-pool (`pool=False` where the level is dilated instead).

    Returns (features, pooling indices); the indices are kept only for max-unpooling decoders.
    """

    def __init__(self, pre: nn.Module | None = None, *, pool: bool, return_indices: bool) -> None:
        super().__init__()
        self.pre = pre or nn.Identity()
        self.pool = pool
        self.return_indices = return_indices and pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.pre(x)
        if not self.pool:
            return x, None
        if self.return_indices:
            return F.max_pool2d(x, 2, return_indices=True)
        return F.max_pool2d(x, 2), None
