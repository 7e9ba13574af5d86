"""Training input: a dataset URI → Ray Datasets of decoded uint8 images and masks per split.

Sizing policy: with `image_size` every image is *resized* to it (bilinear, antialiased when
shrinking) and every mask too (nearest, so class ids stay class ids); nothing is cropped, so
validation scores cover every labelled pixel. Random crops are augmentation's job (`aug.scale`).

Resource budget: every Ray Data task here asks for DATA_CPUS (a quarter of a logical CPU), so the
data stream always finds room beside Train workers and Tune trial drivers that hold whole CPUs.
That is also why the shards are not read with `ray.data.read_parquet`: in Ray 2.60 it first runs
a file-listing task that holds one whole CPU, not configurable, and with less than one CPU free
(Train workers holding the rest) that task never starts and the trial hangs. Instead the driver
lists the Parquet row groups (one footer read per shard) and Ray Data maps over them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from segsearch.data.format import read_dataset_info, shard_paths
from segsearch.data.images import decode_image, decode_mask
from segsearch.data.storage import filesystem_for, storage_errors
from segsearch.errors import UserError

if TYPE_CHECKING:
    import ray.data

#: Logical CPUs per Ray Data task: fractional so data never waits on training.
DATA_CPUS = 0.25
#: Rows per decoded block: small blocks stream to the trainer without piling up in memory.
DECODE_BATCH = 16
COLUMNS = ["id", "image", "mask"]


def load_splits(
    uri: str, *, image_size: tuple[int, int] | None = None
) -> dict[str, ray.data.Dataset]:
    """Ray Datasets for every split of the dataset at `uri`: columns id, image (uint8 N,H,W,C)
    and mask (uint8 N,H,W). dataset.json and the shards are checked first, so a bad dataset
    fails here, before any trial starts."""
    import ray.data

    info = read_dataset_info(uri)
    size = _check_size(image_size)
    fs, root = filesystem_for(uri)
    datasets = {}
    for split, count in info.splits.items():
        if count == 0:
            continue
        with storage_errors(uri):
            units, rows = _row_groups(fs, shard_paths(fs, root, split))
        if rows != count:
            raise UserError(
                f"{uri}: split {split!r} has {rows} rows in its shards, dataset.json says "
                f"{count}; ingest it again"
            )
        datasets[split] = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            read_row_groups,
            fn_kwargs={"filesystem": fs, "channels": info.channels, "size": size},
            batch_size=1,
            batch_format="numpy",
            num_cpus=DATA_CPUS,
            concurrency=_max_tasks(len(units)),
        )
    return datasets


def read_row_groups(
    units: dict[str, np.ndarray],
    *,
    filesystem: pafs.FileSystem,
    channels: int,
    size: tuple[int, int] | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Read Parquet row groups and yield them decoded, DECODE_BATCH rows at a time."""
    for path, group in zip(units["path"], units["row_group"], strict=True):
        with filesystem.open_input_file(str(path)) as source:
            table = pq.ParquetFile(source).read_row_group(int(group), columns=COLUMNS)
        for start in range(0, table.num_rows, DECODE_BATCH):
            chunk = table.slice(start, DECODE_BATCH)
            batch = {name: chunk.column(name).to_pylist() for name in COLUMNS}
            yield decode_batch(batch, channels=channels, size=size)


def decode_batch(
    batch: Mapping[str, Sequence[Any]], *, channels: int, size: tuple[int, int] | None
) -> dict[str, np.ndarray]:
    """Encoded rows → uint8 arrays, resized to `size` (H, W) when given."""
    images, masks = [], []
    for image_bytes, mask_bytes in zip(batch["image"], batch["mask"], strict=True):
        image, mask = decode_image(image_bytes), decode_mask(mask_bytes)
        if image.shape[2] != channels:
            image = np.repeat(image, channels, axis=2)
        if size is not None and image.shape[:2] != size:
            image, mask = _resize(image, size, Image.BILINEAR), _resize(mask, size, Image.NEAREST)
        images.append(image)
        masks.append(mask)
    return {"id": np.asarray(batch["id"]), "image": _stack(images), "mask": _stack(masks)}


class TorchCollate(NumpyBatchCollateFn):
    """For `iter_torch_batches(collate_fn=TorchCollate())`: uint8 tensors, ids as a list.

    The default collate cannot turn the string `id` column into a tensor.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        return {
            "id": [str(i) for i in batch["id"]],
            "image": torch.from_numpy(np.ascontiguousarray(batch["image"])),
            "mask": torch.from_numpy(np.ascontiguousarray(batch["mask"])),
        }


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    picture = Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    resized = np.asarray(picture.resize((size[1], size[0]), resample=resample))
    return resized[:, :, None] if array.ndim == 3 and resized.ndim == 2 else resized


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One array when shapes agree; otherwise an object array (Ray keeps it as a ragged tensor)."""
    if len({a.shape for a in arrays}) <= 1:
        return np.stack(arrays)
    ragged = np.empty(len(arrays), dtype=object)
    ragged[:] = arrays
    return ragged


def _row_groups(fs: pafs.FileSystem, paths: list[str]) -> tuple[list[dict[str, Any]], int]:
    units, rows = [], 0
    for path in paths:
        with fs.open_input_file(path) as source:
            metadata = pq.ParquetFile(source).metadata
        for group in range(metadata.num_row_groups):
            units.append({"path": path, "row_group": group})
            rows += metadata.row_group(group).num_rows
    return units, rows


def _max_tasks(units: int) -> int | None:
    """At most one task per logical CPU: fractional CPUs are for headroom, not for running
    four decode processes per core (each holds a Python worker's memory)."""
    import ray

    if not ray.is_initialized():
        return None
    cap = max(2, int(ray.cluster_resources().get("CPU", 0)))
    return cap if units > cap else None


def _check_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise UserError(f"image_size must be [height, width], got {image_size!r}") from None
    if height < 1 or width < 1:
        raise UserError(f"image_size must be positive, got {image_size!r}")
    return height, width
