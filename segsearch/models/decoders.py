"""Decoders: they size themselves from the encoder and return full-resolution features.

Each walks from the deepest level to level 0; between two levels it climbs the encoder's
downsamplings with the configured upsampler (nothing to climb where the levels were dilated).
"""

from __future__ import annotations

import torch
from torch import nn

from segsearch.models.blocks import DenseBlock
from segsearch.models.config import ModelConfig
from segsearch.models.encoder import Encoder
from segsearch.models.upsample import make_upsample

# fcn_skips -> how many finer levels are fused with the deepest prediction (Long et al.).
_FCN_FUSED = {"32s": 0, "16s": 1, "8s": 2}


def _upsample(
    cfg: ModelConfig, encoder: Encoder, deep: int, shallow: int, in_ch: int, out_ch: int
) -> nn.Module:
    """The configured upsampler from level `deep` to level `shallow`."""
    return make_upsample(cfg.upsample, in_ch, out_ch, pools=encoder.pools_between(deep, shallow))


class FCNDecoder(nn.Module):
    """Long et al.: 1x1 score maps of the deepest level and of up to two finer levels, each
    coarse map upsampled and summed with the next; then upsampled to full resolution.

    The names count from a depth-5 encoder (32s = deepest level alone, 16s and 8s fuse one or
    two finer levels); at other depths they keep that meaning. Scores live in out_channels[0]
    maps, the head makes them class scores (the sum of linear maps stays linear, as in FCN).
    """

    def __init__(self, encoder: Encoder, cfg: ModelConfig) -> None:
        super().__init__()
        depth = len(encoder.out_channels) - 1
        self.levels = [depth - i for i in range(_FCN_FUSED[cfg.fcn_skips] + 1)]
        width = encoder.out_channels[0]
        self.score = nn.ModuleList(
            nn.Conv2d(encoder.out_channels[level], width, 1) for level in self.levels
        )
        steps = list(zip(self.levels, [*self.levels[1:], 0], strict=True))
        self.ups = nn.ModuleList(
            _upsample(cfg, encoder, deep, shallow, width, width) for deep, shallow in steps
        )
        self.out_channels = width

    def forward(
        self, features: list[torch.Tensor], indices: list[torch.Tensor | None]
    ) -> torch.Tensor:
        x = self.score[0](features[self.levels[0]])
        for i, level in enumerate(self.levels[1:]):
            x = self.ups[i](x, indices) + self.score[i + 1](features[level])
        return self.ups[-1](x, indices)


class SkipDecoder(nn.Module):
    """Per level, deepest first: upsample, concatenate the encoder's features of that level,
    run a block. U-Net and FC-DenseNet differ only in the blocks and widths they plug in."""

    def __init__(
        self,
        ups: list[nn.Module],
        blocks: list[nn.Module],
        *,
        out_channels: int,
    ) -> None:
        super().__init__()
        self.ups = nn.ModuleList(ups)
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = out_channels

    def forward(
        self, features: list[torch.Tensor], indices: list[torch.Tensor | None]
    ) -> torch.Tensor:
        x = features[-1]
        skips = features[-2::-1]
        for up, block, skip in zip(self.ups, self.blocks, skips, strict=True):
            x = up(x, indices)
            x = block(torch.cat([x, skip], dim=1))
        return x


def unet_decoder(encoder: Encoder, cfg: ModelConfig, *, block: type[nn.Module]) -> SkipDecoder:
    """Ronneberger et al.: each level upsamples to that level's width, concatenates its skip and
    runs a block of the encoder's type (plain for U-Net, residual for the residual U-Net)."""
    widths = encoder.out_channels
    ups, blocks = [], []
    channels = widths[-1]
    for level in reversed(range(len(widths) - 1)):
        up = _upsample(cfg, encoder, level + 1, level, channels, widths[level])
        ups.append(up)
        blocks.append(
            block(
                up.out_channels + widths[level],
                widths[level],
                dilation=1,
                norm=cfg.norm,
                dropout=cfg.dropout,
            )
        )
        channels = widths[level]
    return SkipDecoder(ups, blocks, out_channels=channels)


def dense_decoder(encoder: Encoder, cfg: ModelConfig) -> SkipDecoder:
    """Jégou et al.: upsample only the previous block's new maps (at their own width),
    concatenate the skip, run a dense block; the last keeps its input so the head sees it all."""
    widths = encoder.out_channels
    ups, blocks = [], []
    channels = widths[-1]
    for level in reversed(range(len(widths) - 1)):
        up = _upsample(cfg, encoder, level + 1, level, channels, channels)
        block = DenseBlock(
            up.out_channels + widths[level],
            growth_rate=cfg.growth_rate,
            num_layers=cfg.layers_per_block,
            dilation=1,
            norm=cfg.norm,
            dropout=cfg.dropout,
            keep_input=level == 0,
        )
        ups.append(up)
        blocks.append(block)
        channels = block.out_channels
    return SkipDecoder(ups, blocks, out_channels=channels)
