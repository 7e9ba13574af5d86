"""Shards as the driver and the decode tasks read them: footers, row groups, retries.

Ray-free, so the search driver can check a dataset before it starts a tracking run or Ray:
`open_dataset` reads dataset.json and every shard's footer once per search, and fails with one
line naming the damaged or missing shard; trials build their data streams from what it found.
Reads retry for READ_RETRY_SECONDS while the store does not answer, so an S3 endpoint
restarting for a few seconds costs a pause, not a trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from segsearch.data.format import DatasetInfo, read_dataset_info, shard_paths
from segsearch.data.storage import (
    display_path,
    filesystem_for,
    is_missing,
    is_store_failure,
    is_unreachable,
    storage_error,
    storage_errors,
)
from segsearch.errors import DataError, UserError, first_line

#: The columns training reads.
COLUMNS = ["id", "image", "mask"]
#: How long a shard read waits, in all, for a store that does not answer.
READ_RETRY_SECONDS = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class OpenedDataset:
    """A dataset read once: its dataset.json and every non-empty split's row groups (`units`:
    shard `path`, `row_group`, `first_row`), checked. Small, so it travels to every trial."""

    uri: str
    info: DatasetInfo
    units: Mapping[str, tuple[dict[str, Any], ...]]


def open_dataset(uri: str) -> OpenedDataset:
    """dataset.json, checked against the shards: each footer readable, the columns there, each
    split's row count right. What a search calls once, before it starts anything."""
    info = read_dataset_info(uri)
    fs, root = filesystem_for(uri)
    units = dataset_units(uri, fs, root, info)
    return OpenedDataset(uri, info, {split: tuple(found) for split, found in units.items()})


def dataset_units(
    uri: str, fs: pafs.FileSystem, root: str, info: DatasetInfo
) -> dict[str, list[dict[str, Any]]]:
    """Every non-empty split's row groups: `path`, `row_group`, `first_row` (in its shard)."""
    return {
        split: split_units(uri, fs, root, info, split)
        for split, count in info.splits.items()
        if count > 0
    }


def read_shard(fs: pafs.FileSystem, path: str, read: Callable[[pq.ParquetFile], T]) -> T:
    """`read` applied to one shard, retried while the store does not answer.

    A missing shard or bytes that are not Parquet raise DataError naming the shard; other
    store failures a UserError naming the store.
    """
    name = display_path(fs, path)
    deadline = time.monotonic() + READ_RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            with fs.open_input_file(path) as source:
                return read(pq.ParquetFile(source))
        except OSError as err:
            if is_missing(err):
                raise DataError(
                    f"{name}: shard is missing (listed in dataset.json; deleted since?)"
                ) from None
            if not is_store_failure(err):
                raise _not_parquet(name, err) from None
            if not is_unreachable(err) or time.monotonic() + delay > deadline:
                raise storage_error(name, err) from None
        except pa.ArrowException as err:
            raise _not_parquet(name, err) from None
        time.sleep(delay)
        delay = min(2 * delay, 4.0)


def split_units(
    uri: str, fs: pafs.FileSystem, root: str, info: DatasetInfo, split: str
) -> list[dict[str, Any]]:
    """The row groups of one split, checked against dataset.json's count."""
    with storage_errors(uri):
        paths = shard_paths(fs, root, split, info=info)
    units, rows = [], 0
    for path in paths:
        metadata = read_shard(fs, path, lambda parquet: parquet.metadata)
        _check_columns(display_path(fs, path), metadata)
        first = 0
        for group in range(metadata.num_row_groups):
            units.append({"path": path, "row_group": group, "first_row": first})
            first += metadata.row_group(group).num_rows
        rows += first
    if rows != info.splits[split]:
        raise UserError(
            f"{uri}: split {split!r} has {rows} rows in its shards, dataset.json says "
            f"{info.splits[split]}; ingest it again"
        )
    return units


def _check_columns(name: str, metadata: pq.FileMetaData) -> None:
    missing = [column for column in COLUMNS if column not in metadata.schema.names]
    if missing:
        raise DataError(f"{name}: not a segsearch shard (no column {', '.join(missing)})")


def _not_parquet(name: str, err: Exception) -> DataError:
    return DataError(f"{name}: not a readable Parquet file ({first_line(err)}); ingest again")
