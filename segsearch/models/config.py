"""The model section of a trial config, validated once where it enters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from torch import nn

from segsearch.models.upsample import UPSAMPLERS
from segsearch.registry import Registry
from segsearch.validation import Exact, Section, integer, number, registered

# arch -> builder(cfg, in_channels) -> (encoder, decoder); the families register in segmenter.py.
ARCHS: Registry[Callable[[ModelConfig, int], tuple[nn.Module, nn.Module]]] = Registry("model.arch")


class ModelConfig(Section):
    """Every model hyperparameter with its default; keys that an arch does not use are ignored.

    `output_stride` caps the stride of the deepest features: downsamplings beyond it become
    dilated convolutions. A cap at or above 2**depth changes nothing (documented no-op), so a
    search may sample depth and output_stride independently.
    """

    arch: Annotated[str, registered(ARCHS)] = "unet"
    depth: int = integer(4, low=2, high=5)
    width: int = integer(32, low=1, high=1024)
    fcn_skips: Literal["32s", "16s", "8s"] = "8s"
    growth_rate: int = integer(12, low=1, high=256)
    layers_per_block: int = integer(4, low=1, high=32)
    output_stride: Annotated[Literal[None, 4, 8, 16, 32], Exact] = None
    upsample: Annotated[str, registered(UPSAMPLERS)] = "transpose"
    norm: Literal["batch", "group"] = "batch"
    dropout: float = number(0.0, ge=0, lt=1)

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        """Dilation per level 0..depth: 1 where the level is reached by a 2x downsampling."""
        cap = self.output_stride or 2**self.depth
        return tuple(max(1, 2**level // cap) for level in range(self.depth + 1))
