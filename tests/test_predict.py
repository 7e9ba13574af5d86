"""`segsearch predict` from a checkpoint (local and S3) over image folders and Parquet datasets."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from segsearch.checkpoint import load_model
from segsearch.cli import main
from segsearch.data.images import read_image_file
from segsearch.data.ingest import write_dataset
from tests.test_checkpoint import (
    CLASSES,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    toy_batch,
    train_tiny_checkpoint,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("checkpoint")
    train_tiny_checkpoint(directory)
    return directory


def expected_mask(checkpoint_dir: str | Path, image: np.ndarray) -> np.ndarray:
    """The contract, by hand: resize to the trained size, normalise, net, resize back, argmax."""
    net, meta = load_model(checkpoint_dir)
    pixels = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    batch = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    batch = F.interpolate(
        batch, size=meta["image_size"], mode="bilinear", align_corners=False, antialias=True
    )
    batch = (batch - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(
        1, -1, 1, 1
    )
    with torch.no_grad():
        logits = net(batch)
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def image_folder(root: Path) -> dict[str, Path]:
    """PNG, JPEG and grayscale TIFF of different sizes, one in a subfolder, plus a non-image."""
    images, _ = toy_batch(3, 48, seed=3)
    (root / "sub").mkdir(parents=True)
    files = {
        "a": root / "a.png",
        "sub/b": root / "sub" / "b.jpg",
        "c": root / "c.tif",
    }
    Image.fromarray(images[0]).save(files["a"])
    Image.fromarray(images[1][:40, :36]).save(files["sub/b"], quality=95)
    Image.fromarray(images[2][:20, :30, 1]).save(files["c"])
    (root / "notes.txt").write_text("not an image")
    return files


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture)


def test_predict_folder_writes_the_masks_the_checkpoint_predicts(tmp_path, checkpoint):
    files = image_folder(tmp_path / "in")
    out = tmp_path / "out"
    result = run_cli(
        "predict", str(checkpoint), str(tmp_path / "in"), str(out), "--overlay", "--batch-size", "2"
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3 masks" in result.output
    classes_seen = set()
    for name, path in files.items():
        image = read_image_file(path)
        mask = read_png(out / "masks" / f"{name}.png")
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, expected_mask(checkpoint, image))
        classes_seen |= set(np.unique(mask).tolist())
        picture = read_png(out / "overlays" / f"{name}.png")
        assert picture.shape == (*image.shape[:2], 3)
    assert len(classes_seen) > 1, "a model that predicts one class makes this test too weak"
    assert sorted(p.relative_to(out / "masks").as_posix() for p in out.rglob("masks/**/*.png")) == [
        "a.png",
        "c.png",
        "sub/b.png",
    ]


def _dataset_samples():
    images, masks = toy_batch(5, 40, seed=4)
    for index in range(5):
        split = "train" if index < 3 else "val"
        yield split, f"img{index}", images[index], masks[index]


def test_predict_parquet_dataset(tmp_path, checkpoint):
    write_dataset(str(tmp_path / "ds"), _dataset_samples(), classes=CLASSES)
    result = run_cli("predict", str(checkpoint), str(tmp_path / "ds"), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    for split, sample_id, image, _ in _dataset_samples():
        mask = read_png(tmp_path / "out" / "masks" / split / f"{sample_id}.png")
        np.testing.assert_array_equal(mask, expected_mask(checkpoint, image))
    assert not (tmp_path / "out" / "overlays").exists()


def test_predict_from_s3_checkpoint_and_s3_dataset(tmp_path, checkpoint, s3_bucket):
    s3 = boto3.client("s3")
    for path in checkpoint.iterdir():
        s3.upload_file(str(path), s3_bucket, f"runs/t1/{path.name}")
    write_dataset(f"s3://{s3_bucket}/ds", _dataset_samples(), classes=CLASSES)
    result = run_cli(
        "predict", f"s3://{s3_bucket}/runs/t1", f"s3://{s3_bucket}/ds", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.output
    for split, sample_id, image, _ in _dataset_samples():
        mask = read_png(tmp_path / "out" / "masks" / split / f"{sample_id}.png")
        np.testing.assert_array_equal(mask, expected_mask(checkpoint, image))


def test_bad_inputs_fail_with_one_line_and_exit_2(tmp_path, checkpoint):
    image_folder(tmp_path / "in")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    cases = [
        ((str(tmp_path / "no-model"), str(tmp_path / "in")), "no checkpoint at"),
        (("gs://bucket/model", str(tmp_path / "in")), "unsupported storage URI"),
        ((str(checkpoint), str(tmp_path / "missing")), "is not a folder of images"),
        ((str(checkpoint), str(tmp_path / "empty")), "no images in"),
        ((str(checkpoint), str(tmp_path / "broken")), "x.png: unreadable image"),
    ]
    for (model, source), message in cases:
        result = run_cli("predict", model, source, str(tmp_path / "out"))
        assert result.exit_code == 2, (model, source, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
