"""Pictures people look at first: prediction overlays, a confusion matrix, a per-class IoU table.

Cheap enough for every epoch of every trial: plain numpy blending and PIL drawing, no plotting
library (a matplotlib figure cost 0.9 to 3 s per epoch on the 2-core machine; this, milliseconds).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ALPHA = 0.5
"""Weight of the class colour in an overlay pixel; the image keeps the rest."""

_TAB10 = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ],
    dtype=np.uint8,
)


def palette(num_classes: int) -> np.ndarray:
    """One RGB colour per class (num_classes, 3) uint8: tab10 first, then PASCAL VOC's bit mix."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    colours[: min(num_classes, len(_TAB10))] = _TAB10[:num_classes]
    for index in range(len(_TAB10), num_classes):
        colours[index] = _voc_colour(index + 1)
    return colours


def _voc_colour(index: int) -> tuple[int, int, int]:
    red = green = blue = 0
    for shift in range(7, -1, -1):
        red |= ((index >> 0) & 1) << shift
        green |= ((index >> 1) & 1) << shift
        blue |= ((index >> 2) & 1) << shift
        index >>= 3
    return red, green, blue


def as_rgb(image: np.ndarray) -> np.ndarray:
    """H,W,C (C = 1 or 3) or H,W uint8 → H,W,3 uint8."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    ignore_index: int | None = None,
    alpha: float = ALPHA,
) -> np.ndarray:
    """Blend class colours into an image (H,W,3 uint8); ignored or unknown labels stay bare."""
    rgb = as_rgb(image).astype(np.float32)
    colours = palette(num_classes).astype(np.float32)
    labels = np.asarray(labels)
    known = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        known &= labels != ignore_index
    blended = rgb.copy()
    blended[known] = (1 - alpha) * rgb[known] + alpha * colours[labels[known]]
    return np.rint(blended).astype(np.uint8)


def render_overlays(
    images: np.ndarray,
    masks: np.ndarray,
    preds: np.ndarray,
    *,
    classes: Sequence[str],
    ignore_index: int = 255,
    gap: int = 2,
) -> np.ndarray:
    """One picture (uint8 H,W,3): per row image | ground truth overlay | prediction overlay.

    Rows and columns are `gap` white pixels apart; a legend of class colours closes the grid.
    `ignore_index` pixels are left unblended in the ground truth, which is how they show.
    """
    images, masks, preds = np.asarray(images), np.asarray(masks), np.asarray(preds)
    count, height, width = masks.shape
    if images.shape[:3] != masks.shape or preds.shape != masks.shape:
        raise ValueError(
            f"shapes differ: images {images.shape}, masks {masks.shape}, preds {preds.shape}"
        )
    num_classes = len(classes)
    grid_width = 3 * width + 2 * gap
    grid = np.full((count * (height + gap), grid_width, 3), 255, dtype=np.uint8)
    for row in range(count):
        panels = (
            as_rgb(images[row]),
            overlay(images[row], masks[row], num_classes=num_classes, ignore_index=ignore_index),
            overlay(images[row], preds[row], num_classes=num_classes),
        )
        top = row * (height + gap)
        for column, panel in enumerate(panels):
            left = column * (width + gap)
            grid[top : top + height, left : left + width] = panel
    return np.concatenate([grid, _legend(classes, grid_width)], axis=0)


def _legend(classes: Sequence[str], width: int) -> np.ndarray:
    """Colour swatches with class names, wrapped to `width` pixels."""
    font = ImageFont.load_default()
    swatch, pad, line = 10, 4, 14
    entries = [
        (index, name, swatch + 3 + math.ceil(font.getlength(name)))
        for index, name in enumerate(classes)
    ]
    lines, x = 1, pad
    for *_, size in entries:
        if x > pad and x + size > width:
            lines, x = lines + 1, pad
        x += size + 2 * pad
    picture = Image.new("RGB", (width, lines * line + pad), "white")
    draw = ImageDraw.Draw(picture)
    colours = palette(len(classes))
    x, y = pad, pad // 2
    for index, name, size in entries:
        if x > pad and x + size > width:
            x, y = pad, y + line
        draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=tuple(colours[index]))
        draw.text((x + swatch + 3, y), name, fill="black", font=font)
        x += size + 2 * pad
    return np.asarray(picture)


#: Side of one confusion-matrix cell, in pixels.
CONFUSION_CELL = 30
#: Matplotlib's "Blues" at shares 0, 0.25, 0.5, 0.75, 1, with white at 0.
_BLUES = np.array(
    [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]],
    dtype=np.float64,
)
#: Values are printed in cells up to this many classes.
_MAX_PRINTED_CLASSES = 20


def confusion_colours(share: np.ndarray) -> np.ndarray:
    """Shares in 0..1 → RGB uint8 (…, 3), white at 0 to dark blue at 1."""
    share = np.clip(np.asarray(share, dtype=np.float64), 0.0, 1.0)
    anchors = np.linspace(0.0, 1.0, len(_BLUES))
    channels = [np.interp(share, anchors, _BLUES[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def render_confusion(matrix: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """A row-normalised confusion matrix as a picture (uint8 H,W,3): rows are the true class,
    columns the predicted one, each cell coloured by its share of the row (printed in the cell
    up to 20 classes); a class without true pixels has a white row."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    font = ImageFont.load_default()
    cell, pad, count = CONFUSION_CELL, 6, len(classes)
    label = max(math.ceil(font.getlength(name)) for name in classes) + pad
    left, top = label + 14, label + 14
    caption = "rows true, columns predicted"
    width = max(left + count * cell + pad, math.ceil(font.getlength(caption)) + 4)
    picture = Image.new("RGB", (width, top + count * cell + pad), "white")
    grid = np.kron(confusion_colours(share), np.ones((cell, cell, 1), dtype=np.uint8))
    picture.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(picture)
    for index, name in enumerate(classes):
        middle = top + index * cell + cell // 2
        draw.text((left - pad, middle), name, fill="black", font=font, anchor="rm")
    columns = Image.new("RGB", (label, count * cell), "white")
    column_draw = ImageDraw.Draw(columns)
    for index, name in enumerate(classes):
        column_draw.text((2, index * cell + cell // 2), name, fill="black", font=font, anchor="lm")
    picture.paste(columns.rotate(90, expand=True), (left, 12))
    draw.text((2, 2), caption, fill="black", font=font)
    if count <= _MAX_PRINTED_CLASSES:
        for (row, column), value in np.ndenumerate(share):
            centre = (left + column * cell + cell // 2, top + row * cell + cell // 2)
            colour = "white" if value > 0.5 else "black"
            draw.text(centre, f"{value:.2f}", fill=colour, font=font, anchor="mm")
    return np.asarray(picture)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str | Path) -> None:
    """Save `render_confusion`'s picture as a PNG."""
    Image.fromarray(render_confusion(matrix, classes)).save(path, format="PNG")


def write_class_iou_csv(iou: Sequence[float], classes: Sequence[str], path: str | Path) -> None:
    """Write `class,iou` rows; a class absent from truth and prediction gets an empty iou."""
    if len(iou) != len(classes):
        raise ValueError(f"{len(iou)} IoU values for {len(classes)} classes")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou"])
        for name, value in zip(classes, iou, strict=True):
            value = float(value)
            writer.writerow([name, "" if math.isnan(value) else f"{value:.6f}"])
