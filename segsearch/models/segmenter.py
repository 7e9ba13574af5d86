"""The one segmentation forward (pad, encode, decode, head, crop) and the families built on it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segsearch.errors import UserError
from segsearch.models.blocks import BLOCKS
from segsearch.models.config import ARCHS, ModelConfig
from segsearch.models.decoders import FCNDecoder, dense_decoder, unet_decoder
from segsearch.models.encoder import Encoder, conv_encoder, dense_encoder
from segsearch.validation import validate
from segsearch.values import is_integer


class Segmenter(nn.Module):
    """encoder -> decoder -> 1x1 head, for any input size.

    The input is zero-padded at the bottom and right to a multiple of the encoder's stride, so
    every pooling is exact and every skip lines up; the logits are cropped back to H x W by the
    same padding negated. torch.export traces that with `Dim.AUTO` height and width (a slice to
    the symbolic size does not: it adds a guard that fails when no padding was needed); the
    exported program takes any H, W above the stride (torch guards the deepest map against 1x1).
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.encoder.stride
        pad = (0, -x.shape[-1] % stride, 0, -x.shape[-2] % stride)
        features, indices = self.encoder(F.pad(x, pad))
        logits = self.head(self.decoder(features, indices))
        return F.pad(logits, [-p for p in pad])


def build_model(
    model_cfg: ModelConfig | Mapping[str, Any], *, in_channels: int, num_classes: int
) -> Segmenter:
    """A segmentation network from the `model:` config: (N, in_channels, H, W) -> logits
    (N, num_classes, H, W). Bad keys or values raise UserError naming the valid choices."""
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not is_integer(value) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    cfg = validate(ModelConfig, model_cfg, section="model")
    encoder, decoder = ARCHS.get(cfg.arch)(cfg, in_channels)
    return Segmenter(encoder, decoder, nn.Conv2d(decoder.out_channels, num_classes, 1))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (what a search reports as model size)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@ARCHS.register("fcn")
def _fcn(cfg: ModelConfig, in_channels: int) -> tuple[Encoder, nn.Module]:
    encoder = conv_encoder(cfg, in_channels, block=BLOCKS.get("plain"))
    return encoder, FCNDecoder(encoder, cfg)


@ARCHS.register("unet")
def _unet(cfg: ModelConfig, in_channels: int) -> tuple[Encoder, nn.Module]:
    encoder = conv_encoder(cfg, in_channels, block=BLOCKS.get("plain"))
    return encoder, unet_decoder(encoder, cfg, block=BLOCKS.get("plain"))


@ARCHS.register("resunet")
def _resunet(cfg: ModelConfig, in_channels: int) -> tuple[Encoder, nn.Module]:
    encoder = conv_encoder(cfg, in_channels, block=BLOCKS.get("residual"))
    return encoder, unet_decoder(encoder, cfg, block=BLOCKS.get("residual"))


@ARCHS.register("densenet")
def _densenet(cfg: ModelConfig, in_channels: int) -> tuple[Encoder, nn.Module]:
    encoder = dense_encoder(cfg, in_channels)
    return encoder, dense_decoder(encoder, cfg)
