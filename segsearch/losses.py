"""Segmentation losses: cross-entropy (plain, class-weighted, border-weighted), soft Dice, sums.

Every kind is one `SegLoss` with different parameters: `ce_weight`·CE + `dice_weight`·Dice, where
the CE term may carry class weights and per-pixel weights (the U-Net border map), and the Dice term
is one functional whose denominator power selects Dice (Σp + Σg) or squared Dice (Σp² + Σg²).

Absent classes in Dice: a class enters the mean when it occurs in the target or is the argmax
prediction at some valid pixel. A class absent from both is left out (it would otherwise score
dice 1 for predicting nothing where there is nothing); a class predicted but absent from the target
enters with dice 0. On a hard prediction the loss is then exactly 1 − the mean Dice that
`segsearch.metrics.ConfusionMatrix` reports for the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, model_validator
from scipy import ndimage

from segsearch.errors import UserError
from segsearch.registry import Registry
from segsearch.validation import Section, number, validate

__all__ = [
    "LOSSES",
    "WEIGHTINGS",
    "LossConfig",
    "SegLoss",
    "border_weight_map",
    "border_weight_maps",
    "build_loss",
    "class_balance_weights",
    "cross_entropy",
    "dice_loss",
]

DEFAULT_EPS = 1e-6
# The border term is cut off where d1 + d2 > TRUNCATE·σ: there it is below w0·e^-18 ≈ w0·1.5e-8.
TRUNCATE = 6.0


Weighting = Literal["inverse", "log", "median"]
#: The class weightings of `class_balance_weights`.
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
#: ENet's constant c in w = 1 / ln(c + p): it bounds a weight by 1 / ln(1.02) ≈ 50.5.
ENET_C = 1.02


def class_balance_weights(
    counts: Sequence[int] | np.ndarray,
    *,
    method: str = "median",
    image_pixels: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-class weights from pixel counts, so rare classes are not drowned by frequent ones.

    `median`: median frequency balancing (Eigen & Fergus 2015), w_c = median_f / f_c with
    f_c = n_c / `image_pixels`[c], the pixels of class c over the pixels of the images where c
    occurs; the median is taken over the classes that occur. A class confined to few images is
    then not as rare as its dataset-wide share says, which is what sets it apart from `inverse`.
    `inverse`: w_c = N / (K·n_c) with K the classes that occur (frequency-weighted mean 1).
    `log`: ENet's w_c = 1 / ln(1.02 + p_c), p_c = n_c / N, bounded by about 50.5. A class with
    0 pixels gets the largest weight of the others: it cannot occur in targets the counts
    describe, and if it does it is treated as the rarest class, never as inf or NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(
            f"pixel counts must be a 1-D sequence of non-negative numbers, got {counts}"
        )
    present = counts > 0
    if not present.any():
        raise ValueError("pixel counts are all zero: no class to balance")
    if method == "median":
        freq = counts / _image_pixels(counts, image_pixels)
        weights = np.median(freq[present]) / np.where(present, freq, 1.0)
    elif method == "inverse":
        weights = counts.sum() / (present.sum() * np.where(present, counts, 1.0))
    elif method == "log":
        weights = 1.0 / np.log(ENET_C + counts / counts.sum())
    else:
        raise ValueError(f"unknown class weighting {method!r}; choose from {list(WEIGHTINGS)}")
    weights[~present] = weights[present].max()
    return weights.astype(np.float32)


def _image_pixels(
    counts: np.ndarray, image_pixels: Sequence[int] | np.ndarray | None
) -> np.ndarray:
    """Checked `image_pixels` for median frequency, 1 where a class has no pixels."""
    if image_pixels is None:
        raise ValueError(
            "median frequency needs image_pixels: the pixels of the images where each class occurs"
        )
    pixels = np.asarray(image_pixels, dtype=np.float64)
    if pixels.shape != counts.shape or (pixels < counts).any():
        raise ValueError(
            f"image_pixels must give each of the {len(counts)} classes at least its own pixels "
            f"{counts.astype(np.int64).tolist()}, got {pixels.tolist()}"
        )
    return np.where(counts > 0, pixels, 1.0)


def border_weight_map(
    mask: np.ndarray,
    *,
    foreground_classes: Sequence[int] | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """The U-Net weight map w = w_c + w0·exp(−(d1+d2)²/(2σ²)) of one (H, W) mask, float32.

    Objects are the connected components (4-connected) of each foreground class (default: every
    class but 0); d1, d2 are the distances to the nearest and second-nearest object. As in the
    U-Net paper's map, the border term lands on pixels outside every object, so narrow gaps
    between objects weigh most; it is 0 with fewer than two objects. w_c balances the classes of
    this mask (median frequency, see `class_balance_weights`) unless `class_weights` is given.
    Pixels at `ignore_index` get weight 0.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    valid = mask != ignore_index
    labels = mask[valid].astype(np.int64)
    if not labels.size:
        return np.zeros(mask.shape, dtype=np.float32)
    if class_weights is None:
        counts = np.bincount(labels)
        # One image: every class that occurs occurs in all of its labelled pixels.
        class_w = class_balance_weights(counts, image_pixels=np.full_like(counts, labels.size))
    else:
        class_w = np.asarray(class_weights, dtype=np.float32)
    if labels.max() >= len(class_w):
        raise ValueError(f"mask has class {labels.max()} but only {len(class_w)} class weights")
    if foreground_classes is None:
        foreground_classes = [int(c) for c in np.unique(labels) if c != 0]
    weights = np.zeros(mask.shape, dtype=np.float32)
    weights[valid] = class_w[labels]
    reach = TRUNCATE * sigma
    d1, d2 = _two_nearest_object_distances(mask, foreground_classes, reach=math.ceil(reach))
    gap = d1 + d2
    outside = valid & ~np.isin(mask, foreground_classes) & (gap <= reach)
    weights[outside] += w0 * np.exp(-(gap[outside] ** 2) / (2 * sigma**2))
    return weights


def _two_nearest_object_distances(
    mask: np.ndarray, classes: Sequence[int], *, reach: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object; exact wherever d1 + d2 <= reach.

    Each object's distance transform is taken only in its bounding box grown by `reach`: a pixel
    outside it is farther than `reach` from the object, so it cannot matter there. This makes the
    cost scale with object size, not with (objects × image).
    """
    nearest = np.full(mask.shape, np.inf, dtype=np.float32)
    second = np.full(mask.shape, np.inf, dtype=np.float32)
    for cls in classes:
        objects, _ = ndimage.label(mask == cls)
        for index, box in enumerate(ndimage.find_objects(objects), start=1):
            window = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in box)
            dist = ndimage.distance_transform_edt(objects[window] != index)
            near, next_ = nearest[window], second[window]
            np.minimum(next_, np.maximum(near, dist), out=next_)
            np.minimum(near, dist, out=near)
    return nearest, second


def border_weight_maps(
    target: torch.Tensor,
    *,
    foreground_classes: Sequence[int] | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """`border_weight_map` for each mask of an (N, H, W) batch, as float32 on the batch's device."""
    masks = target.detach().cpu().numpy()
    maps = [
        border_weight_map(
            m,
            foreground_classes=foreground_classes,
            w0=w0,
            sigma=sigma,
            class_weights=class_weights,
            ignore_index=ignore_index,
        )
        for m in masks
    ]
    return torch.from_numpy(np.stack(maps)).to(target.device)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-wise CE as a weighted mean Σ w·nll / Σ w over valid pixels (w = class × pixel weight).

    With only class weights this equals `F.cross_entropy(weight=...)`; a batch with no valid pixel
    gives 0 (with a graph) instead of NaN.
    """
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    weights = valid.to(nll.dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(nll)[target.where(valid, 0)]
    if pixel_weights is not None:
        weights = weights * pixel_weights.to(nll)
    return (weights * nll).sum() / weights.sum().clamp_min(1e-12)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    power: int = 1,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Soft Dice loss 1 − mean_c 2Σp·g / (Σp^power + Σg^power + ε) over the batch's pixels.

    `power=1` is Dice, `power=2` squared Dice (Milletari et al.). Probabilities are the softmax of
    `logits`; pixels at `ignore_index` count nowhere. Which classes enter the mean: see the module
    docstring.
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.softmax(1) * valid
    truth = _one_hot(target.where(valid.squeeze(1), 0), num_classes, probs) * valid
    predicted = _one_hot(logits.argmax(1), num_classes, probs) * valid
    dims = (0, 2, 3)
    intersection = (probs * truth).sum(dims)
    denominator = probs.pow(power).sum(dims) + truth.sum(dims)
    dice = 2 * intersection / (denominator + eps)
    counted = ((truth.sum(dims) > 0) | (predicted.sum(dims) > 0)).to(dice.dtype)
    return ((1 - dice) * counted).sum() / counted.sum().clamp_min(1)


def _one_hot(index: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(N, H, W) class ids → (N, C, H, W) one-hot with `like`'s dtype and device."""
    shape = (index.shape[0], num_classes, *index.shape[1:])
    return torch.zeros(shape, dtype=like.dtype, device=like.device).scatter_(
        1, index.unsqueeze(1), 1.0
    )


@dataclass(frozen=True, eq=False)
class SegLoss:
    """`(logits, target, weight_map=None) -> scalar`: ce_weight·CE + dice_weight·Dice.

    `weight_map` (N, H, W) multiplies the CE term per pixel. With `border` set, a missing map is
    computed from the target with `border_weight_maps(target, **border)`.
    """

    ce_weight: float = 1.0
    dice_weight: float = 0.0
    ignore_index: int = 255
    class_weights: torch.Tensor | None = None
    border: Mapping[str, Any] | None = None
    dice_power: int = 1
    eps: float = DEFAULT_EPS

    def __call__(
        self, logits: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"logits (N,C,H,W) {tuple(logits.shape)} vs target {target.shape}")
        if weight_map is not None and self.ce_weight == 0:
            raise ValueError("a weight map weighs cross-entropy pixels; this loss has no CE term")
        loss = logits.new_zeros(())
        if self.ce_weight:
            if weight_map is None and self.border is not None:
                weight_map = border_weight_maps(
                    target, ignore_index=self.ignore_index, **self.border
                )
            ce = cross_entropy(
                logits,
                target,
                ignore_index=self.ignore_index,
                class_weights=self.class_weights,
                pixel_weights=weight_map,
            )
            loss = loss + self.ce_weight * ce
        if self.dice_weight:
            dice = dice_loss(
                logits, target, ignore_index=self.ignore_index, power=self.dice_power, eps=self.eps
            )
            loss = loss + self.dice_weight * dice
        return loss


@dataclass(frozen=True)
class _Context:
    """What every loss builder may use besides its own options."""

    num_classes: int
    ignore_index: int
    class_pixel_counts: Sequence[int] | None
    class_image_pixels: Sequence[int] | None


class CELoss(Section):
    """Plain pixel-wise cross-entropy."""

    kind: Literal["ce"] = "ce"

    def build(self, ctx: _Context) -> SegLoss:
        return SegLoss(ignore_index=ctx.ignore_index)


class WeightedCELoss(Section):
    """Cross-entropy with class weights from the dataset's statistics (dataset.json)."""

    kind: Literal["weighted_ce"] = "weighted_ce"
    weighting: Weighting = "median"

    def build(self, ctx: _Context) -> SegLoss:
        counts = ctx.class_pixel_counts
        if counts is None:
            raise UserError(
                "loss kind weighted_ce needs class_pixel_counts (from dataset.json); "
                "use kind ce without them"
            )
        if len(counts) != ctx.num_classes or any(c < 0 for c in counts) or not any(counts):
            raise UserError(
                f"class_pixel_counts must be {ctx.num_classes} non-negative counts, not all 0; "
                f"got {list(counts)}"
            )
        if self.weighting == "median" and ctx.class_image_pixels is None:
            raise UserError(
                "loss weighting median needs class_image_pixels (the pixels of the train images "
                "where each class occurs), which datasets ingested before format segsearch/v3 "
                "lack: re-ingest the dataset, or use weighting inverse or log"
            )
        try:
            weights = class_balance_weights(
                counts, method=self.weighting, image_pixels=ctx.class_image_pixels
            )
        except ValueError as err:
            raise UserError(f"class_image_pixels: {err}") from None
        return SegLoss(ignore_index=ctx.ignore_index, class_weights=torch.from_numpy(weights))


class BorderCELoss(Section):
    """Cross-entropy weighted by the U-Net border map (`border_weight_map`)."""

    kind: Literal["border_ce"] = "border_ce"
    w0: float = number(10.0, ge=0)
    sigma: float = number(5.0, gt=0)
    foreground_classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="a list of class ids in [0, num_classes)"
    )

    def build(self, ctx: _Context) -> SegLoss:
        fg = self.foreground_classes
        if fg is not None and any(c >= ctx.num_classes for c in fg):
            raise UserError(
                f"loss.foreground_classes must be a list of class ids in [0, {ctx.num_classes}), "
                f"got {fg!r}"
            )
        border = {"w0": self.w0, "sigma": self.sigma, "foreground_classes": fg}
        return SegLoss(ignore_index=ctx.ignore_index, border=border)


class DiceLoss(Section):
    """Soft Dice (denominator Σp + Σg)."""

    kind: Literal["dice"] = "dice"
    eps: float = number(DEFAULT_EPS, gt=0)

    def build(self, ctx: _Context) -> SegLoss:
        return _weighted_sum(ctx, ce_weight=0.0, dice_weight=1.0, power=1, eps=self.eps)


class DiceSquaredLoss(Section):
    """Squared Dice (denominator Σp² + Σg², Milletari et al.)."""

    kind: Literal["dice_squared"] = "dice_squared"
    eps: float = number(DEFAULT_EPS, gt=0)

    def build(self, ctx: _Context) -> SegLoss:
        return _weighted_sum(ctx, ce_weight=0.0, dice_weight=1.0, power=2, eps=self.eps)


class CEDiceLoss(Section):
    """ce_weight·CE + dice_weight·Dice, the Dice term plain or squared."""

    kind: Literal["ce_dice"] = "ce_dice"
    ce_weight: float = number(1.0, ge=0)
    dice_weight: float = number(1.0, ge=0)
    dice: Literal["dice", "dice_squared"] = "dice"
    eps: float = number(DEFAULT_EPS, gt=0)

    @model_validator(mode="after")
    def _some_weight(self) -> CEDiceLoss:
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("loss.ce_weight and loss.dice_weight are both 0: nothing to train on")
        return self

    def build(self, ctx: _Context) -> SegLoss:
        power = DICE_POWERS[self.dice]
        return _weighted_sum(
            ctx, ce_weight=self.ce_weight, dice_weight=self.dice_weight, power=power, eps=self.eps
        )


DICE_POWERS = {"dice": 1, "dice_squared": 2}
LOSSES: Registry[type[Section]] = Registry("loss kind")
for _section in (CELoss, WeightedCELoss, BorderCELoss, DiceLoss, DiceSquaredLoss, CEDiceLoss):
    LOSSES.register(_section.model_fields["kind"].default)(_section)


def _kind_or_ce(value: Any) -> Any:
    """A mapping without `kind` is plain CE; an unknown kind fails with the registry's list."""
    if not isinstance(value, Mapping):
        return value
    value = {"kind": "ce", **value}
    try:
        LOSSES.get(value["kind"])
    except UserError as err:
        raise ValueError(str(err)) from None
    return value


LossConfig = Annotated[
    CELoss | WeightedCELoss | BorderCELoss | DiceLoss | DiceSquaredLoss | CEDiceLoss,
    Field(discriminator="kind"),
    BeforeValidator(_kind_or_ce),
]
"""The loss section: `kind` (default ce) and exactly that kind's options."""


def _weighted_sum(
    ctx: _Context, *, ce_weight: float, dice_weight: float, power: int, eps: float
) -> SegLoss:
    return SegLoss(
        ce_weight=ce_weight,
        dice_weight=dice_weight,
        ignore_index=ctx.ignore_index,
        dice_power=power,
        eps=eps,
    )


def build_loss(
    loss_cfg: LossConfig | Mapping[str, Any],
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_pixel_counts: Sequence[int] | None = None,
    class_image_pixels: Sequence[int] | None = None,
) -> SegLoss:
    """The trial's loss from its `loss` section: `kind` (default ce) plus that kind's options.

    ce: none. weighted_ce: weighting (median | inverse | log); needs `class_pixel_counts`, and
    for median `class_image_pixels` (both from dataset.json). border_ce: w0 (10), sigma (5),
    foreground_classes (all but 0). dice, dice_squared: eps (1e-6). ce_dice: ce_weight (1),
    dice_weight (1), dice (dice | dice_squared), eps. An unknown kind or option is a UserError
    listing the valid ones.
    """
    cfg = validate(LossConfig, loss_cfg, section="loss")
    return cfg.build(_Context(num_classes, ignore_index, class_pixel_counts, class_image_pixels))
