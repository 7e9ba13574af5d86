"""Known-value tests of every loss kind and of the U-Net border weight map.

Expected values are worked out by hand (or by brute-force numpy in the test), never by calling the
code under test.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch

from segsearch.errors import UserError
from segsearch.losses import (
    LOSSES,
    border_weight_map,
    border_weight_maps,
    build_loss,
    class_balance_weights,
)
from segsearch.metrics import ConfusionMatrix

IGNORE = 255


def logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    """(pixels, classes) probabilities → (1, C, 1, pixels) logits whose softmax gives them back."""
    return torch.tensor(probs, dtype=torch.float64).log().T.reshape(1, len(probs[0]), 1, -1)


def target_of(labels: list[int]) -> torch.Tensor:
    return torch.tensor(labels).reshape(1, 1, -1)


# Two pixels, two classes: softmax (0.8, 0.2) with truth 0, (0.4, 0.6) with truth 1.
PROBS = [[0.8, 0.2], [0.4, 0.6]]
TARGET = [0, 1]
CE = (-math.log(0.8) - math.log(0.6)) / 2
# Dice: class 0 has Σpg = 0.8, Σp = 1.2, Σp² = 0.8, Σg = 1; class 1 has 0.6, 0.8, 0.4, 1.
DICE = 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2
DICE_SQUARED = 1 - (1.6 / 1.8 + 1.2 / 1.4) / 2


def loss_value(cfg: dict, probs=PROBS, target=TARGET, **kwargs) -> float:
    loss = build_loss(cfg, num_classes=len(probs[0]), **kwargs)
    return loss(logits_from_probs(probs), target_of(target)).item()


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({}, CE),
        ({"kind": "ce"}, CE),
        ({"kind": "dice"}, DICE),
        ({"kind": "dice_squared"}, DICE_SQUARED),
        ({"kind": "ce_dice"}, CE + DICE),
        ({"kind": "ce_dice", "ce_weight": 0.5, "dice_weight": 2.0}, 0.5 * CE + 2 * DICE),
        ({"kind": "ce_dice", "dice": "dice_squared", "dice_weight": 0.25}, CE + DICE_SQUARED / 4),
    ],
)
def test_known_values(cfg, expected):
    assert loss_value(cfg) == pytest.approx(expected, abs=1e-6)


def test_dice_and_squared_dice_differ():
    dice, squared = loss_value({"kind": "dice"}), loss_value({"kind": "dice_squared"})
    assert abs(dice - squared) > 0.1
    assert dice == pytest.approx(0.303030, abs=1e-5)
    assert squared == pytest.approx(0.126984, abs=1e-5)


@pytest.mark.parametrize("kind", ["ce", "dice", "dice_squared", "ce_dice", "border_ce"])
def test_ignored_pixels_change_nothing(kind):
    """A third pixel at ignore_index, confidently wrong, leaves every loss as it was."""
    with_ignored = loss_value({"kind": kind}, [*PROBS, [0.01, 0.99]], [*TARGET, IGNORE])
    assert with_ignored == pytest.approx(loss_value({"kind": kind}), abs=1e-7)


@pytest.mark.parametrize("kind", LOSSES.names())
def test_all_ignored_batch_gives_zero_not_nan(kind):
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    loss = build_loss(
        {"kind": kind}, num_classes=3, class_pixel_counts=[1, 2, 3], class_image_pixels=[6, 6, 6]
    )
    value = loss(logits, torch.full((2, 4, 5), IGNORE))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ce_gradient_is_softmax_minus_truth_over_valid_pixels():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]]).reshape(1, 2, 1, 3)
    logits.requires_grad_(True)
    build_loss({"kind": "ce"}, num_classes=2)(logits, target_of([0, 1, IGNORE])).backward()
    p = 1 / (1 + math.exp(-2))  # softmax of (2, 0) for class 0
    expected = torch.tensor([[p - 1, 0.5, 0.0], [1 - p, 0.5 - 1, 0.0]]) / 2
    assert torch.allclose(logits.grad.reshape(2, 3), expected, atol=1e-6)


# Class 2 occurs in few images: 100 of the 200 pixels of the images where it occurs.
COUNTS = [600, 300, 100]
IMAGE_PIXELS = [1000, 1000, 200]


def test_median_frequency_weights_count_only_images_where_the_class_occurs():
    # Eigen & Fergus: freq = 600/1000, 300/1000, 100/200 = 0.6, 0.3, 0.5; median 0.5.
    weights = class_balance_weights(COUNTS, image_pixels=IMAGE_PIXELS)
    assert weights == pytest.approx([0.5 / 0.6, 0.5 / 0.3, 1.0])
    # Every class in every image: freq is the dataset frequency 0.6, 0.3, 0.1; median 0.3.
    assert class_balance_weights(COUNTS, image_pixels=[1000] * 3) == pytest.approx([0.5, 1, 3])


def test_inverse_and_log_weights():
    # N / (K·n_c) = 1000 / (3·n_c)
    inverse = class_balance_weights(COUNTS, method="inverse")
    assert inverse == pytest.approx([1000 / 1800, 1000 / 900, 1000 / 300])
    # ENet: 1 / ln(1.02 + p) with p the dataset frequency 0.6, 0.3, 0.1.
    log = class_balance_weights(COUNTS, method="log")
    assert log == pytest.approx([1 / math.log(1.62), 1 / math.log(1.32), 1 / math.log(1.12)])


def test_median_needs_the_pixels_of_images_where_each_class_occurs():
    with pytest.raises(ValueError, match="image_pixels"):
        class_balance_weights(COUNTS)
    with pytest.raises(ValueError, match="at least its own pixels"):
        class_balance_weights(COUNTS, image_pixels=[1000, 200, 200])


def test_zero_pixel_class_gets_the_largest_weight_not_inf():
    weights = class_balance_weights([600, 0, 300, 100], image_pixels=[1000, 0, 1000, 1000])
    assert weights == pytest.approx([0.5, 3.0, 1.0, 3.0])
    log = class_balance_weights([600, 0, 300, 100], method="log")
    assert log[1] == pytest.approx(1 / math.log(1.12)) == log[3]
    loss = build_loss(
        {"kind": "weighted_ce"},
        num_classes=4,
        class_pixel_counts=[600, 0, 300, 100],
        class_image_pixels=[1000, 0, 1000, 1000],
    )
    value = loss(torch.zeros(1, 4, 1, 2), target_of([1, 0]))
    assert value.item() == pytest.approx(math.log(4))


def weighted_ce_by_hand(probs, target, weights) -> float:
    nll = [-math.log(p[t]) for p, t in zip(probs, target, strict=True)]
    return sum(weights[t] * n for t, n in zip(target, nll, strict=True)) / sum(
        weights[t] for t in target
    )


WEIGHTED_PROBS = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]
WEIGHTED_TARGET = [0, 1, 2, 2]


@pytest.mark.parametrize(
    ("weighting", "weights"),
    [
        ("median", [0.5 / 0.6, 0.5 / 0.3, 1.0]),
        ("inverse", [1 / 0.6, 1 / 0.3, 1 / 0.1]),  # times a constant the mean cancels
        ("log", [1 / math.log(1.62), 1 / math.log(1.32), 1 / math.log(1.12)]),
    ],
)
def test_weighted_ce_known_value(weighting, weights):
    cfg = {"kind": "weighted_ce", "weighting": weighting}
    value = loss_value(
        cfg,
        WEIGHTED_PROBS,
        WEIGHTED_TARGET,
        class_pixel_counts=COUNTS,
        class_image_pixels=IMAGE_PIXELS,
    )
    expected = weighted_ce_by_hand(WEIGHTED_PROBS, WEIGHTED_TARGET, weights)
    assert value == pytest.approx(expected, abs=1e-6)


def test_median_inverse_and_log_train_differently():
    """Median frequency counts a class's pixels against the images it occurs in: on a dataset
    where a class occurs in few images it is not inverse frequency times a constant."""
    values = [
        loss_value(
            {"kind": "weighted_ce", "weighting": weighting},
            WEIGHTED_PROBS,
            WEIGHTED_TARGET,
            class_pixel_counts=COUNTS,
            class_image_pixels=IMAGE_PIXELS,
        )
        for weighting in ("median", "inverse", "log")
    ]
    assert min(abs(a - b) for a, b in itertools.combinations(values, 2)) > 0.01


def test_median_without_image_presence_says_to_re_ingest():
    with pytest.raises(UserError, match="re-ingest") as error:
        build_loss({"kind": "weighted_ce"}, num_classes=3, class_pixel_counts=COUNTS)
    assert "\n" not in str(error.value) and "weighting inverse or log" in str(error.value)
    inverse = build_loss(
        {"kind": "weighted_ce", "weighting": "inverse"}, num_classes=3, class_pixel_counts=COUNTS
    )
    assert inverse.class_weights is not None


def test_dice_class_absent_from_target_counts_only_when_predicted():
    # Truth is class 0 everywhere; classes 1 and 2 are absent from it.
    unpredicted = [[0.7, 0.1, 0.2], [0.6, 0.1, 0.3]]  # argmax 0 at both pixels
    dice0 = 2 * 1.3 / (1.3 + 2)
    assert loss_value({"kind": "dice"}, unpredicted, [0, 0]) == pytest.approx(1 - dice0, abs=1e-6)
    predicted = [[0.7, 0.1, 0.2], [0.3, 0.1, 0.6]]  # class 2 predicted at pixel 2 → dice 0
    dice0 = 2 * 1.0 / (1.0 + 2)
    expected = 1 - (dice0 + 0.0) / 2  # class 1 (neither true nor predicted) is left out
    assert loss_value({"kind": "dice"}, predicted, [0, 0]) == pytest.approx(expected, abs=1e-6)


def test_dice_on_hard_predictions_is_one_minus_metric_dice():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 6, 7), generator=generator)
    target[0, :2] = IGNORE
    target[target == 3] = 1  # class 3 absent from the truth...
    pred = torch.randint(0, 4, (2, 6, 7), generator=generator)  # ...but predicted
    logits = 50.0 * torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).double()
    matrix = ConfusionMatrix(4, ignore_index=IGNORE)
    matrix.update(pred, target)
    loss = build_loss({"kind": "dice"}, num_classes=4)(logits, target)
    assert loss.item() == pytest.approx(1 - matrix.compute()["dice"], abs=1e-6)


@pytest.mark.parametrize("kind", LOSSES.names())
def test_gradient_reaches_the_logits(kind):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 16, 16, generator=generator, requires_grad=True)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    target[:, 2:6, 9:13] = 1
    target[:, 10:14, 4:12] = 2
    target[1, 0] = IGNORE
    loss = build_loss(
        {"kind": kind},
        num_classes=3,
        class_pixel_counts=[300, 50, 20],
        class_image_pixels=[370, 200, 100],
    )
    value = loss(logits, target)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.equal(logits.grad[1, :, 0], torch.zeros(3, 16))


def brute_force_border_map(mask: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The U-Net map from explicit pixel-to-object distances (objects: 4-connected, per class)."""
    from scipy import ndimage

    rows, cols = np.indices(mask.shape)
    distances = []
    for cls in np.unique(mask[mask != 0]):
        objects, count = ndimage.label(mask == cls)
        for k in range(1, count + 1):
            ys, xs = np.nonzero(objects == k)
            d = np.sqrt((rows[..., None] - ys) ** 2 + (cols[..., None] - xs) ** 2).min(-1)
            distances.append(d)
    d1, d2 = np.sort(np.stack(distances), axis=0)[:2]
    counts = np.bincount(mask.ravel()).astype(float)
    freq = counts / counts.sum()
    class_w = np.median(freq[counts > 0]) / freq
    border = np.where(mask == 0, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0)
    return class_w[mask] + border


def test_border_map_at_known_points():
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[1, 1] = 1
    mask[7, 7] = 1
    weights = border_weight_map(mask)
    w_bg, w_fg = 0.5 * 81 / 79, 0.5 * 81 / 2  # median frequency of 79 and 2 pixels
    # Midway on the diagonal: both objects at √18.
    assert weights[4, 4] == pytest.approx(
        w_bg + 10 * math.exp(-((2 * math.sqrt(18)) ** 2) / 50), rel=1e-5
    )
    # Three columns right of the first object: distances 3 and √(6² + 3²).
    assert weights[1, 4] == pytest.approx(
        w_bg + 10 * math.exp(-((3 + math.sqrt(45)) ** 2) / 50), rel=1e-5
    )
    assert weights[1, 1] == pytest.approx(w_fg, rel=1e-6)  # inside an object: class weight only
    assert weights.dtype == np.float32 and weights.shape == (9, 9)


def test_border_map_options():
    mask = np.zeros((5, 12), dtype=np.uint8)
    mask[:, :2] = 1
    mask[:, 8:] = 2
    mask[0, 5] = IGNORE
    custom = border_weight_map(mask, class_weights=[1.0, 2.0, 3.0], w0=4.0, sigma=2.0)
    assert custom[2, 4] == pytest.approx(1.0 + 4.0 * math.exp(-((3 + 4) ** 2) / 8))
    assert custom[2, 0] == 2.0 and custom[2, 11] == 3.0
    assert custom[0, 5] == 0.0  # ignored pixel
    # With only class 1 as foreground there is one object: no border term; class 2 pixels
    # are outside every object.
    single = border_weight_map(mask, foreground_classes=[1], class_weights=[1.0, 2.0, 3.0])
    assert single[2, 4] == 1.0 and single[2, 11] == 3.0


def test_border_map_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 48), dtype=np.uint8)
    for _ in range(9):
        r, c, h, w = rng.integers(0, 36), rng.integers(0, 44), *rng.integers(1, 5, 2)
        mask[r : r + h, c : c + w] = rng.integers(1, 3)
    expected = brute_force_border_map(mask, w0=10.0, sigma=5.0)
    assert np.allclose(border_weight_map(mask), expected, rtol=1e-5, atol=1e-6)


def test_border_map_is_fast_on_a_256_mask_with_tens_of_objects():
    rng = np.random.default_rng(0)
    mask = np.zeros((256, 256), dtype=np.uint8)
    rows, cols = np.indices(mask.shape)
    for _ in range(40):
        r, c, radius = *rng.integers(4, 252, 2), rng.integers(2, 8)
        mask[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = rng.integers(1, 3)
    started = time.perf_counter()
    border_weight_map(mask)
    assert time.perf_counter() - started < 1.0


def test_border_ce_weighs_pixels_by_the_map_of_the_target():
    target = torch.zeros(2, 12, 14, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    target[:, 2:5, 8:11] = 1
    target[1, 7:10, 3:12] = 2
    logits = torch.randn(2, 3, 12, 14, generator=torch.Generator().manual_seed(2))
    maps = np.stack([brute_force_border_map(m, w0=10.0, sigma=5.0) for m in target.numpy()])
    log_p = torch.log_softmax(logits, 1).numpy()
    nll = -np.take_along_axis(log_p, target.numpy()[:, None], 1)[:, 0]
    expected = (maps * nll).sum() / maps.sum()
    loss = build_loss({"kind": "border_ce"}, num_classes=3)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    given = torch.ones(2, 12, 14)
    given[0, 0, 0] = 3.0
    expected_given = (nll.sum() + 2 * nll[0, 0, 0]) / (given.sum().item())
    assert loss(logits, target, given).item() == pytest.approx(expected_given, rel=1e-5)


def test_border_weight_maps_batches_on_the_targets_device():
    target = torch.zeros(3, 8, 8, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    target[2, 5:7, 5:7] = 1
    maps = border_weight_maps(target, w0=5.0)
    assert maps.shape == (3, 8, 8) and maps.dtype == torch.float32
    assert torch.equal(maps[0], maps[1]) and not torch.equal(maps[0], maps[2])
    assert np.array_equal(maps[2].numpy(), border_weight_map(target[2].numpy(), w0=5.0))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"kind": "focal"}, "unknown loss kind 'focal'; choose from ['border_ce', 'ce', 'ce_dice'"),
        (
            {"kind": "dice", "w0": 3},
            "unknown loss key(s) ['w0'] for kind dice; valid keys: ['kind'",
        ),
        ({"kind": "ce_dice", "dice": "tversky"}, "choose from ['dice', 'dice_squared']"),
        ({"kind": "ce_dice", "ce_weight": 0, "dice_weight": 0}, "both 0"),
        ({"kind": "ce_dice", "dice_weight": "1"}, "loss.dice_weight must be a number"),
        ({"kind": "dice", "eps": 0}, "loss.eps must be a number > 0"),
        ({"kind": "border_ce", "sigma": -1}, "loss.sigma must be a number > 0"),
        ({"kind": "border_ce", "foreground_classes": [1, 7]}, "class ids in [0, 3)"),
        ({"kind": "weighted_ce", "weighting": "sqrt"}, "choose from ['inverse', 'log', 'median']"),
    ],
)
def test_bad_config_is_a_user_error_naming_the_choices(cfg, message):
    with pytest.raises(UserError) as error:
        build_loss(cfg, num_classes=3, class_pixel_counts=[5, 5, 5])
    assert message in str(error.value)


def test_weighted_ce_needs_matching_pixel_counts():
    with pytest.raises(UserError, match="needs class_pixel_counts"):
        build_loss({"kind": "weighted_ce"}, num_classes=3)
    with pytest.raises(UserError, match="must be 3 non-negative counts"):
        build_loss({"kind": "weighted_ce"}, num_classes=3, class_pixel_counts=[5, 5])
    with pytest.raises(UserError, match="not all 0"):
        build_loss({"kind": "weighted_ce"}, num_classes=3, class_pixel_counts=[0, 0, 0])


def test_dice_refuses_a_weight_map():
    loss = build_loss({"kind": "dice"}, num_classes=2)
    with pytest.raises(ValueError, match="no CE term"):
        loss(logits_from_probs(PROBS), target_of(TARGET), torch.ones(1, 1, 2))
