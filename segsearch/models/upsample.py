"""Ways to undo the encoder's downsamplings: transposed conv, bilinear + conv, max-unpooling.

Each upsampler climbs the 2x max-pools between two encoder levels (`pools`: (level, pooled
width) per pool, deepest first; none where every level in between was dilated) and maps
`in_channels` to `out_channels`. `forward(x, indices)` gets the encoder's pooling indices per
level; only max-unpooling reads them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segsearch.models.blocks import conv3x3
from segsearch.registry import Registry

Indices = Sequence[torch.Tensor | None]
Pools = Sequence[tuple[int, int]]

# (in_channels, out_channels, *, pools) -> module with `out_channels`.
UPSAMPLERS: Registry[type[nn.Module]] = Registry("model.upsample")


def make_upsample(mode: str, in_channels: int, out_channels: int, *, pools: Pools) -> nn.Module:
    """The upsampler for `mode`, or a pass-through where there is no pool to undo."""
    if not pools:
        return Same(in_channels)
    return UPSAMPLERS.get(mode)(in_channels, out_channels, pools=pools)


class Same(nn.Module):
    """No downsampling to undo (the levels in between were dilated): keep the input as it is."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, x: torch.Tensor, indices: Indices) -> torch.Tensor:
        return x


@UPSAMPLERS.register("transpose")
class TransposeUp(nn.Module):
    """One transposed conv, kernel 2·factor, stride factor: every output pixel gets the same
    number of kernel taps (no checkerboard overlap). Starts as bilinear interpolation where the
    width is unchanged, as in Long et al."""

    def __init__(self, in_channels: int, out_channels: int, *, pools: Pools) -> None:
        super().__init__()
        factor = 2 ** len(pools)
        self.out_channels = out_channels
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, 2 * factor, stride=factor, padding=factor // 2
        )
        if in_channels == out_channels:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.bias.zero_()
                kernel = _bilinear_kernel(factor)
                for c in range(in_channels):
                    self.conv.weight[c, c] = kernel

    def forward(self, x: torch.Tensor, indices: Indices) -> torch.Tensor:
        return self.conv(x)


@UPSAMPLERS.register("bilinear")
class BilinearUp(nn.Module):
    """Bilinear resize, then a 3x3 conv to the output width."""

    def __init__(self, in_channels: int, out_channels: int, *, pools: Pools) -> None:
        super().__init__()
        self.factor = 2 ** len(pools)
        self.out_channels = out_channels
        self.conv = conv3x3(in_channels, out_channels, bias=True)

    def forward(self, x: torch.Tensor, indices: Indices) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return self.conv(x)


@UPSAMPLERS.register("unpool")
class UnpoolUp(nn.Module):
    """SegNet-style: per pool, a 1x1 conv to the pooled width (unpooling needs exactly that
    width) then max-unpooling with the encoder's indices; a 3x3 conv densifies the result."""

    def __init__(self, in_channels: int, out_channels: int, *, pools: Pools) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.levels = [level for level, _ in pools]
        widths = [in_channels, *(width for _, width in pools)]
        self.project = nn.ModuleList(
            nn.Conv2d(a, b, 1, bias=False) if a != b else nn.Identity()
            for a, b in itertools.pairwise(widths)
        )
        self.conv = conv3x3(widths[-1], out_channels, bias=True)

    def forward(self, x: torch.Tensor, indices: Indices) -> torch.Tensor:
        for project, level in zip(self.project, self.levels, strict=True):
            x = F.max_unpool2d(project(x), indices[level], 2)
        return self.conv(x)


def _bilinear_kernel(factor: int) -> torch.Tensor:
    """The 2·factor square kernel that makes a stride-`factor` transposed conv interpolate."""
    taps = 1 - (torch.arange(2 * factor) - (factor - 0.5)).abs() / factor
    return taps[:, None] * taps[None, :]
