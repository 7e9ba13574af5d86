"""The encoder: levels of blocks separated by 2x downsamplings, the last ones possibly dilated.

Level 0 is at full resolution; level l is reached through l downsamplings. Where the config's
output_stride caps the stride, those downsamplings keep the resolution and the level's 3x3 convs
dilate instead (rates 2, 4, ...), like smp's `replace_strides_with_dilation`, for every family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segsearch.models.blocks import DenseBlock, Downsample, conv3x3, transition_down
from segsearch.models.config import ModelConfig


class Encoder(nn.Module):
    """Runs the levels; returns every level's features and the pooling indices per level."""

    def __init__(
        self,
        stages: Sequence[nn.Module],
        downs: Sequence[Downsample],
        *,
        out_channels: Sequence[int],
        dilation_rates: Sequence[int],
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.downs = nn.ModuleList(downs)
        self.out_channels = tuple(out_channels)
        self.dilation_rates = tuple(dilation_rates)
        self.downsampled = (False, *(down.pool for down in downs))
        self.stride = 2 ** sum(self.downsampled)

    def pools_between(self, deep: int, shallow: int) -> list[tuple[int, int]]:
        """(level, pooled width) of each 2x max-pool between two levels, deepest first.

        The pool into level l acts on level l-1's output (width out_channels[l-1]) in every
        family: plain and residual levels pool their output, dense ones transition at full width.
        """
        levels = range(deep, shallow, -1)
        return [(lv, self.out_channels[lv - 1]) for lv in levels if self.downsampled[lv]]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Features per level (0..depth) and pooling indices per level (None where not kept)."""
        x = self.stages[0](x)
        features, indices = [x], [None]
        for down, stage in zip(self.downs, self.stages[1:], strict=True):
            x, index = down(x)
            x = stage(x)
            features.append(x)
            indices.append(index)
        return features, indices


def conv_encoder(cfg: ModelConfig, in_channels: int, *, block: type[nn.Module]) -> Encoder:
    """Plain or residual levels, width doubling per level; max-pool between them."""
    rates = cfg.dilation_rates
    widths = [cfg.width * 2**level for level in range(cfg.depth + 1)]
    stages = [
        block(
            widths[level - 1] if level else in_channels,
            widths[level],
            dilation=rates[level],
            norm=cfg.norm,
            dropout=cfg.dropout,
        )
        for level in range(cfg.depth + 1)
    ]
    downs = [
        Downsample(pool=rates[level] == 1, return_indices=cfg.upsample == "unpool")
        for level in range(1, cfg.depth + 1)
    ]
    return Encoder(stages, downs, out_channels=widths, dilation_rates=rates)


def dense_encoder(cfg: ModelConfig, in_channels: int) -> Encoder:
    """FC-DenseNet down path: 3x3 conv stem, dense blocks with transitions down, then the
    bottleneck block, whose features the decoder gets without its input (new maps only)."""
    rates = cfg.dilation_rates
    width = cfg.width
    stages: list[nn.Module] = []
    downs: list[Downsample] = []
    widths: list[int] = []
    for level in range(cfg.depth + 1):
        if level:
            pre = transition_down(width, norm=cfg.norm, dropout=cfg.dropout)
            pool = rates[level] == 1
            downs.append(Downsample(pre, pool=pool, return_indices=cfg.upsample == "unpool"))
        block = DenseBlock(
            width,
            growth_rate=cfg.growth_rate,
            num_layers=cfg.layers_per_block,
            dilation=rates[level],
            norm=cfg.norm,
            dropout=cfg.dropout,
            keep_input=level < cfg.depth,
        )
        stages.append(nn.Sequential(conv3x3(in_channels, width), block) if level == 0 else block)
        width = block.out_channels
        widths.append(width)
    return Encoder(stages, downs, out_channels=widths, dilation_rates=rates)
