"""Batch augmentation on the training device: image and mask warped by one shared sampling grid.

All geometry (flips, translation jitter, scale + crop, elastic deformation, a random window) is
folded into a single sampling grid per sample, so the image is resampled once (bilinear, zeros
outside the frame) and the mask once with the very same grid (nearest; `ignore_index` wherever the
grid leaves the frame). The window (`crop`) sets the grid's size: a trial can train on small
windows of images kept at a large `image_size`, each step costing what the window's pixels cost,
while validation and prediction see whole images. The
random parameters come from an optional `torch.Generator`, so the same seed gives the same batch.
Colour jitter (contrast, then brightness) touches the image only. Images are float in 0..1, as
`segsearch.search.train` feeds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from segsearch.errors import UserError
from segsearch.validation import Section, SizeText, integer, number, validate

#: The smallest window side, as the smallest image side a trial takes (config.MIN_IMAGE_SIDE).
MIN_CROP_SIDE = 8
CropSide = Annotated[int, Field(ge=MIN_CROP_SIDE)]

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights of R, G, B in an image's grey level (contrast blends towards its mean)."""


class Elastic(Section):
    """Smooth random displacements: N(0, sigma px) on a grid × grid lattice, bicubic between.

    The defaults are the U-Net paper's (Ronneberger et al. 2015): a coarse 3×3 grid, 10 px std.
    """

    sigma: float = number(10.0, ge=0, rule="a displacement std in px >= 0")
    grid: int = integer(3, low=2, rule="an integer >= 2 (control points)")


class AugConfig(Section):
    """The aug section of a trial config; every augmentation is off by default."""

    flip: bool = Field(False, description="true or false")
    jitter_px: int = integer(0, low=0, rule="an integer number of pixels >= 0")
    scale: float = number(0.0, ge=0, lt=1, rule="a number s in [0, 1) (zoom drawn from [1-s, 1+s])")
    elastic: Elastic | None = Field(
        None, description=f"true, false or a mapping with keys {sorted(Elastic.model_fields)}"
    )
    color: float = number(0.0, ge=0, le=1, rule="a jitter strength in [0, 1]")
    # strict=False: JSON and YAML give a list; the sides themselves must still be ints.
    crop: Annotated[tuple[CropSide, CropSide] | None, SizeText] = Field(
        None,
        strict=False,
        description=f'[height, width] or "HEIGHTxWIDTH", each an integer >= {MIN_CROP_SIDE}',
    )

    @field_validator("elastic", mode="before")
    @classmethod
    def _elastic_switch(cls, value: Any) -> Any:
        """`elastic: true` is the paper's deformation, `false` none."""
        if isinstance(value, bool):
            return {} if value else None
        return value


@dataclass(frozen=True)
class Augment:
    """Augments one batch; built by `build_augment` from the trial's `aug` mapping."""

    flip: bool = False
    jitter_px: int = 0
    scale: float = 0.0
    elastic: Elastic | None = None
    color: float = 0.0
    crop: tuple[int, int] | None = None
    ignore_index: int = 255

    @property
    def is_identity(self) -> bool:
        return not (self.has_geometry or self.color)

    @property
    def has_geometry(self) -> bool:
        return bool(self.flip or self.jitter_px or self.scale or self.elastic or self.crop)

    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (image float N,C,H,W in 0..1, mask long N,H,W); inputs are not modified. With
        `crop`, the outputs are crop-sized windows (a UserError if the crop does not fit)."""
        if image.dim() != 4 or mask.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(
                f"expected image (N,C,H,W) and mask (N,H,W), got {tuple(image.shape)} and "
                f"{tuple(mask.shape)}"
            )
        if self.is_identity:
            return image, mask
        if self.crop and (self.crop[0] > image.shape[2] or self.crop[1] > image.shape[3]):
            raise UserError(
                f"aug.crop {list(self.crop)} does not fit in a {image.shape[2]}x{image.shape[3]} "
                "image; choose a crop no larger than the trial's image_size"
            )
        draw = _Draw(generator, image.device)
        if self.has_geometry:
            grid = self._grid(draw, image.shape[0], *image.shape[2:])
            image, mask = _resample(image, mask, grid, self.ignore_index)
        if self.color:
            image = self._color(draw, image)
        return image, mask

    def _grid(self, draw: _Draw, n: int, height: int, width: int) -> torch.Tensor:
        """Sampling grid (N,h,w,2) in grid_sample's normalized coordinates (align_corners=False),
        h×w the crop's size (else the image's)."""
        px = torch.tensor([2.0 / width, 2.0 / height], device=draw.device)  # one pixel, normalized
        xs = _pixel_centres(width, draw.device).expand(n, width)
        ys = _pixel_centres(height, draw.device).expand(n, height)
        if self.crop:
            ys = _window(draw, ys, self.crop[0])
            xs = _window(draw, xs, self.crop[1])
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
        out_h, out_w = ys.shape[1], xs.shape[1]
        xs = xs[:, None, :] * linear[:, 0, None, None]
        ys = ys[:, :, None] * linear[:, 1, None, None]
        grid = torch.stack(
            [
                (xs + shift[:, 0, None, None]).expand(n, out_h, out_w),
                (ys + shift[:, 1, None, None]).expand(n, out_h, out_w),
            ],
            dim=-1,
        )
        if self.elastic:
            coarse = self.elastic.sigma * draw.randn((n, 2, self.elastic.grid, self.elastic.grid))
            field = F.interpolate(coarse, size=(out_h, out_w), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1) * px
        return grid

    def _color(self, draw: _Draw, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        contrast = 1 + self.color * (2 * draw.rand((n,)) - 1)
        brightness = self.color * (2 * draw.rand((n,)) - 1)
        return _adjust_brightness(_adjust_contrast(image, contrast), brightness)


def build_augment(aug_cfg: AugConfig | Mapping[str, Any], *, ignore_index: int = 255) -> Augment:
    """Validated here when given a mapping, so a bad value fails before any trial runs."""
    cfg = validate(AugConfig, aug_cfg, section="aug")
    elastic = cfg.elastic if cfg.elastic is not None and cfg.elastic.sigma else None
    return Augment(
        flip=cfg.flip,
        jitter_px=cfg.jitter_px,
        scale=cfg.scale,
        elastic=elastic,
        color=cfg.color,
        crop=cfg.crop,
        ignore_index=ignore_index,
    )


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


def _adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image (N,C,H,W) with its mean grey level by `factor` (N,): 1 keeps it, 0 is flat.

    The grey level of an RGB image is its BT.601 luma, of any other its mean over channels.
    """
    factor = factor.to(image.device, image.dtype).view(-1, 1, 1, 1)
    if image.shape[1] == 3:
        weights = torch.tensor(LUMA, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        mean = (image * weights).sum(1, keepdim=True).mean((-2, -1), keepdim=True)
    else:
        mean = image.mean((1, 2, 3), keepdim=True)
    return (image * factor + mean * (1 - factor)).clamp(0, 1)


def _adjust_brightness(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Add `shift` (N,) to every pixel of each image, kept in 0..1."""
    return (image + shift.to(image.device, image.dtype).view(-1, 1, 1, 1)).clamp(0, 1)


def _pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """Normalized coordinates of pixel centres, as grid_sample reads them (align_corners=False)."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def _window(draw: _Draw, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Each sample's `size` consecutive pixel centres (N,size) of `centres` (N,L), starting at a
    random pixel: a window of the image, as the flips and zoom then see it."""
    n, length = centres.shape
    start = draw.randint(length - size + 1, (n,)).long()
    index = start[:, None] + torch.arange(size, device=centres.device)
    return centres.gather(1, index)


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
