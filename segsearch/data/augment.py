"""Batch augmentation on the training device: image and mask warped by one shared sampling grid.

All geometry (flips, translation jitter, scale + crop, elastic deformation) is folded into a single
sampling grid per sample, so the image is resampled once (bilinear, zeros outside the frame) and the
mask once with the very same grid (nearest; `ignore_index` wherever the grid leaves the frame). The
random parameters come from an optional `torch.Generator`, which kornia's augmentation modules do
not accept, so the same seed gives the same batch. Colour jitter (kornia.enhance) touches the image
only. Images are float in 0..1, as `segsearch.train` feeds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kornia.enhance
import torch
import torch.nn.functional as F

from segsearch.errors import UserError
from segsearch.registry import Registry

#: U-Net paper (Ronneberger et al. 2015): displacements on a coarse 3×3 grid, 10 px std, bicubic.
ELASTIC_DEFAULTS = {"sigma": 10.0, "grid": 3}

_KEYS: Registry[Callable[[Any], Any]] = Registry("aug key")


@dataclass(frozen=True)
class Elastic:
    """Smooth random displacements: N(0, sigma px) on a grid × grid lattice, bicubic between."""

    sigma: float
    grid: int


@dataclass(frozen=True)
class Augment:
    """Augments one batch; built by `build_augment` from the trial's `aug` mapping."""

    flip: bool = False
    jitter_px: int = 0
    scale: float = 0.0
    elastic: Elastic | None = None
    color: float = 0.0
    ignore_index: int = 255

    @property
    def is_identity(self) -> bool:
        return not (self.has_geometry or self.color)

    @property
    def has_geometry(self) -> bool:
        return bool(self.flip or self.jitter_px or self.scale or self.elastic)

    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (image float N,C,H,W in 0..1, mask long N,H,W); inputs are not modified."""
        if image.dim() != 4 or mask.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(
                f"expected image (N,C,H,W) and mask (N,H,W), got {tuple(image.shape)} and "
                f"{tuple(mask.shape)}"
            )
        if self.is_identity:
            return image, mask
        draw = _Draw(generator, image.device)
        if self.has_geometry:
            grid = self._grid(draw, image.shape[0], *image.shape[2:])
            image, mask = _resample(image, mask, grid, self.ignore_index)
        if self.color:
            image = self._color(draw, image)
        return image, mask

    def _grid(self, draw: _Draw, n: int, height: int, width: int) -> torch.Tensor:
        """Sampling grid (N,H,W,2) in grid_sample's normalized coordinates (align_corners=False)."""
        px = torch.tensor([2.0 / width, 2.0 / height], device=draw.device)  # one pixel, normalized
        linear = torch.ones(n, 2, device=draw.device)
        shift = torch.zeros(n, 2, device=draw.device)
        if self.flip:
            linear = linear * (1 - 2 * draw.randint(2, (n, 2)))
        if self.scale:
            zoom = 1 + self.scale * (2 * draw.rand((n, 1)) - 1)
            linear = linear / zoom
            # Where the zoomed frame may sit: the crop stays inside a larger image, and a smaller
            # image stays inside the frame.
            room = (zoom - 1).abs() / zoom
            shift = shift + room * (2 * draw.rand((n, 2)) - 1)
        if self.jitter_px:
            shift = shift + px * draw.randint(2 * self.jitter_px + 1, (n, 2)) - px * self.jitter_px
        # No rotation, so the affine grid is separable: x depends on the column, y on the row.
        xs = _pixel_centres(width, draw.device)[None, None, :] * linear[:, 0, None, None]
        ys = _pixel_centres(height, draw.device)[None, :, None] * linear[:, 1, None, None]
        grid = torch.stack(
            [
                (xs + shift[:, 0, None, None]).expand(n, height, width),
                (ys + shift[:, 1, None, None]).expand(n, height, width),
            ],
            dim=-1,
        )
        if self.elastic:
            coarse = self.elastic.sigma * draw.randn((n, 2, self.elastic.grid, self.elastic.grid))
            field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1) * px
        return grid

    def _color(self, draw: _Draw, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        contrast = 1 + self.color * (2 * draw.rand((n,)) - 1)
        brightness = self.color * (2 * draw.rand((n,)) - 1)
        image = kornia.enhance.adjust_contrast_with_mean_subtraction(
            image, contrast.to(image.device, image.dtype)
        )
        return kornia.enhance.adjust_brightness(image, brightness.to(image.device, image.dtype))


def build_augment(aug_cfg: Mapping[str, Any], *, ignore_index: int = 255) -> Augment:
    """Validate the trial's `aug` mapping here, so a bad value fails before any trial runs."""
    if not isinstance(aug_cfg, Mapping):
        raise UserError(f"aug must be a mapping of {_KEYS.names()}, got {aug_cfg!r}")
    options = {}
    for key, value in aug_cfg.items():
        options[key] = _KEYS.get(key)(value)
    return Augment(**options, ignore_index=ignore_index)


@_KEYS.register("flip")
def _flip(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"aug.flip must be true or false, got {value!r}")
    return value


@_KEYS.register("jitter_px")
def _jitter_px(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"aug.jitter_px must be an integer number of pixels >= 0, got {value!r}")
    return value


@_KEYS.register("scale")
def _scale(value: Any) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise UserError(
            f"aug.scale must be a number s in [0, 1) (zoom drawn from [1-s, 1+s]), got {value!r}"
        )
    return float(value)


@_KEYS.register("elastic")
def _elastic(value: Any) -> Elastic | None:
    if isinstance(value, bool):
        return Elastic(**ELASTIC_DEFAULTS) if value else None
    if not isinstance(value, Mapping) or set(value) - set(ELASTIC_DEFAULTS):
        raise UserError(
            f"aug.elastic must be true, false or a mapping with keys {sorted(ELASTIC_DEFAULTS)}, "
            f"got {value!r}"
        )
    merged = {**ELASTIC_DEFAULTS, **value}
    sigma, grid = merged["sigma"], merged["grid"]
    if not _is_number(sigma) or sigma < 0:
        raise UserError(f"aug.elastic.sigma must be a displacement std in px >= 0, got {sigma!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise UserError(f"aug.elastic.grid must be an integer >= 2 (control points), got {grid!r}")
    return Elastic(sigma=float(sigma), grid=grid) if sigma else None


@_KEYS.register("color")
def _color(value: Any) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise UserError(f"aug.color must be a jitter strength in [0, 1], got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Draw:
    """Random numbers from `generator` (on its own device), moved to the batch's device."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator = generator
        self.device = device
        self._source = generator.device if generator is not None else device

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self._source).to(self.device)

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self._source).to(self.device)

    def randint(self, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        values = torch.randint(high, shape, generator=self.generator, device=self._source)
        return values.to(self.device, torch.float32)


def _pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """Normalized coordinates of pixel centres, as grid_sample reads them (align_corners=False)."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def _resample(
    image: torch.Tensor, mask: torch.Tensor, grid: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp image (bilinear) and mask (nearest) with one grid; off-frame mask → ignore_index."""
    warped = F.grid_sample(
        image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    # Shift ids by one so the zeros grid_sample puts outside the frame mark "no label".
    shifted = (mask + 1).unsqueeze(1).to(torch.float32)
    labels = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    labels = labels.squeeze(1).round().long() - 1
    return warped, labels.masked_fill_(labels < 0, ignore_index)
