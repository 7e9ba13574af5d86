"""dataset.json validation, image decoding rules and storage URIs."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from segsearch.data.format import (
    FORMAT,
    FORMAT_V1,
    FORMAT_V2,
    DatasetInfo,
    read_dataset_info,
    shard_paths,
)
from segsearch.data.images import decode_image, encode_png, read_image_file, read_mask_file
from segsearch.data.storage import filesystem_for
from segsearch.errors import UserError

GOOD = {
    "format": FORMAT,
    "classes": ["background", "cell"],
    "ignore_index": 255,
    "channels": 3,
    "splits": {"train": 8, "val": 2},
    "class_pixel_counts": [100, 28],
    # 8 train images of 16 pixels: class 0 in all of them, class 1 in 5.
    "class_image_counts": [8, 5],
    "class_image_pixels": [128, 80],
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.2, 0.1],
    "shards": {
        "train": ["train/part-0123456789ab-00000.parquet", "train/part-0123456789ab-00001.parquet"],
        "val": ["val/part-0123456789ab-00000.parquet"],
    },
}
PRESENCE = ("class_image_counts", "class_image_pixels")
V2 = {k: v for k, v in GOOD.items() if k not in PRESENCE} | {"format": FORMAT_V2}
V1 = {k: v for k, v in V2.items() if k != "shards"} | {"format": FORMAT_V1}


def test_info_round_trips_through_json() -> None:
    info = DatasetInfo.from_dict(GOOD)
    assert info.num_classes == 2
    assert DatasetInfo.from_json(info.to_json()) == info
    assert json.loads(info.to_json()) == GOOD


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format", "segsearch/v0"),
        ("classes", []),
        ("classes", ["a", "a"]),
        ("classes", "background,cell"),
        ("ignore_index", 1),
        ("ignore_index", 256),
        ("ignore_index", True),
        ("channels", 2),
        ("splits", {"train": 8}),
        ("splits", {"train": 8, "val": -1}),
        ("class_pixel_counts", [1]),
        ("class_pixel_counts", [1, -2]),
        ("class_image_counts", None),
        ("class_image_counts", [8]),
        ("class_image_counts", [9, 5]),
        ("class_image_counts", [8, 0]),
        ("class_image_pixels", None),
        ("class_image_pixels", [128, 20]),
        ("class_image_pixels", [128, 129]),
        ("class_image_pixels", [128, 0]),
        ("mean", [0.5]),
        ("mean", [0.5, 0.5, 1.5]),
        ("std", [0.1, 0.1, None]),
        ("std", [0.1, 0.1, float("nan")]),
        ("shards", None),
        ("shards", {"train": ["train/part-0123456789ab-00000.parquet"]}),
        ("shards", {"train": [], "val": ["val/part-0123456789ab-00000.parquet"]}),
        ("shards", {"train": ["../part-00000.parquet"], "val": ["val/part-00000.parquet"]}),
        ("shards", {"train": ["val/part-00000.parquet"], "val": ["val/part-00000.parquet"]}),
        ("shards", {"train": ["train/x.parquet"], "val": ["val/part-00000.parquet"]}),
    ],
)
def test_each_bad_field_is_named(field: str, value: object) -> None:
    with pytest.raises(UserError, match=f"field '{field}'"):
        DatasetInfo.from_dict({**GOOD, field: value})


def test_missing_field_is_named() -> None:
    data = {k: v for k, v in GOOD.items() if k != "std"}
    with pytest.raises(UserError, match=r"field 'std'.*<missing>"):
        DatasetInfo.from_dict(data)


def test_read_dataset_info_missing_and_malformed(tmp_path) -> None:
    with pytest.raises(
        UserError, match=r"no dataset at .*dataset\.json missing: incomplete ingest"
    ):
        read_dataset_info(str(tmp_path))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match=r"dataset\.json is not valid JSON"):
        read_dataset_info(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({**GOOD, "channels": 4}))
    with pytest.raises(UserError, match=r"dataset\.json: field 'channels'"):
        read_dataset_info(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps(GOOD))
    assert read_dataset_info(str(tmp_path)).classes == ("background", "cell")


def test_v1_dataset_has_no_shard_list_and_its_shards_are_listed(tmp_path) -> None:
    """Datasets written before dataset.json listed shards still load: their part-NNNNN files."""
    (tmp_path / "dataset.json").write_text(json.dumps(V1))
    (tmp_path / "train").mkdir()
    for name in ["part-00001.parquet", "part-00000.parquet", "part-0123456789ab-00000.parquet"]:
        (tmp_path / "train" / name).write_bytes(b"")
    info = read_dataset_info(str(tmp_path))
    assert info.shards is None and info.format == FORMAT_V1
    assert DatasetInfo.from_json(info.to_json()) == info
    fs, root = filesystem_for(str(tmp_path))
    found = [path.rsplit("/", 1)[1] for path in shard_paths(fs, root, "train")]
    assert found == ["part-00000.parquet", "part-00001.parquet"]


def test_v2_dataset_loads_without_image_presence() -> None:
    """Datasets written before dataset.json recorded where classes occur still load; median
    weighting then asks for a re-ingest (tests/test_losses.py)."""
    info = DatasetInfo.from_dict(V2)
    assert info.format == FORMAT_V2 and info.shards is not None
    assert info.class_image_counts is None and info.class_image_pixels is None
    assert json.loads(info.to_json()) == V2


def test_v2_shards_come_from_dataset_json_not_the_folder(tmp_path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps(GOOD))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-00000.parquet").write_bytes(b"")  # an old dataset's shard
    fs, root = filesystem_for(str(tmp_path))
    assert shard_paths(fs, root, "train") == [f"{root}/{p}" for p in GOOD["shards"]["train"]]
    info = read_dataset_info(str(tmp_path))
    assert shard_paths(fs, root, "val", info=info) == [f"{root}/{GOOD['shards']['val'][0]}"]


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_gray_stays_one_channel_and_rgba_drops_alpha() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    assert np.array_equal(decode_image(_png(gray)), gray[:, :, None])
    rgba = np.random.default_rng(0).integers(0, 256, (6, 8, 4), dtype=np.uint8)
    assert np.array_equal(decode_image(_png(rgba)), rgba[:, :, :3])


def test_sixteen_bit_gray_is_scaled_to_eight_bits() -> None:
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    assert decode_image(_png(values))[:, :, 0].tolist() == [[0, 1, 255, 128]]


def test_encode_png_is_lossless() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_png(rgb)), rgb)
    gray = rgb[:, :, :1].copy()
    assert np.array_equal(decode_image(encode_png(gray)), gray)


def test_unreadable_files_name_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match=r"broken\.png: unreadable image"):
        read_image_file(bad)
    with pytest.raises(UserError, match=r"missing\.png: cannot read"):
        read_image_file(tmp_path / "missing.png")


def test_palette_masks_give_indices_or_colours(tmp_path) -> None:
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    image.save(tmp_path / "m.png")
    assert read_mask_file(tmp_path / "m.png").tolist() == [[0, 1], [2, 1]]
    assert read_mask_file(tmp_path / "m.png", colors=True)[0, 1].tolist() == [200, 10, 10]


def test_filesystem_for_local_and_s3(tmp_path, monkeypatch) -> None:
    fs, path = filesystem_for(str(tmp_path / "data"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "data")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs, path = filesystem_for("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    assert fs.region == "eu-west-1"
    with pytest.raises(UserError, match="unsupported storage URI"):
        filesystem_for("gs://bucket/x")
    with pytest.raises(UserError, match="bad S3 URI"):
        filesystem_for("s3://")
