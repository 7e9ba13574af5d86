"""The model section of a trial config, validated once where it enters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from segsearch.errors import UserError
from segsearch.models.upsample import UPSAMPLERS
from segsearch.registry import Registry

# arch -> builder(cfg, in_channels) -> (encoder, decoder); the families register in segmenter.py.
ARCHS: Registry[Callable[[ModelConfig, int], tuple[nn.Module, nn.Module]]] = Registry("model.arch")

FCN_SKIPS = ("32s", "16s", "8s")
OUTPUT_STRIDES = (4, 8, 16, 32)
NORMS = ("batch", "group")


@dataclass(frozen=True)
class ModelConfig:
    """Every model hyperparameter with its default; keys that an arch does not use are ignored.

    `output_stride` caps the stride of the deepest features: downsamplings beyond it become
    dilated convolutions. A cap at or above 2**depth changes nothing (documented no-op), so a
    search may sample depth and output_stride independently.
    """

    arch: str = "unet"
    depth: int = 4
    width: int = 32
    fcn_skips: str = "8s"
    growth_rate: int = 12
    layers_per_block: int = 4
    output_stride: int | None = None
    upsample: str = "transpose"
    norm: str = "batch"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        ARCHS.get(self.arch)
        _integer("depth", self.depth, 2, 5)
        _integer("width", self.width, 1, 1024)
        _choice("fcn_skips", self.fcn_skips, FCN_SKIPS)
        _integer("growth_rate", self.growth_rate, 1, 256)
        _integer("layers_per_block", self.layers_per_block, 1, 32)
        _choice("output_stride", self.output_stride, (None, *OUTPUT_STRIDES))
        UPSAMPLERS.get(self.upsample)
        _choice("norm", self.norm, NORMS)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise UserError(f"model.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Validate a `model:` dict; an unknown key is an error that lists the valid keys."""
        if isinstance(cfg, ModelConfig):
            return cfg
        if not isinstance(cfg, Mapping):
            raise UserError(f"model config must be a mapping, got {type(cfg).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in set(cfg) - set(known))
        if unknown:
            raise UserError(f"unknown model key(s) {unknown}; valid keys: {known}")
        return cls(**cfg)

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        """Dilation per level 0..depth: 1 where the level is reached by a 2x downsampling."""
        cap = self.output_stride or 2**self.depth
        return tuple(max(1, 2**level // cap) for level in range(self.depth + 1))


def _integer(key: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"model.{key} must be an integer from {low} to {high}, got {value!r}")


def _choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    # Same type as well as equal: 8.0 is not the stride 8, True is not 1.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise UserError(f"unknown model.{key} {value!r}; choose from {list(choices)}")
