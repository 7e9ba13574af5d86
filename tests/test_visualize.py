"""Overlays, confusion plot and IoU table on small arrays: layout and colours at known pixels."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segsearch.visualize import (
    ALPHA,
    CONFUSION_CELL,
    confusion_colours,
    overlay,
    palette,
    plot_confusion,
    render_confusion,
    render_overlays,
    write_class_iou_csv,
)

CLASSES = ["background", "cat", "dog"]


def test_palette_colours_are_distinct_for_many_classes():
    colours = palette(40)
    assert colours.shape == (40, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 40


def test_overlay_blends_class_colours_and_leaves_ignored_pixels_bare():
    image = np.full((2, 2, 1), 100, dtype=np.uint8)
    labels = np.array([[0, 2], [255, 1]])
    out = overlay(image, labels, num_classes=3, ignore_index=255)
    colours = palette(3).astype(float)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 1], np.rint((1 - ALPHA) * 100 + ALPHA * colours[2]))
    np.testing.assert_array_equal(out[1, 1], np.rint((1 - ALPHA) * 100 + ALPHA * colours[1]))
    np.testing.assert_array_equal(out[1, 0], [100, 100, 100])


def test_render_overlays_lays_out_image_truth_prediction_per_row():
    count, height, width, gap = 2, 4, 5, 2
    images = np.zeros((count, height, width, 3), dtype=np.uint8)
    images[1] = 200
    masks = np.zeros((count, height, width), dtype=np.uint8)
    masks[0, 0, 0] = 255
    masks[1, 3, 4] = 1
    preds = np.full((count, height, width), 2, dtype=np.int64)
    grid = render_overlays(images, masks, preds, classes=CLASSES, ignore_index=255, gap=gap)

    colours = palette(3).astype(float)
    row_top = height + gap
    truth_left, pred_left = width + gap, 2 * (width + gap)
    assert grid.dtype == np.uint8 and grid.shape[1] == 3 * width + 2 * gap
    assert grid.shape[0] > count * (height + gap)  # the legend follows the rows
    np.testing.assert_array_equal(grid[row_top + 1, 1], [200, 200, 200])  # image panel, row 1
    np.testing.assert_array_equal(grid[0, truth_left], [0, 0, 0])  # ignored pixel stays bare
    np.testing.assert_array_equal(grid[0, truth_left + 1], np.rint(ALPHA * colours[0]))
    np.testing.assert_array_equal(
        grid[row_top + 3, truth_left + 4], np.rint((1 - ALPHA) * 200 + ALPHA * colours[1])
    )
    np.testing.assert_array_equal(grid[2, pred_left + 2], np.rint(ALPHA * colours[2]))
    np.testing.assert_array_equal(grid[height, :], 255)  # white gap under row 0
    np.testing.assert_array_equal(grid[:height, width], 255)  # white gap after the image column
    legend = grid[count * (height + gap) :]
    for colour in palette(3):
        assert (legend == colour).all(axis=-1).any(), f"legend lacks swatch {colour}"


def test_render_overlays_accepts_grayscale_and_rejects_mismatched_shapes():
    images = np.zeros((1, 3, 3, 1), dtype=np.uint8)
    masks = np.zeros((1, 3, 3), dtype=np.uint8)
    assert render_overlays(images, masks, masks, classes=CLASSES).shape[2] == 3
    with pytest.raises(ValueError, match="shapes differ"):
        render_overlays(images, masks, np.zeros((1, 3, 4), dtype=np.uint8), classes=CLASSES)


def test_plot_confusion_writes_a_png(tmp_path):
    path = tmp_path / "confusion.png"
    plot_confusion(np.array([[5, 1, 0], [0, 0, 0], [2, 0, 8]]), CLASSES, path)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and min(picture.size) > 100


def test_confusion_cells_are_coloured_by_the_share_of_the_true_class():
    # Rows: truth. Row 0 splits 50/50, row 1 has no pixels (all 0), row 2 is all right.
    picture = render_confusion(np.array([[5, 5, 0], [0, 0, 0], [0, 0, 8]]), CLASSES)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    colours = confusion_colours(np.array([0.0, 0.5, 1.0]))
    assert tuple(colours[0]) == (255, 255, 255)
    assert np.all(colours[2] < colours[1]) and np.all(colours[1] < colours[0])

    def area(colour: np.ndarray) -> int:
        return int(np.all(picture == colour, axis=2).sum())

    cell = CONFUSION_CELL**2
    assert 0.6 * cell < area(colours[2]) <= cell  # one cell, less its printed value
    assert 2 * 0.6 * cell < area(colours[1]) <= 2 * cell


def test_confusion_picture_needs_no_matplotlib(tmp_path):
    """The picture is drawn every epoch of every trial: numpy and PIL, not a plotting library."""
    code = (
        "import sys, numpy as np\n"
        "from segsearch.visualize import plot_confusion\n"
        "plot_confusion(np.eye(12), [f'c{i}' for i in range(12)], sys.argv[1])\n"
        "print('matplotlib' in sys.modules)\n"
    )
    path = tmp_path / "confusion.png"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and path.is_file()


def test_class_iou_csv_leaves_absent_classes_empty(tmp_path):
    path = tmp_path / "class_iou.csv"
    write_class_iou_csv([0.5, float("nan"), 1.0], CLASSES, path)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["class", "iou"], ["background", "0.500000"], ["cat", ""], ["dog", "1.000000"]]
    with pytest.raises(ValueError, match="2 IoU values for 3 classes"):
        write_class_iou_csv([0.5, 0.5], CLASSES, path)
