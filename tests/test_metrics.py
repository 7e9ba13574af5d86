"""ConfusionMatrix on hand-counted examples, absent classes, ignore_index, and a real all-reduce."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segsearch.metrics import ConfusionMatrix

IGNORE = 255
TARGET = torch.tensor([[[0, 0, 1], [1, 2, IGNORE]]])
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
# Rows are truth, columns prediction; the ignored pixel (predicted 0) is not counted.
MATRIX = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_hand_counted_matrix_and_scores():
    matrix = ConfusionMatrix(3, ignore_index=IGNORE)
    matrix.update(PRED, TARGET)
    scores = matrix.compute()
    assert scores["matrix"] == MATRIX
    # IoU = tp / (tp + fp + fn): 1/2, 1/3, 1/2. Dice = 2tp / (2tp + fp + fn): 2/3, 1/2, 2/3.
    assert scores["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert scores["miou"] == pytest.approx(4 / 9)
    assert scores["dice_per_class"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert scores["dice"] == pytest.approx(11 / 18)
    assert scores["pixel_acc"] == pytest.approx(3 / 5)


def test_class_absent_from_truth_and_prediction_is_nan_and_left_out():
    matrix = ConfusionMatrix(5, ignore_index=IGNORE)
    matrix.update(PRED, TARGET)
    matrix.update(torch.tensor([[4]]), torch.tensor([[0]]))  # class 4: predicted, never true
    scores = matrix.compute()
    iou = scores["iou"]
    assert math.isnan(iou[3]) and math.isnan(scores["dice_per_class"][3])
    assert iou[:3] == pytest.approx([1 / 3, 1 / 3, 1 / 2]) and iou[4] == 0.0
    assert scores["miou"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 0) / 4)
    assert scores["pixel_acc"] == pytest.approx(3 / 6)


def test_ignored_pixels_are_not_counted_whatever_is_predicted():
    matrix = ConfusionMatrix(3, ignore_index=IGNORE)
    matrix.update(torch.tensor([1, 2, 0]), torch.tensor([IGNORE, IGNORE, 0]))
    assert matrix.compute()["matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_counts_accumulate_over_batches_and_reset_clears_them():
    whole, split = ConfusionMatrix(3), ConfusionMatrix(3)
    whole.update(PRED, TARGET)
    split.update(PRED[:, :1], TARGET[:, :1])
    split.update(PRED[:, 1:], TARGET[:, 1:])
    assert split.compute() == whole.compute()
    split.reset()
    scores = split.compute()
    assert scores["matrix"] == [[0] * 3] * 3
    assert math.isnan(scores["miou"]) and math.isnan(scores["pixel_acc"])
    assert all(math.isnan(v) for v in scores["iou"])


@pytest.mark.parametrize(("pred", "target"), [([3], [0]), ([0], [3]), ([-1], [0]), ([0, 1], [0])])
def test_out_of_range_ids_and_shape_mismatch_are_refused(pred, target):
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(torch.tensor(pred), torch.tensor(target))


def test_all_reduce_without_a_process_group_keeps_the_counts():
    matrix = ConfusionMatrix(3)
    matrix.update(PRED, TARGET)
    matrix.all_reduce()
    assert matrix.compute()["matrix"] == MATRIX


def _all_reduce_worker(rank: int, init_file: str, world: int) -> None:
    """Rank r counts only its own share of the pixels; after all_reduce each holds the total."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        matrix = ConfusionMatrix(3, ignore_index=IGNORE)
        matrix.update(PRED.flatten()[rank::world], TARGET.flatten()[rank::world])
        matrix.all_reduce()
        scores = matrix.compute()
        if scores["matrix"] != MATRIX or scores["miou"] != pytest.approx(4 / 9):
            raise AssertionError(f"rank {rank} got {scores['matrix']}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_counts_across_two_gloo_processes(tmp_path):
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), 2), nprocs=2, join=True)
