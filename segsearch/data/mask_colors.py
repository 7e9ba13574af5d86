"""Mask colours: `--colors` parsed to a palette, and mask files mapped through it to class ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsearch.data.images import read_mask_file
from segsearch.data.messages import and_more
from segsearch.errors import UserError


def parse_colors(colors: Sequence[str] | str, *, num_classes: int) -> Palette:
    """Parse "r,g,b;r,g,b;..." (RGB masks) or "v;v;..." (grey masks): one colour per class."""
    entries = colors.split(";") if isinstance(colors, str) else list(colors)
    parsed = []
    for entry in entries:
        try:
            values = tuple(int(v) for v in str(entry).split(","))
        except ValueError:
            raise UserError(f"--colors: {entry!r} is not 'r,g,b' or a grey value 'v'") from None
        if len(values) not in (1, 3) or not all(0 <= v <= 255 for v in values):
            raise UserError(f"--colors: {entry!r} must be 'r,g,b' or 'v' with values in 0..255")
        parsed.append(values)
    if len(parsed) != num_classes:
        raise UserError(f"--colors gives {len(parsed)} colours for {num_classes} classes")
    if len({len(v) for v in parsed}) != 1:
        raise UserError("--colors: use all RGB colours ('r,g,b') or all grey values ('v')")
    if len(set(parsed)) != len(parsed):
        raise UserError("--colors: each class needs its own colour")
    return Palette(colors=tuple(parsed))


@dataclass(frozen=True)
class Palette:
    """One colour per class: (r, g, b) each for RGB masks, (v,) each for grey masks."""

    colors: tuple[tuple[int, ...], ...]

    @property
    def rgb(self) -> bool:
        return len(self.colors[0]) == 3


class MaskMapper:
    """Mask file values → class ids: as they are, or through a colour or grey-value palette."""

    def __init__(self, palette: Palette | None, num_classes: int, ignore_index: int) -> None:
        self.palette, self.num_classes, self.ignore_index = palette, num_classes, ignore_index
        if palette is not None:
            keys = [_color_key(c) for c in palette.colors]
            self.lookup = dict(zip(keys, range(num_classes), strict=True))
            self.ignore_key = _color_key((ignore_index,) * len(palette.colors[0]))

    def __call__(self, path: Path) -> np.ndarray:
        rgb = self.palette is not None and self.palette.rgb
        values = read_mask_file(path, colors=rgb)
        if values.ndim == 3 and not rgb:
            if not (values == values[:, :, :1]).all():
                hint = "grey values" if self.palette else "class ids"
                raise UserError(
                    f"{path}: colour mask, but {hint} were expected; pass RGB --colors 'r,g,b;...'"
                )
            values = values[:, :, 0]
        if self.palette is None:
            return values
        if rgb and values.ndim != 3:
            raise UserError(f"{path}: grayscale mask, but --colors gives RGB colours")
        keys = _color_key(values) if rgb else values
        unique, inverse = np.unique(keys, return_inverse=True)
        ids = np.empty(len(unique), dtype=np.uint8)
        unknown = []
        for i, key in enumerate(unique.tolist()):
            if key in self.lookup:
                ids[i] = self.lookup[key]
            elif key == self.ignore_key:
                ids[i] = self.ignore_index
            else:
                unknown.append(key)
        if unknown:
            shown = [_color_text(k, rgb) for k in unknown[:3]]
            raise UserError(
                f"{path}: colour(s) {', '.join(shown)}{and_more(len(unknown), 3)} not in --colors "
                "(and not the ignore colour)"
            )
        return ids[inverse.reshape(values.shape[:2])]


def _color_key(color: np.ndarray | tuple[int, ...]) -> np.ndarray | int:
    if isinstance(color, tuple):
        return color[0] if len(color) == 1 else (color[0] << 16) | (color[1] << 8) | color[2]
    color = color.astype(np.uint32)
    return (color[:, :, 0] << 16) | (color[:, :, 1] << 8) | color[:, :, 2]


def _color_text(key: int, rgb: bool) -> str:
    return f"{key >> 16},{(key >> 8) & 255},{key & 255}" if rgb else str(key)
