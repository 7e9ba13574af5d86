"""The configuration one trial trains with, validated once where it enters.

Each section is a pydantic model (`segsearch.validation.Section`): frozen, unknown keys refused,
a bool never taken for a number; errors are one line naming the key and the rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from segsearch.data.augment import AugConfig
from segsearch.losses import CELoss, LossConfig
from segsearch.models import ModelConfig
from segsearch.validation import Section, SizeText, integer, number, validate

#: Smallest side an image is trained at (each of height and width).
MIN_IMAGE_SIDE = 8


class OptimConfig(Section):
    """Optimizer and learning-rate schedule (per step, after a linear warmup)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = number(1e-3, gt=0)
    weight_decay: float = number(1e-4, ge=0)
    momentum: float = number(0.9, ge=0)
    schedule: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_epochs: float = number(0.0, ge=0)


ImageSide = Annotated[int, Field(ge=MIN_IMAGE_SIDE)]


class TrialConfig(Section):
    """Everything a trial needs besides the data: the typed sections go to their builders."""

    model: ModelConfig = ModelConfig()
    loss: LossConfig = CELoss()
    optim: OptimConfig = OptimConfig()
    aug: AugConfig = AugConfig()
    batch_size: int = integer(8, low=1)
    # strict=False: JSON and YAML give a list; the sides themselves must still be ints.
    image_size: Annotated[tuple[ImageSide, ImageSide] | None, SizeText] = Field(
        None,
        strict=False,
        description=f'[height, width] or "HEIGHTxWIDTH", each an integer >= {MIN_IMAGE_SIDE}',
    )
    epochs: int = integer(10, low=1)
    seed: int = integer(0, low=0)

    @field_validator("model", "loss", "optim", "aug", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        """A section left empty in YAML (`aug:`) means its defaults."""
        return {} if value is None else value

    @model_validator(mode="after")
    def _crop_fits(self) -> TrialConfig:
        """A training window larger than the images it is cut from cannot be drawn."""
        crop, size = self.aug.crop, self.image_size
        if crop and size and (crop[0] > size[0] or crop[1] > size[1]):
            raise ValueError(
                f"aug.crop {list(crop)} does not fit in image_size {list(size)}; "
                "choose a smaller crop or a larger image_size"
            )
        return self

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TrialConfig:
        """Build from the nested trial dict; any error is one line naming the key and the rule."""
        return validate(cls, cfg, section="trial config", prefix="")

    def to_dict(self) -> dict[str, Any]:
        """Every value, defaults included, as JSON types: what trial.json and MLflow record."""
        return self.model_dump(mode="json")


def check_image_size(value: Sequence[int] | str | None) -> tuple[int, int] | None:
    """An image size as [height, width] (or "HEIGHTxWIDTH") under the one rule every caller
    shares (a trial's `image_size`, a data stream's resize); None means each image's own size."""
    return TrialConfig.from_dict({"image_size": value}).image_size
