"""Training input: datasets on S3 and local folders read back through Ray Data and Ray Train."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segsearch.data.format import read_dataset_info, shard_paths
from segsearch.data.ingest import ingest, write_dataset
from segsearch.data.ray_data import TorchCollate, load_splits, read_row_groups
from segsearch.data.shards import open_dataset
from segsearch.data.storage import filesystem_for
from segsearch.errors import DataError, UserError
from tests.test_ingest import make_pairs, to_v1

CLASSES = ["background", "cell", "border"]


def collect(dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """id → (image, mask) for every row of a Ray Dataset."""
    rows = {}
    for batch in dataset.iter_batches(batch_size=4, batch_format="numpy"):
        for sample_id, image, mask in zip(batch["id"], batch["image"], batch["mask"], strict=True):
            rows[str(sample_id)] = (image, mask)
    return rows


def test_s3_round_trip_is_pixel_exact(tmp_path, s3_bucket, ray_cluster) -> None:
    images, masks = make_pairs(tmp_path, n=9, size=(20, 24))
    uri = f"s3://{s3_bucket}/pets"
    info = ingest(images, masks, uri, classes=CLASSES, shard_size_mb=0.004)
    datasets = load_splits(uri, image_size=None)
    assert sorted(datasets) == ["train", "val"]
    rows = {**collect(datasets["train"]), **collect(datasets["val"])}
    assert len(collect(datasets["val"])) == info.splits["val"] == 2
    assert sorted(rows) == [str(i) for i in range(9)]
    for sample_id, (image, mask) in rows.items():
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        assert np.array_equal(image, np.asarray(Image.open(images / f"{sample_id}.png")))
        assert np.array_equal(mask, np.asarray(Image.open(masks / f"{sample_id}.png")))


def test_resize_is_bilinear_for_images_and_nearest_for_masks(tmp_path, ray_cluster) -> None:
    images, masks = make_pairs(tmp_path, n=4, size=(20, 24), mode="L")
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8) + 7).save(images / "3.png")
    dest = str(tmp_path / "ds")
    ingest(images, masks, dest, classes=CLASSES, val_fraction=0.25)
    rows = {**collect(load_splits(dest, image_size=(10, 8))["train"])}
    rows.update(collect(load_splits(dest, image_size=[10, 8])["val"]))
    for sample_id, (image, mask) in rows.items():
        assert image.shape == (10, 8, 3) and mask.shape == (10, 8)
        source = Image.open(images / f"{sample_id}.png").convert("RGB")
        expected = np.asarray(source.resize((8, 10), Image.BILINEAR))
        assert np.array_equal(image, expected)
        source_mask = Image.open(masks / f"{sample_id}.png")
        assert np.array_equal(mask, np.asarray(source_mask.resize((8, 10), Image.NEAREST)))
    assert (rows["3"][0] == 7).all()


def test_without_image_size_each_sample_keeps_its_size(tmp_path, ray_cluster) -> None:
    rng = np.random.default_rng(0)
    samples = [
        ("train" if i < 3 else "val", f"s{i}", rng.integers(0, 256, (10 + i, 12, 3), np.uint8),
         rng.integers(0, 2, (10 + i, 12), np.uint8))
        for i in range(4)
    ]  # fmt: skip
    write_dataset(str(tmp_path / "ds"), samples, classes=["a", "b"])
    rows = collect(load_splits(str(tmp_path / "ds"), image_size=None)["train"])
    for _, sample_id, image, mask in samples[:3]:
        assert np.array_equal(rows[sample_id][0], image)
        assert np.array_equal(rows[sample_id][1], mask)


def test_missing_or_inconsistent_dataset_fails_before_any_read(tmp_path) -> None:
    with pytest.raises(UserError, match=r"dataset\.json missing"):
        load_splits(str(tmp_path / "nothing"), image_size=None)
    images, masks = make_pairs(tmp_path, n=4)
    dest = tmp_path / "ds"
    ingest(images, masks, str(dest), classes=CLASSES)
    info = json.loads((dest / "dataset.json").read_text())
    (dest / "dataset.json").write_text(json.dumps({**info, "splits": {"train": 5, "val": 1}}))
    with pytest.raises(UserError, match=r"'train' has 3 rows in its shards, dataset\.json says 5"):
        load_splits(str(dest), image_size=None)
    with pytest.raises(UserError, match="image_size"):
        load_splits(str(dest), image_size=(0, 4))


# ---- corrupt shards ----------------------------------------------------------------------------


def small_dataset(tmp_path: Path, n: int = 12) -> tuple[str, list[str]]:
    """A local dataset of n 16×16 pairs, one train shard of several row groups; its train shards."""
    dest = str(tmp_path / "ds")
    ingest(*make_pairs(tmp_path, n=n, size=(16, 16)), dest, classes=CLASSES, val_fraction=0.25)
    fs, root = filesystem_for(dest)
    return dest, shard_paths(fs, root, "train")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def spoil_row(shard: str, row: int, column: str, data: bytes) -> str:
    """Rewrite a shard with `column` of one row replaced by `data`; returns that row's id."""
    table = pq.read_table(shard)
    values = table.column(column).to_pylist()
    values[row] = data
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    pq.write_table(table, shard, row_group_size=4)
    return table.column("id")[row].as_py()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:-30], "not a readable Parquet file"),
        (lambda data: b"not parquet at all" * 20, "not a readable Parquet file"),
        (lambda data: data[:4] + bytes(len(data) - 204) + data[-200:], "not a readable Parquet"),
        (None, "missing"),
    ],
    ids=["truncated footer", "garbage", "corrupt metadata", "deleted"],
)
def test_a_damaged_shard_is_named_before_ray_starts(tmp_path, damage, reason) -> None:
    dest, shards = small_dataset(tmp_path)
    data = Path(shards[0]).read_bytes()
    if damage is None:
        Path(shards[0]).unlink()
    else:
        Path(shards[0]).write_bytes(damage(data))
    with pytest.raises(DataError, match=f"^{shards[0]}: .*{reason}") as caught:
        load_splits(dest, image_size=None)
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match=f"^{shards[0]}: .*{reason}"):
        open_dataset(dest)


def row_group_units(dest: str, split: str = "train") -> tuple[pafs.FileSystem, int, list[dict]]:
    """The filesystem, channels and one `units` batch per shard, as load_splits hands them out."""
    fs, root = filesystem_for(dest)
    info = read_dataset_info(dest)
    batches = []
    for path in shard_paths(fs, root, split, info=info):
        groups = [
            pq.ParquetFile(path, filesystem=fs).metadata.row_group(g).num_rows
            for g in range(pq.ParquetFile(path, filesystem=fs).metadata.num_row_groups)
        ]
        batches.append({"path": np.array([path] * len(groups)), "row_group": np.arange(len(groups)),
                        "first_row": np.cumsum([0, *groups[:-1]])})  # fmt: skip
    return fs, info.channels, batches


def read_units(fs: pafs.FileSystem, channels: int, units: list[dict]) -> list[dict]:
    """Every batch read_row_groups yields, the way the Ray Data tasks of a split run it."""
    return [
        batch
        for unit in units
        for batch in read_row_groups(unit, filesystem=fs, channels=channels, size=None)
    ]


def read_all(dest: str, split: str = "train") -> list[dict]:
    return read_units(*row_group_units(dest, split))


@pytest.mark.parametrize(
    ("column", "data", "reason"),
    [
        ("image", None, "image does not decode"),
        ("mask", b"\x89PNG\r\n\x1a\n garbage", "mask does not decode"),
        ("mask", png(np.zeros((16, 15), np.uint8)), "mask 15×16 differs from image 16×16"),
    ],
    ids=["truncated image", "garbage mask", "mask size"],
)
def test_an_undecodable_row_names_shard_row_and_id(tmp_path, column, data, reason) -> None:
    dest, shards = small_dataset(tmp_path)
    if data is None:
        whole = pq.read_table(shards[0]).column("image")[6].as_py()
        data = whole[: len(whole) // 2]
    sample_id = spoil_row(shards[0], 6, column, data)
    message = f"^{shards[0]}: row 6 \\(id '{sample_id}'\\): {reason}"
    with pytest.raises(DataError, match=message) as caught:
        read_all(dest)
    assert "\n" not in str(caught.value)


def test_an_undecodable_row_fails_the_ray_dataset_with_the_same_line(tmp_path, ray_cluster) -> None:
    dest, shards = small_dataset(tmp_path)
    sample_id = spoil_row(shards[0], 5, "image", b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(DataError) as caught:
        collect(load_splits(dest, image_size=(8, 8))["train"])
    line = f"{shards[0]}: row 5 (id '{sample_id}'): image does not decode"
    assert line in str(caught.value)


def test_a_v1_dataset_still_loads(tmp_path, ray_cluster) -> None:
    """A dataset written before dataset.json listed its shards: part-NNNNN.parquet, format v1."""
    dest, _ = small_dataset(tmp_path, n=8)
    to_v1(tmp_path / "ds")
    datasets = load_splits(dest, image_size=None)
    assert sorted(collect(datasets["train"]) | collect(datasets["val"])) == sorted(
        str(i) for i in range(8)
    )


@pytest.mark.timeout(300)
def test_train_worker_streams_with_less_than_one_cpu_free(tmp_path, ray_cluster) -> None:
    """The deadlock of DESIGN.md: the Train worker holds all but half a CPU; data must flow."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    images, masks = make_pairs(tmp_path, n=10, size=(20, 24))
    dest = str(tmp_path / "ds")
    ingest(images, masks, dest, classes=CLASSES)
    out = tmp_path / "seen.json"

    def loop(config: dict) -> None:
        train = ray.train.get_dataset_shard("train")
        seen = {"train": [], "shapes": []}
        for batch in train.iter_torch_batches(batch_size=3, collate_fn=TorchCollate()):
            seen["train"] += batch["id"]
            seen["shapes"].append([list(batch["image"].shape), str(batch["mask"].dtype)])
        val = ray.train.get_dataset_shard("val")
        seen["val"] = [str(i) for b in val.iter_batches(batch_size=2) for i in b["id"]]
        Path(config["out"]).write_text(json.dumps(seen))

    free = 0.5
    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(out)},
        datasets=load_splits(dest, image_size=(16, 16)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            resources_per_worker={"CPU": ray.cluster_resources()["CPU"] - free},
        ),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="stream"),
    )
    trainer.fit()
    seen = json.loads(out.read_text())
    assert sorted(seen["train"] + seen["val"]) == sorted(str(i) for i in range(10))
    assert len(seen["val"]) == 2
    assert [3, 16, 16, 3] in [shape for shape, _ in seen["shapes"]]
    assert {dtype for _, dtype in seen["shapes"]} == {"torch.uint8"}
