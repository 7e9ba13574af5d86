"""A small synthetic segmentation dataset that still separates good models from weak ones.

Each image holds discs, boxes and thin lines (the classes) among irregular blobs that count as
background, painted in random order so later shapes occlude earlier ones. Every shape draws its
colour from one distribution, set off from what lies underneath, so a pixel's colour does not give
its class away; textures (flat, shaded, striped) only lean towards a class. The outline decides,
which takes context. Lines are one to three pixels wide and rare, where class- and border-weighted
losses pay off. Sizes scale with the image (lengths below are for 96×96).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator

import numpy as np

from segsearch.data.format import DatasetInfo
from segsearch.data.ingest import Sample, write_dataset
from segsearch.errors import UserError
from segsearch.values import is_integer

DEMO_CLASSES = ("background", "disc", "box", "line")
BACKGROUND, DISC, BOX, LINE = range(len(DEMO_CLASSES))
MIN_SIDE = 16
FLAT, SHADED, STRIPED = range(3)
PREFERRED_TEXTURE = {BACKGROUND: FLAT, DISC: SHADED, BOX: STRIPED, LINE: FLAT}
TEXTURE_BIAS = 0.6  # chance a shape takes its class's texture, else any of the three


def make_demo_dataset(
    dest: str,
    *,
    n_train: int = 96,
    n_val: int = 32,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    overwrite: bool = False,
) -> DatasetInfo:
    """Write the demo dataset to `dest` (local folder or s3://) in the regular dataset format."""
    samples = itertools.chain(
        generate_demo_samples(n=n_train, size=size, seed=seed, split="train"),
        generate_demo_samples(n=n_val, size=size, seed=seed, split="val"),
    )
    return write_dataset(dest, samples, classes=DEMO_CLASSES, overwrite=overwrite)


def generate_demo_samples(
    *, n: int, size: tuple[int, int], seed: int, split: str
) -> Iterator[Sample]:
    """`n` samples of `split`, (split, id, image H×W×3 uint8, mask H×W uint8); the same
    (seed, split, index) always renders the same sample. Arguments are checked on the call."""
    if not is_integer(n) or n < 1:
        raise UserError(f"demo dataset: the number of {split} images must be >= 1, got {n!r}")
    if not is_integer(seed) or seed < 0:
        raise UserError(f"demo dataset: seed must be an integer >= 0, got {seed!r}")
    canvas = _Canvas(*_check_size(size))
    return _render_all(canvas, n=n, seed=seed, split=split)


def _render_all(canvas: _Canvas, *, n: int, seed: int, split: str) -> Iterator[Sample]:
    split_key = zlib.crc32(split.encode())
    for index in range(n):
        image, mask = canvas.render(np.random.default_rng([seed, split_key, index]))
        yield split, f"{split}-{index:05d}", image, mask


class _Canvas:
    """Pixel coordinates of one image size, reused by every sample rendered at that size."""

    def __init__(self, height: int, width: int) -> None:
        self.shape = (height, width)
        self.ys, self.xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.unit = min(height, width) / 96

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image = self._background(rng)
        mask = np.full(self.shape, BACKGROUND, dtype=np.uint8)
        shapes = (
            [BACKGROUND] * rng.integers(1, 4)
            + [DISC] * rng.integers(2, 5)
            + [BOX] * rng.integers(2, 5)
            + [LINE] * rng.integers(0, 4)
        )
        for label in rng.permutation(shapes):
            inside = self._outline(rng, label)
            if inside.any():
                image[inside] = self._paint(rng, label, inside, image)[inside]
                mask[inside] = label
        image += rng.normal(0, rng.uniform(0.02, 0.06), image.shape).astype(np.float32)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A colour with slow waves across it: low-frequency structure that is not an object."""
        field = np.zeros(self.shape, dtype=np.float32)
        for _ in range(3):
            wavelength = rng.uniform(30, 100) * self.unit
            angle, phase = rng.uniform(0, 2 * np.pi, 2)
            along = self.xs * np.cos(angle) + self.ys * np.sin(angle)
            field += rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * along / wavelength + phase)
        tint = rng.normal(0, 1, 3).astype(np.float32)
        tint /= np.linalg.norm(tint)
        grain = rng.normal(0, rng.uniform(0.04, 0.08), (*self.shape, 1)).astype(np.float32)
        return _colour(rng)[None, None, :] + field[:, :, None] * tint * 1.5 + grain

    def _outline(self, rng: np.random.Generator, label: int) -> np.ndarray:
        """Boolean H×W region of one shape of class `label` (BACKGROUND = an irregular blob)."""
        height, width = self.shape
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        dy, dx = self.ys - cy, self.xs - cx
        if label == DISC:
            radius = rng.uniform(6, 16) * self.unit
            aspect = rng.uniform(0.85, 1.15)
            return (dx * aspect) ** 2 + (dy / aspect) ** 2 < radius**2
        if label == BOX:
            half = rng.uniform(5, 15, 2) * self.unit
            angle = rng.uniform(0, np.pi)
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            return (np.abs(u) < half[0]) & (np.abs(v) < half[1])
        if label == LINE:
            return self._line(rng, cy, cx)
        radius = rng.uniform(6, 15) * self.unit
        theta = np.arctan2(dy, dx)
        wobble = 1.0
        for lobes in (2, 3, 5):
            wobble = wobble + rng.uniform(0.08, 0.22) * np.sin(lobes * theta + rng.uniform(0, 7))
        return dx**2 + dy**2 < (radius * wobble) ** 2

    def _line(self, rng: np.random.Generator, cy: float, cx: float) -> np.ndarray:
        """A straight segment 1–3 px wide through (cy, cx): distance to the segment < width / 2."""
        length = rng.uniform(0.3, 0.9) * min(self.shape)
        angle = rng.uniform(0, np.pi)
        ey, ex = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        y0, x0 = cy - ey, cx - ex
        t = ((self.ys - y0) * 2 * ey + (self.xs - x0) * 2 * ex) / length**2
        t = np.clip(t, 0, 1)
        distance2 = (self.ys - y0 - t * 2 * ey) ** 2 + (self.xs - x0 - t * 2 * ex) ** 2
        width = rng.uniform(1.0, 3.0) * max(self.unit, 1.0)
        return distance2 < (width / 2) ** 2

    def _paint(
        self, rng: np.random.Generator, label: int, inside: np.ndarray, image: np.ndarray
    ) -> np.ndarray:
        """Colour (one distribution for all) set off from what lies underneath, so the outline
        shows, and a texture that hints at the class but often belongs to another."""
        under = image[inside].mean(axis=0)
        colour = _colour(rng)
        for _ in range(8):
            if np.abs(colour - under).sum() > 0.35:
                break
            colour = _colour(rng)
        texture = PREFERRED_TEXTURE[label] if rng.random() < TEXTURE_BIAS else rng.integers(3)
        if texture == SHADED:  # shaded: brighter towards a random light direction
            angle = rng.uniform(0, 2 * np.pi)
            along = self.xs * np.cos(angle) + self.ys * np.sin(angle)
            along = along - along[inside].mean()
            gain = 1 + along / (4 * np.abs(along[inside]).max() + 1e-6)
            return colour[None, None, :] * gain[:, :, None]
        if texture == STRIPED:
            period = max(rng.uniform(3, 8) * self.unit, 2.5)  # no finer than the pixels resolve
            angle = rng.uniform(0, np.pi)
            along = self.xs * np.cos(angle) + self.ys * np.sin(angle)
            stripes = rng.uniform(0.05, 0.12) * np.sin(2 * np.pi * along / period)
            return colour[None, None, :] + stripes[:, :, None]
        return np.broadcast_to(colour, (*self.shape, 3))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.1, 0.9, 3).astype(np.float32)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in size)
    except (TypeError, ValueError):
        raise UserError(f"demo dataset: size must be (height, width), got {size!r}") from None
    if min(height, width) < MIN_SIDE:
        raise UserError(f"demo dataset: size must be at least {MIN_SIDE} px a side, got {size!r}")
    return height, width
