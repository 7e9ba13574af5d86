"""The configuration one trial trains with, validated once where it enters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from segsearch.errors import UserError


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (per step, after a linear warmup)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, ("adamw", "sgd"))
        _one_of("optim.schedule", self.schedule, ("constant", "cosine", "poly"))
        _positive("optim.lr", self.lr)
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise UserError("optim.weight_decay and optim.warmup_epochs must be >= 0")


@dataclass(frozen=True)
class TrialConfig:
    """Everything a trial needs besides the data: the sections are handed to their builders."""

    model: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    image_size: tuple[int, int] | None = None
    epochs: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.image_size is not None and (
            len(self.image_size) != 2 or any(int(s) < 8 for s in self.image_size)
        ):
            raise UserError(f"image_size must be [height, width], each >= 8, got {self.image_size}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TrialConfig:
        """Build from the nested trial dict; unknown keys are errors that list the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"unknown trial config key(s) {unknown}; valid: {sorted(known)}")
        optim = dict(cfg.get("optim") or {})
        optim_known = {f.name for f in fields(OptimConfig)}
        bad = sorted(set(optim) - optim_known)
        if bad:
            raise UserError(f"unknown optim key(s) {bad}; valid: {sorted(optim_known)}")
        size = cfg.get("image_size")
        return cls(
            model=dict(cfg.get("model") or {}),
            loss=dict(cfg.get("loss") or {}),
            optim=OptimConfig(**optim),
            aug=dict(cfg.get("aug") or {}),
            batch_size=cfg.get("batch_size", 8),
            image_size=None if size is None else (int(size[0]), int(size[1])),
            epochs=int(cfg.get("epochs", 10)),
            seed=int(cfg.get("seed", 0)),
        )


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose from {list(choices)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} must be > 0, got {value!r}")
