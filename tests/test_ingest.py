"""Ingest: folders → Parquet shards + dataset.json, statistics, and every bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from segsearch.cli import main
from segsearch.data.format import read_dataset_info, shard_paths
from segsearch.data.images import decode_image, decode_mask
from segsearch.data.ingest import ingest, write_dataset
from segsearch.data.storage import filesystem_for
from segsearch.errors import UserError
from segsearch.losses import build_loss

CLASSES = "background,cell,border"


def make_pairs(
    root: Path,
    n: int = 6,
    *,
    size: tuple[int, int] = (12, 16),
    mode: str = "RGB",
    num_classes: int = 3,
    seed: int = 0,
    suffix: str = ".png",
) -> tuple[Path, Path]:
    """Random images and class-id masks named 0..n-1 under root/images and root/masks."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (*size, 3) if mode == "RGB" else size
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / f"{i}{suffix}")
        mask = rng.integers(0, num_classes, size, dtype=np.uint8)
        Image.fromarray(mask).save(masks / f"{i}.png")
    return images, masks


def read_rows(dest: Path, split: str) -> dict[str, dict]:
    """Every row of a split's shards, by id."""
    rows = {}
    for path in sorted((dest / split).glob("part-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["id"]] = row
    return rows


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["ingest", *args])
    return result.exit_code, result.stdout, result.stderr


def assert_refused(code: int, stderr: str, *names: str, exit_code: int = 2) -> None:
    """Exit code 2 (or `exit_code`) and one line on stderr naming each of `names`."""
    assert code == exit_code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in names:
        assert name in lines[0], (name, stderr)


def dataset_content(dest: str) -> tuple[object, dict[str, dict[str, dict]]]:
    """dataset.json and every row of every split, found the way training finds the shards."""
    fs, root = filesystem_for(dest)
    info = read_dataset_info(dest)
    rows: dict[str, dict[str, dict]] = {}
    for split in info.splits:
        for path in shard_paths(fs, root, split):
            with fs.open_input_file(path) as source:
                for row in pq.read_table(source).to_pylist():
                    rows.setdefault(split, {})[row["id"]] = row
    return info, rows


def stored_files(dest: str) -> set[str]:
    """Every file under a local folder or S3 prefix, relative to it."""
    fs, root = filesystem_for(dest)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {f.path[len(root) + 1 :] for f in found if f.type == pafs.FileType.File}


def listed_files(dest: str) -> set[str]:
    """dataset.json and the shards it names, relative to the dataset's root."""
    fs, root = filesystem_for(dest)
    info = read_dataset_info(dest)
    shards = {p[len(root) + 1 :] for split in info.splits for p in shard_paths(fs, root, split)}
    return {"dataset.json", *shards}


def to_v1(dest: Path) -> None:
    """Make a local dataset look as ingest wrote it before dataset.json listed the shards."""
    info = json.loads((dest / "dataset.json").read_text())
    for split, paths in info.pop("shards").items():
        for number, path in enumerate(paths):
            (dest / path).rename(dest / split / f"part-{number:05d}.parquet")
    (dest / "dataset.json").write_text(json.dumps({**info, "format": "segsearch/v1"}))


def to_v2(dest: Path) -> None:
    """Make a local dataset look as ingest wrote it before dataset.json recorded image presence."""
    info = json.loads((dest / "dataset.json").read_text())
    del info["class_image_counts"], info["class_image_pixels"]
    (dest / "dataset.json").write_text(json.dumps({**info, "format": "segsearch/v2"}))


def break_last_pair(images: Path, masks: Path, fault: str) -> str:
    """Spoil the pair ingest reads last ("9" in stem order of 0..29); returns the culprit."""
    if fault == "truncated image":
        data = (images / "9.png").read_bytes()
        (images / "9.png").write_bytes(data[: len(data) // 2])
        return r"9\.png: unreadable image"
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(masks / "9.png")
    return r"9\.png: class id\(s\) 7"


def no_dataset_left(dest: Path) -> bool:
    return not (dest / "dataset.json").exists() and not list(dest.glob("*/part-*.parquet"))


def test_local_round_trip_is_pixel_exact_with_statistics(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=10)
    dest = tmp_path / "ds"
    info = ingest(images, masks, str(dest), classes=CLASSES.split(","), val_fraction=0.3)
    assert info.splits == {"train": 7, "val": 3}
    assert json.loads((dest / "dataset.json").read_text()) == info.to_dict()
    train, val = read_rows(dest, "train"), read_rows(dest, "val")
    assert sorted(train) + sorted(val) != [] and not set(train) & set(val)
    pixels, counts = [], np.zeros(3, dtype=np.int64)
    image_counts, image_pixels = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for split_rows in (train, val):
        for sample_id, row in split_rows.items():
            source = np.asarray(Image.open(images / f"{sample_id}.png"))
            mask = np.asarray(Image.open(masks / f"{sample_id}.png"))
            assert np.array_equal(decode_image(row["image"]), source)
            assert np.array_equal(decode_mask(row["mask"]), mask)
            assert (row["height"], row["width"]) == (12, 16)
            if split_rows is train:
                pixels.append(source.reshape(-1, 3) / 255)
                counts += np.bincount(mask.ravel(), minlength=3)
                for c in np.unique(mask):
                    image_counts[c] += 1
                    image_pixels[c] += mask.size
    pixels = np.concatenate(pixels)
    assert info.class_pixel_counts == tuple(counts.tolist())
    assert info.class_image_counts == tuple(image_counts.tolist())
    assert info.class_image_pixels == tuple(image_pixels.tolist())
    assert np.allclose(info.mean, pixels.mean(0), atol=1e-6)
    assert np.allclose(info.std, pixels.std(0), atol=1e-6)


def test_split_is_seeded(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=10)
    ingest(images, masks, str(tmp_path / "a"), classes=CLASSES, seed=3)
    ingest(images, masks, str(tmp_path / "b"), classes=CLASSES, seed=3)
    ingest(images, masks, str(tmp_path / "c"), classes=CLASSES, seed=4)
    val = [sorted(read_rows(tmp_path / name, "val")) for name in "abc"]
    assert val[0] == val[1] and len(val[0]) == 2
    assert val[0] != val[2]


def test_pre_split_layout_is_kept(tmp_path) -> None:
    for split, n in (("train", 4), ("val", 2)):
        images, masks = make_pairs(tmp_path / split, n=n, seed=n)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        images.rename(tmp_path / "images" / split)
        masks.rename(tmp_path / "masks" / split)
    info = ingest(tmp_path / "images", tmp_path / "masks", str(tmp_path / "ds"), classes=CLASSES)
    assert info.splits == {"train": 4, "val": 2}
    assert sorted(read_rows(tmp_path / "ds", "val")) == ["0", "1"]


def test_rgb_colour_masks_are_mapped_and_the_ignore_colour_kept(tmp_path) -> None:
    images, _ = make_pairs(tmp_path, n=3, size=(4, 4))
    masks = tmp_path / "rgb_masks"
    masks.mkdir()
    colours = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [255, 255, 255]], dtype=np.uint8)
    ids = np.array([[0, 1, 2, 3]] * 4)
    for i in range(3):
        Image.fromarray(colours[np.roll(ids, i, axis=1)]).save(masks / f"{i}.png")
    dest = tmp_path / "ds"
    info = ingest(images, masks, str(dest), classes=CLASSES, colors="0,0,0;128,0,0;0,128,0")
    rows = {**read_rows(dest, "train"), **read_rows(dest, "val")}
    expected = np.array([0, 1, 2, 255])[np.roll(ids, 1, axis=1)]
    assert np.array_equal(decode_mask(rows["1"]["mask"]), expected)
    assert sum(info.class_pixel_counts) == 4 * 4 * info.splits["train"] * 3 // 4


def test_grey_value_masks_like_isbi(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=4, mode="L")
    for i in range(4):
        mask = np.asarray(Image.open(masks / f"{i}.png"))
        Image.fromarray(np.where(mask == 0, 0, 255).astype(np.uint8)).save(masks / f"{i}.png")
    code, out, err = run_cli(
        str(images), str(masks), str(tmp_path / "ds"), "--classes", "membrane,cell",
        "--colors", "0;255",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip().startswith("ingested 4 images (train 3, val 1)")
    assert err == ""  # no progress bar and no warning off a terminal
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["channels"] == 1 and info["classes"] == ["membrane", "cell"]
    row = read_rows(tmp_path / "ds", "val")
    mask = decode_mask(next(iter(row.values()))["mask"])
    assert set(np.unique(mask).tolist()) == {0, 1}


def test_grey_masks_without_colors_warn_about_absent_classes(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=4, mode="L", num_classes=1)
    for i in range(4):
        Image.fromarray(np.full((12, 16), 255 * (i % 2), dtype=np.uint8)).save(masks / f"{i}.png")
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", "a,b")
    assert code == 0
    assert err.startswith("warning: no train pixels of class b;") and "--colors" in err


def test_jpeg_is_stored_as_is_and_16_bit_tiff_is_scaled(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=2, suffix=".jpg")
    big = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    Image.fromarray(big).save(images / "2.tif")
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(masks / "2.png")
    dest = tmp_path / "ds"
    ingest(images, masks, str(dest), classes=CLASSES, val_fraction=0.3)
    rows = {**read_rows(dest, "train"), **read_rows(dest, "val")}
    assert rows["0"]["image"] == (images / "0.jpg").read_bytes()
    tiff = decode_image(rows["2"]["image"])
    assert tiff.shape == (12, 16, 3)  # gray in a colour dataset: stored gray, read as RGB
    assert tiff[0, 1, 0] == round(300 * 255 / 65535)


def test_shards_roll_at_the_size_limit_and_overwrite_leaves_none_behind(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=20, size=(64, 64))
    dest = tmp_path / "ds"
    ingest(images, masks, str(dest), classes=CLASSES, shard_size_mb=0.03)
    shards = sorted(dest.glob("train/part-*.parquet"))
    assert len(shards) > 2
    assert all(p.stat().st_size < 0.03 * 2**20 + 20_000 for p in shards)
    assert len(read_rows(dest, "train")) == 16
    ingest(images, masks, str(dest), classes=CLASSES, overwrite=True)
    assert len(list(dest.glob("train/*"))) == 1
    assert stored_files(str(dest)) == listed_files(str(dest))
    assert len(read_rows(dest, "train")) == 16


@pytest.mark.parametrize("fault", ["truncated image", "bad label"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_overwrite_failing_late_keeps_the_old_dataset_whole(
    tmp_path, request, where, fault
) -> None:
    """Rows of the new dataset are written (a row group per image) before the last pair fails:
    the old dataset must still read back unchanged, and nothing new may be left."""
    bucket = request.getfixturevalue("s3_bucket") if where == "s3" else None
    dest = f"s3://{bucket}/ds" if bucket else str(tmp_path / "ds")
    ingest(*make_pairs(tmp_path / "old", n=4), dest, classes=CLASSES)
    before, files = dataset_content(dest), stored_files(dest)
    images, masks = make_pairs(tmp_path / "new", n=30, size=(32, 32), seed=1)
    culprit = break_last_pair(images, masks, fault)
    with pytest.raises(UserError, match=culprit):
        ingest(images, masks, dest, classes=CLASSES, shard_size_mb=0.002, overwrite=True)
    assert dataset_content(dest) == before
    assert stored_files(dest) == files


def test_overwriting_a_v1_dataset_removes_its_shards(tmp_path) -> None:
    dest = tmp_path / "ds"
    ingest(*make_pairs(tmp_path / "old", n=6), str(dest), classes=CLASSES)
    to_v1(dest)
    old = dataset_content(str(dest))
    assert old[0].shards is None and sum(len(rows) for rows in old[1].values()) == 6
    ingest(*make_pairs(tmp_path / "new", n=4, seed=1), str(dest), classes=CLASSES, overwrite=True)
    assert stored_files(str(dest)) == listed_files(str(dest))
    assert sum(len(rows) for rows in dataset_content(str(dest))[1].values()) == 4


def test_s3_overwrite_removes_the_old_shards(tmp_path, s3_bucket) -> None:
    dest = f"s3://{s3_bucket}/ds"
    ingest(*make_pairs(tmp_path / "old", n=20, size=(32, 32)), dest, classes=CLASSES,
           shard_size_mb=0.002)  # fmt: skip
    images, masks = make_pairs(tmp_path / "new", n=5, seed=1)
    ingest(images, masks, dest, classes=CLASSES, overwrite=True)
    assert stored_files(dest) == listed_files(dest)
    info, rows = dataset_content(dest)
    assert sum(info.splits.values()) == sum(len(r) for r in rows.values()) == 5


def test_write_dataset_from_arrays(tmp_path) -> None:
    rng = np.random.default_rng(0)
    samples = [
        (split, f"s{i}", rng.integers(0, 256, (5, 6, 1), dtype=np.uint8), np.full((5, 6), i % 2))
        for i, split in enumerate(["train", "train", "val"])
    ]
    samples = [(s, i, im, m.astype(np.uint8)) for s, i, im, m in samples]
    info = write_dataset(str(tmp_path / "ds"), iter(samples), classes=["a", "b"])
    assert info.splits == {"train": 2, "val": 1} and info.channels == 1
    assert info.class_pixel_counts == (30, 30)
    assert info.class_image_counts == (1, 1) and info.class_image_pixels == (30, 30)
    with pytest.raises(UserError, match="already holds a dataset"):
        write_dataset(str(tmp_path / "ds"), samples, classes=["a", "b"])


def test_image_presence_gives_median_frequency_weights(tmp_path) -> None:
    """dataset.json records, per class, the labelled pixels of the train images where it occurs:
    Eigen & Fergus's median frequency balancing needs them, dataset-wide counts do not suffice."""
    masks = {
        ("train", "a"): [[0, 0], [0, 255]],  # 3 labelled pixels
        ("train", "b"): [[0, 1], [1, 1]],
        ("train", "c"): [[2, 2], [2, 2]],
        ("val", "d"): [[1, 1], [2, 2]],  # val does not count
    }
    samples = [
        (split, sample_id, np.zeros((2, 2, 1), np.uint8), np.array(mask, np.uint8))
        for (split, sample_id), mask in masks.items()
    ]
    info = write_dataset(str(tmp_path / "ds"), samples, classes=["x", "y", "z"])
    assert info.class_pixel_counts == (4, 3, 4)
    assert info.class_image_counts == (2, 1, 1)
    assert info.class_image_pixels == (3 + 4, 4, 4)
    assert read_dataset_info(str(tmp_path / "ds")) == info
    loss = build_loss(
        {"kind": "weighted_ce", "weighting": "median"},
        num_classes=3,
        class_pixel_counts=info.class_pixel_counts,
        class_image_pixels=info.class_image_pixels,
    )
    # freq = 4/7, 3/4, 4/4; median 3/4
    assert loss.class_weights.tolist() == pytest.approx([0.75 * 7 / 4, 1.0, 0.75])


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([("train", "x", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))], "differs"),
        ([("train", "x", np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.uint8))], "C 1 or 3"),
        ([("train", "x", np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 7, np.uint8))], "7"),
        ([("train", "x", np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4), np.uint8))], "val"),
    ],
)
def test_write_dataset_refuses_bad_samples_and_cleans_up(tmp_path, samples, message) -> None:
    dest = tmp_path / "ds"
    with pytest.raises(UserError, match=message):
        write_dataset(str(dest), samples, classes=["a", "b"])
    assert not dest.exists()


# ---- bad input through the CLI: exit 2, one line naming the file, nothing that looks complete --


def test_image_without_mask(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    (masks / "3.png").unlink()
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert_refused(code, err, "3.png", "image without mask")
    assert no_dataset_left(tmp_path / "ds")


def test_mask_without_image(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    (images / "4.png").unlink()
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert_refused(code, err, "4.png", "mask without image")
    assert no_dataset_left(tmp_path / "ds")


def test_mask_size_differs(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    Image.fromarray(np.zeros((12, 15), dtype=np.uint8)).save(masks / "2.png")
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert_refused(code, err, "2.png", "15×12", "16×12")
    assert no_dataset_left(tmp_path / "ds")


def test_class_id_out_of_range_mid_way_removes_written_shards(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=30, size=(32, 32))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[5, 5] = 3
    Image.fromarray(mask).save(masks / "8.png")
    dest = tmp_path / "ds"
    code, _, err = run_cli(
        str(images), str(masks), str(dest), "--classes", CLASSES, "--shard-size-mb", "1"
    )
    assert_refused(code, err, "8.png", "class id(s) 3", "ignore index 255")
    assert not dest.exists()


def test_ignore_index_is_allowed_in_masks(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    mask = np.full((12, 16), 255, dtype=np.uint8)
    mask[0, 0] = 1
    Image.fromarray(mask).save(masks / "1.png")
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert code == 0, err


def test_colour_not_in_the_list(tmp_path) -> None:
    images, _ = make_pairs(tmp_path, n=3, size=(4, 4))
    masks = tmp_path / "rgb"
    masks.mkdir()
    for i in range(3):
        mask = np.zeros((4, 4, 3), dtype=np.uint8)
        if i == 2:
            mask[1, 1] = (9, 8, 7)
        Image.fromarray(mask).save(masks / f"{i}.png")
    code, _, err = run_cli(
        str(images), str(masks), str(tmp_path / "ds"), "--classes", "a,b",
        "--colors", "0,0,0;128,0,0",
    )  # fmt: skip
    assert_refused(code, err, "2.png", "9,8,7")
    assert no_dataset_left(tmp_path / "ds")


def test_rgb_mask_without_colors(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=3)
    rgb = np.zeros((12, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(masks / "0.png")
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert_refused(code, err, "0.png", "--colors")


def test_unreadable_image(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    (images / "5.png").write_bytes(b"definitely not a png")
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert_refused(code, err, "5.png", "unreadable image")
    assert no_dataset_left(tmp_path / "ds")


def test_truncated_image_found_while_decoding(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, size=(64, 64))
    data = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(str(images), str(masks), str(tmp_path / "ds"), "--classes", CLASSES)
    assert_refused(code, err, "1.png", "unreadable image")
    assert not (tmp_path / "ds").exists()


def test_empty_input(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here")
    code, _, err = run_cli(
        str(tmp_path / "images"), str(tmp_path / "masks"), str(tmp_path / "ds"),
        "--classes", CLASSES,
    )  # fmt: skip
    assert_refused(code, err, str(tmp_path / "images"), "no images")
    assert not (tmp_path / "ds").exists()


def test_existing_dataset_needs_overwrite(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    dest = tmp_path / "ds"
    assert run_cli(str(images), str(masks), str(dest), "--classes", CLASSES)[0] == 0
    before = (dest / "dataset.json").read_text()
    code, _, err = run_cli(str(images), str(masks), str(dest), "--classes", CLASSES)
    assert_refused(code, err, str(dest), "--overwrite")
    assert (dest / "dataset.json").read_text() == before
    code, _, err = run_cli(str(images), str(masks), str(dest), "--classes", "a,b,c", "--overwrite")
    assert code == 0, err
    assert json.loads((dest / "dataset.json").read_text())["classes"] == ["a", "b", "c"]


def test_leftover_shards_of_an_incomplete_ingest_need_overwrite(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    dest = tmp_path / "ds"
    assert run_cli(str(images), str(masks), str(dest), "--classes", CLASSES)[0] == 0
    (dest / "dataset.json").unlink()
    code, _, err = run_cli(str(images), str(masks), str(dest), "--classes", CLASSES)
    assert_refused(code, err, str(dest), "incomplete ingest")


def test_bad_input_with_overwrite_keeps_the_old_dataset(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    dest = tmp_path / "ds"
    assert run_cli(str(images), str(masks), str(dest), "--classes", CLASSES)[0] == 0
    (masks / "0.png").unlink()
    code, _, err = run_cli(str(images), str(masks), str(dest), "--classes", CLASSES, "--overwrite")
    assert_refused(code, err, "0.png")
    assert (dest / "dataset.json").exists()


def test_bad_options_are_one_line_errors(tmp_path) -> None:
    images, masks = make_pairs(tmp_path)
    dest = str(tmp_path / "ds")
    for args, text in [
        (["--classes", "a,a"], "twice"),
        (["--classes", "a,b", "--colors", "0;255;3"], "3 colours for 2 classes"),
        (["--classes", "a,b", "--colors", "0;1,2,3"], "all RGB"),
        (["--classes", "a,b", "--ignore-index", "1"], "ignore index"),
        (["--classes", "a,b", "--val-fraction", "1"], "val fraction"),
    ]:
        code, _, err = run_cli(str(images), str(masks), dest, *args)
        assert_refused(code, err, text)


# ---- S3 destinations that cannot be used -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_names_it_not_the_secret(tmp_path, monkeypatch) -> None:
    images, masks = make_pairs(tmp_path, n=2)
    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "top-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    code, _, err = run_cli(str(images), str(masks), "s3://somebucket/ds", "--classes", CLASSES)
    assert_refused(code, err, endpoint, "somebucket", "cannot reach", exit_code=3)
    assert "top-secret-value" not in err


@pytest.fixture
def strict_s3() -> Iterator[str]:
    """A second moto S3 server, in its own process, that checks credentials (none are valid)."""
    port = _free_port()
    moto = Path(sys.executable).with_name("moto_server")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_bad_credentials_name_the_endpoint_not_the_secret(tmp_path, monkeypatch, strict_s3) -> None:
    images, masks = make_pairs(tmp_path, n=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", strict_s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    code, _, err = run_cli(str(images), str(masks), "s3://somebucket/ds", "--classes", CLASSES)
    assert_refused(code, err, strict_s3, "somebucket", "refused the credentials")
    assert "wrong-secret-value" not in err


def test_missing_bucket(tmp_path, s3_endpoint) -> None:
    images, masks = make_pairs(tmp_path, n=2)
    code, _, err = run_cli(str(images), str(masks), "s3://no-such-bucket/ds", "--classes", CLASSES)
    assert_refused(code, err, "no-such-bucket", s3_endpoint, "does not exist")


def test_s3_ingest_refuses_an_existing_dataset(tmp_path, s3_bucket) -> None:
    images, masks = make_pairs(tmp_path, n=3)
    dest = f"s3://{s3_bucket}/pets"
    ingest(images, masks, dest, classes=CLASSES)
    code, _, err = run_cli(str(images), str(masks), dest, "--classes", CLASSES)
    assert_refused(code, err, dest, "--overwrite")


def test_s3_failure_mid_way_leaves_no_objects(tmp_path, s3_endpoint, s3_bucket) -> None:
    import boto3

    images, masks = make_pairs(tmp_path, n=12, size=(32, 32))
    Image.fromarray(np.full((32, 32), 9, dtype=np.uint8)).save(masks / "7.png")
    with pytest.raises(UserError, match=r"7\.png: class id\(s\) 9"):
        ingest(images, masks, f"s3://{s3_bucket}/ds", classes=CLASSES, shard_size_mb=0.002)
    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket)
    assert listing.get("KeyCount", 0) == 0, listing.get("Contents")


def test_v2_dataset_with_median_weighting_asks_for_a_re_ingest_before_ray_starts(tmp_path) -> None:
    images, masks = make_pairs(tmp_path, n=4)
    dest = tmp_path / "ds"
    ingest(images, masks, str(dest), classes=CLASSES)
    to_v2(dest)
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: old\nfixed: {loss.kind: weighted_ce}\nspace: {optim.lr: {float: [0.001, 0.01]}}\n"
    )
    result = CliRunner().invoke(main, ["search", str(space), "--dataset", str(dest)])
    assert_refused(result.exit_code, result.stderr, "weighting median", "re-ingest")
