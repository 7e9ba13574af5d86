"""Demo dataset: repeatable, every class present, lines rare, colour alone not enough, readable."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from segsearch.data.demo import DEMO_CLASSES, generate_demo_samples, make_demo_dataset
from segsearch.data.format import read_dataset_info
from segsearch.data.images import decode_image, decode_mask
from segsearch.errors import UserError

LINE = DEMO_CLASSES.index("line")


def samples(n: int = 32, size: tuple[int, int] = (64, 64), seed: int = 0, split: str = "train"):
    return list(generate_demo_samples(n=n, size=size, seed=seed, split=split))


def stack(items) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([s[2] for s in items]), np.stack([s[3] for s in items])


def test_samples_have_the_documented_shapes_and_ids() -> None:
    items = samples(n=3, size=(48, 80), split="val")
    assert [s[:2] for s in items] == [
        ("val", "val-00000"),
        ("val", "val-00001"),
        ("val", "val-00002"),
    ]
    for _, _, image, mask in items:
        assert image.shape == (48, 80, 3) and image.dtype == np.uint8
        assert mask.shape == (48, 80) and mask.dtype == np.uint8


def test_same_seed_same_images_other_seed_or_split_other_images() -> None:
    images, masks = stack(samples(n=4))
    again_images, again_masks = stack(samples(n=4))
    assert np.array_equal(images, again_images) and np.array_equal(masks, again_masks)
    assert not np.array_equal(masks, stack(samples(n=4, seed=1))[1])
    assert not np.array_equal(masks, stack(samples(n=4, split="val"))[1])


def test_every_class_present_background_dominates_lines_are_rare() -> None:
    _, masks = stack(samples(n=32))
    fractions = np.bincount(masks.ravel(), minlength=256) / masks.size
    assert set(np.flatnonzero(fractions)) == set(range(len(DEMO_CLASSES)))
    assert fractions.argmax() == DEMO_CLASSES.index("background")
    assert 0.003 < fractions[LINE] < 0.10
    assert fractions[LINE] < fractions[:LINE].min()  # the rarest class


def test_lines_are_thin() -> None:
    _, masks = stack(samples(n=16, size=(96, 96)))
    lines = masks == LINE
    eroded = lines[:, 1:-1, 1:-1] & lines[:, :-2, 1:-1] & lines[:, 2:, 1:-1]
    eroded &= lines[:, 1:-1, :-2] & lines[:, 1:-1, 2:]
    assert eroded.sum() < 0.3 * lines.sum(), "most line pixels touch the line's edge"


def test_colour_alone_does_not_separate_the_classes() -> None:
    """A per-pixel nearest-class-mean colour classifier does little better than chance."""
    images, masks = stack(samples(n=32))
    pixels, labels = images.reshape(-1, 3).astype(np.float64), masks.ravel()
    means = np.stack([pixels[labels == c].mean(0) for c in range(len(DEMO_CLASSES))])
    predicted = ((pixels[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    recall = [np.mean(predicted[labels == c] == c) for c in range(len(DEMO_CLASSES))]
    assert np.mean(recall) < 0.45  # chance is 0.25 for four classes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "number of train images must be >= 1"),
        ({"size": (8, 64)}, "at least 16 px"),
        ({"size": 64}, r"size must be \(height, width\)"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_user_errors_on_the_call(kwargs: dict, message: str) -> None:
    args = {"n": 2, "size": (32, 32), "seed": 0, "split": "train", **kwargs}
    with pytest.raises(UserError, match=message):
        generate_demo_samples(**args)


def test_written_dataset_reads_back_pixel_exact(tmp_path) -> None:
    dest = str(tmp_path / "demo")
    info = make_demo_dataset(dest, n_train=6, n_val=3, size=(40, 48), seed=3)
    assert read_dataset_info(dest) == info
    assert info.classes == DEMO_CLASSES and info.channels == 3
    assert dict(info.splits) == {"train": 6, "val": 3}
    _, train_masks = stack(samples(n=6, size=(40, 48), seed=3))
    expected = np.bincount(train_masks.ravel(), minlength=len(DEMO_CLASSES))
    assert list(info.class_pixel_counts) == expected.tolist()

    table = pq.read_table(sorted((tmp_path / "demo" / "val").glob("part-*.parquet"))[0])
    row = table.slice(1, 1).to_pylist()[0]
    _, sample_id, image, mask = samples(n=3, size=(40, 48), seed=3, split="val")[1]
    assert row["id"] == sample_id
    assert np.array_equal(decode_image(row["image"]), image)
    assert np.array_equal(decode_mask(row["mask"]), mask)


def test_existing_dataset_is_kept_unless_overwrite(tmp_path) -> None:
    dest = str(tmp_path / "demo")
    make_demo_dataset(dest, n_train=2, n_val=1, size=(32, 32))
    with pytest.raises(UserError):
        make_demo_dataset(dest, n_train=2, n_val=1, size=(32, 32), seed=1)
    info = make_demo_dataset(dest, n_train=3, n_val=1, size=(32, 32), seed=1, overwrite=True)
    assert read_dataset_info(dest).splits["train"] == 3 == info.splits["train"]


def test_bad_arguments_fail_before_anything_is_written(tmp_path) -> None:
    dest = tmp_path / "demo"
    with pytest.raises(UserError, match="number of val images"):
        make_demo_dataset(str(dest), n_train=2, n_val=0, size=(32, 32))
    assert not dest.exists() or not any(dest.iterdir())
