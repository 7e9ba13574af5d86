"""Training input: a dataset URI → Ray Datasets of decoded uint8 images and masks per split,
and the decoding of row groups that a search's once-only decode (trial_data.py) runs too.

Sizing policy: with `image_size` every image is *resized* to it (bilinear, antialiased when
shrinking) and every mask too (nearest, so class ids stay class ids); nothing is cropped, so
validation scores cover every labelled pixel. Random crops are augmentation's job (`aug.scale`).

Resource budget: every Ray Data task here asks for DATA_CPUS (a quarter of a logical CPU), so the
data stream always finds room beside Train workers and Tune trial drivers that hold whole CPUs.
That is also why the shards are not read with `ray.data.read_parquet`: in Ray 2.60 it first runs
a file-listing task that holds one whole CPU, not configurable, and with less than one CPU free
(Train workers holding the rest) that task never starts and the trial hangs. Instead the driver
lists the Parquet row groups (one footer read per shard) and Ray Data maps over them.

Damage: a shard whose footer does not parse, or that is missing, fails `load_splits` on the
driver (see shards.py); a row whose image or mask does not decode fails the Ray Data task that
decodes it. Both raise `DataError`, one line naming the shard file (and the row and its id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow.fs as pafs
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from segsearch.config import check_image_size
from segsearch.data.images import decode_image_at, decode_mask
from segsearch.data.shards import COLUMNS, OpenedDataset, open_dataset, read_shard
from segsearch.data.storage import display_path, filesystem_for
from segsearch.errors import DataError, UserError, first_line

if TYPE_CHECKING:
    import ray.data

#: Logical CPUs per Ray Data task: fractional so data never waits on training.
DATA_CPUS = 0.25

#: Rows per decoded block: small blocks stream to the trainer without piling up in memory.
DECODE_BATCH = 16

T = TypeVar("T")


def load_splits(
    source: str | OpenedDataset, *, image_size: Sequence[int] | None = None
) -> dict[str, ray.data.Dataset]:
    """Ray Datasets for every split of a dataset (a URI, or one a search opened already):
    columns id, image (uint8 N,H,W,C) and mask (uint8 N,H,W). A URI's dataset.json and shards
    are checked first, so a bad dataset fails here, before any Ray work."""
    size = check_image_size(image_size)
    opened = source if isinstance(source, OpenedDataset) else open_dataset(source)
    return {split: split_stream(opened, split, size=size) for split in opened.units}


def split_stream(
    opened: OpenedDataset,
    split: str,
    *,
    size: tuple[int, int] | None,
    units: Sequence[dict[str, Any]] | None = None,
    native_masks: bool = False,
) -> ray.data.Dataset:
    """One split as a Ray Dataset decoded as it streams (`units`: some of its row groups, or
    all of them); with `native_masks`, also each mask at its image's own size (`native_mask`),
    which validation scores against."""
    import ray.data

    items = list(opened.units[split] if units is None else units)
    fs, _ = filesystem_for(opened.uri)
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_row_groups,
        fn_kwargs={
            "filesystem": fs,
            "channels": opened.info.channels,
            "size": size,
            "native_masks": native_masks,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=DATA_CPUS,
        concurrency=_max_tasks(len(items)),
    )


def read_row_groups(
    units: dict[str, np.ndarray],
    *,
    filesystem: pafs.FileSystem,
    channels: int,
    size: tuple[int, int] | None,
    native_masks: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Read Parquet row groups and yield them decoded, DECODE_BATCH rows at a time.

    `units` holds each row group's shard `path`, `row_group` number and `first_row` (its first
    row's index in the shard, for messages)."""
    for path, group, first in zip(
        units["path"], units["row_group"], units["first_row"], strict=True
    ):
        yield from _decoded_row_group(
            filesystem,
            str(path),
            int(group),
            int(first),
            channels=channels,
            size=size,
            native_masks=native_masks,
        )


def decode_row_group(
    unit: Mapping[str, Any],
    *,
    filesystem: pafs.FileSystem,
    channels: int,
    size: tuple[int, int] | None,
    native_masks: bool = False,
) -> dict[str, np.ndarray]:
    """One row group (`unit`: shard `path`, `row_group`, `first_row`) read and decoded whole."""
    batches = list(
        _decoded_row_group(
            filesystem,
            str(unit["path"]),
            int(unit["row_group"]),
            int(unit["first_row"]),
            channels=channels,
            size=size,
            rows=None,
            native_masks=native_masks,
        )
    )
    return batches[0] if len(batches) == 1 else _concat(batches)


def _decoded_row_group(
    filesystem: pafs.FileSystem,
    path: str,
    group: int,
    first: int,
    *,
    channels: int,
    size: tuple[int, int] | None,
    rows: int | None = DECODE_BATCH,
    native_masks: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """A row group decoded `rows` rows at a time (all at once for None)."""
    table = read_shard(
        filesystem, path, lambda parquet: parquet.read_row_group(group, columns=COLUMNS)
    )
    shard = display_path(filesystem, path)
    step = rows or max(1, table.num_rows)
    for start in range(0, table.num_rows, step):
        chunk = table.slice(start, step)
        batch = {name: chunk.column(name).to_pylist() for name in COLUMNS}
        yield decode_batch(
            batch,
            channels=channels,
            size=size,
            shard=shard,
            first_row=first + start,
            native_masks=native_masks,
        )


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: concat_rows([b[name] for b in batches]) for name in batches[0]}


def concat_rows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays of rows joined: one array when their rows agree in shape, otherwise an object
    array of the rows (images of several sizes)."""
    if len({part.shape[1:] for part in parts}) <= 1 and all(p.dtype != object for p in parts):
        return np.concatenate(parts)
    return _stack([row for part in parts for row in part])


def decode_batch(
    batch: Mapping[str, Sequence[Any]],
    *,
    channels: int,
    size: tuple[int, int] | None,
    shard: str = "batch",
    first_row: int = 0,
    native_masks: bool = False,
) -> dict[str, np.ndarray]:
    """Encoded rows → uint8 arrays, resized to `size` (H, W) when given; with `native_masks`
    and a `size`, also `native_mask`: each mask at its image's own size.

    A row that does not decode raises DataError naming `shard`, its row (counted from
    `first_row`) and its id."""
    images, masks, natives = [], [], []
    rows = zip(batch["id"], batch["image"], batch["mask"], strict=True)
    for offset, (sample_id, image_bytes, mask_bytes) in enumerate(rows):
        where = f"{shard}: row {first_row + offset} (id {str(sample_id)!r})"
        image, mask = _decode_row(where, image_bytes, mask_bytes, size)
        if image.shape[2] != channels:
            image = np.repeat(image, channels, axis=2)
        if size is not None and image.shape[:2] != size:
            image = _resize(image, size, Image.BILINEAR)
        natives.append(mask)
        if size is not None and mask.shape != size:
            mask = _resize(mask, size, Image.NEAREST)
        images.append(image)
        masks.append(mask)
    decoded = {"id": np.asarray(batch["id"]), "image": _stack(images), "mask": _stack(masks)}
    if native_masks and size is not None:
        decoded["native_mask"] = _stack(natives)
    return decoded


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


def _decode_row(
    where: str, image_bytes: bytes, mask_bytes: bytes, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The row's image (already at `size` when its mode allows: `decode_image_at`) and mask
    (at its own size), checked against each other."""
    image, own = _decoded(lambda data: decode_image_at(data, size), image_bytes, f"{where}: image")
    mask = _decoded(decode_mask, mask_bytes, f"{where}: mask")
    if mask.ndim != 2:
        raise DataError(f"{where}: mask is not a one-channel PNG of class ids; ingest again")
    if mask.shape != own:
        raise DataError(
            f"{where}: mask {mask.shape[1]}×{mask.shape[0]} differs from image "
            f"{own[1]}×{own[0]}; ingest the dataset again"
        )
    return image, mask


def _decoded(decode: Callable[[bytes], T], data: bytes, what: str) -> T:
    try:
        return decode(data)
    except (UserError, OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad bytes
        raise DataError(f"{what} does not decode ({first_line(err)}); ingest again") from None


def resize_pair(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """An image (bilinear, antialiased when shrinking) and its mask (nearest: class ids stay
    class ids) resized to `size` (H, W), as training sees them."""
    return _resize(image, size, Image.BILINEAR), _resize(mask, size, Image.NEAREST)


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


def _max_tasks(units: int) -> int | None:
    """At most one task per logical CPU: fractional CPUs are for headroom, not for running
    four decode processes per core (each holds a Python worker's memory)."""
    import ray

    if not ray.is_initialized():
        return None
    cap = max(2, int(ray.cluster_resources().get("CPU", 0)))
    return cap if units > cap else None
