"""Rows → Parquet shards + dataset.json at a checked destination, with statistics in the same pass.

Statistics (per-class pixel counts and image presence, per-channel mean/std of the train split) are
computed while the shards are written, and dataset.json is written last: a dataset without it is
visibly incomplete. Any failure removes the shards written so far.

Overwriting never loses the old dataset: the new shards get names of their own (an ingest token),
the old dataset.json keeps naming the old shards until the new ones are complete, then one write
of dataset.json switches readers to the new dataset (a rename locally, one PUT on S3), and only
then are the old shards deleted.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from segsearch.data.format import INFO_FILE, REQUIRED_SPLITS, SCHEMA, SHARD_PATTERN, DatasetInfo
from segsearch.data.images import encode_png
from segsearch.data.messages import and_more
from segsearch.data.storage import check_bucket, filesystem_for, join, storage_error, storage_errors
from segsearch.errors import UserError

ROW_GROUP_ROWS = 64
ROW_GROUP_BYTES = 32 * 2**20


@dataclass(frozen=True)
class WriteOptions:
    """What every dataset write needs, checked once: class names, the ignore index, shard size."""

    classes: tuple[str, ...]
    ignore_index: int
    shard_bytes: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def make(cls, classes: Sequence[str], ignore_index: int, shard_size_mb: float) -> WriteOptions:
        classes = tuple(classes)
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise UserError(f"--classes must name at least one class, got {list(classes)}")
        if len(set(classes)) != len(classes):
            raise UserError(f"--classes has a name twice: {list(classes)}")
        if not len(classes) <= ignore_index <= 255:
            raise UserError(
                f"ignore index must be in {len(classes)}..255 (not a class id), got {ignore_index}"
            )
        if not shard_size_mb > 0:
            raise UserError(f"shard size must be positive, got {shard_size_mb} MB")
        return cls(classes, ignore_index, int(shard_size_mb * 2**20))


@dataclass
class Row:
    """One sample on its way to a shard; `source` names it in error messages."""

    split: str
    id: str
    image: np.ndarray
    mask: np.ndarray
    image_bytes: bytes | None
    source: str


@dataclass(frozen=True)
class Destination:
    """A checked place to write: reachable, and not holding a dataset unless overwriting.

    `old_shards` are the shard files there before this ingest (of the old dataset or of an
    incomplete ingest): deleted once the new dataset.json is in place, never before.
    """

    uri: str
    fs: pafs.FileSystem
    root: str
    old_shards: tuple[str, ...]

    @classmethod
    def check(cls, uri: str, *, overwrite: bool) -> Destination:
        fs, root = filesystem_for(uri)
        check_bucket(uri, fs)
        with storage_errors(uri):
            top = fs.get_file_info(root)
            if top.type == pafs.FileType.File:
                raise UserError(f"{uri} is a file; DEST must be a folder or an s3:// prefix")
            info_file = fs.get_file_info(join(root, INFO_FILE))
            shards = _existing_shards(fs, root) if top.type == pafs.FileType.Directory else []
        has_info = info_file.type == pafs.FileType.File
        if has_info and not overwrite:
            raise UserError(f"{uri} already holds a dataset; pass --overwrite to replace it")
        if shards and not overwrite:
            raise UserError(
                f"{uri} holds shards of an incomplete ingest (no {INFO_FILE}); "
                "pass --overwrite to replace them"
            )
        return cls(uri, fs, root, tuple(shards))

    def remove_old_shards(self) -> None:
        """After the switch: delete the replaced shards, and split folders left empty. Readers
        no longer see them, and a later --overwrite removes any left, so a failure here says
        the new dataset is in place."""
        try:
            with storage_errors(self.uri):
                for path in self.old_shards:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.delete_file(path)
        except UserError as err:
            raise UserError(
                f"the new dataset at {self.uri} is complete, but removing the old shards failed "
                f"({err}); they are unused and the next --overwrite removes them"
            ) from None
        for folder in sorted({path.rsplit("/", 1)[0] for path in self.old_shards}):
            _remove_empty_dir(self.fs, folder)


def _existing_shards(fs: pafs.FileSystem, root: str) -> list[str]:
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        if entry.type == pafs.FileType.Directory:
            for file in fs.get_file_info(pafs.FileSelector(entry.path)):
                if file.type == pafs.FileType.File and SHARD_PATTERN.match(file.base_name):
                    found.append(file.path)
    return sorted(found)


def write_rows(
    destination: Destination, rows: Iterable[Row], options: WriteOptions, *, channels: int | None
) -> DatasetInfo:
    """Write `rows` as shards + dataset.json; on any failure remove what was written.

    `channels` is the dataset's channel count when known (files), else the first row's (arrays).
    """
    writers: dict[str, _SplitWriter] = {}
    token = uuid.uuid4().hex[:12]
    stats = _Stats(options.num_classes, options.ignore_index)
    seen: dict[str, set[str]] = {}
    local = isinstance(destination.fs, pafs.LocalFileSystem)
    with storage_errors(destination.uri):
        root_type = destination.fs.get_file_info(destination.root).type
    created_root = root_type == pafs.FileType.NotFound
    try:
        for row in rows:
            channels = _check_row(row, options, channels, seen.setdefault(row.split, set()))
            if row.split not in writers:
                directory = join(destination.root, row.split)
                if local:
                    destination.fs.create_dir(directory)
                writers[row.split] = _SplitWriter(
                    destination.fs, directory, options.shard_bytes, token
                )
            stats.add(row)
            image_bytes = row.image_bytes if row.image_bytes is not None else encode_png(row.image)
            writers[row.split].add(row, image_bytes, encode_png(row.mask))
        for writer in writers.values():
            writer.close()
        counts = {split: len(ids) for split, ids in seen.items()}
        missing = [s for s in REQUIRED_SPLITS if not counts.get(s)]
        if missing:
            raise UserError(f"no samples for the {' and '.join(missing)} split; both are required")
        shards = {
            split: writer.relative_paths(destination.root) for split, writer in writers.items()
        }
        info = stats.info(options.classes, counts, channels or 1, shards)
        _write_text(destination.fs, join(destination.root, INFO_FILE), info.to_json(), token)
    except BaseException as err:
        if hasattr(rows, "close"):
            rows.close()  # stop reading files (and the reader threads) now
        _remove_partial(destination, writers.values(), created_root)
        if isinstance(err, OSError):
            raise storage_error(destination.uri, err) from None
        raise
    destination.remove_old_shards()
    return info


def _check_row(row: Row, options: WriteOptions, channels: int | None, ids: set[str]) -> int:
    image, mask = row.image, row.mask
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.uint8:
        raise UserError(f"{row.source}: image must be H×W×C uint8, C 1 or 3; got {_desc(image)}")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise UserError(f"{row.source}: mask must be H×W uint8 class ids, got {_desc(mask)}")
    if image.shape[:2] != mask.shape:
        raise UserError(
            f"{row.source}: mask size {_size(mask)} differs from image size {_size(image)}"
        )
    if channels is not None and image.shape[2] != channels:
        raise UserError(
            f"{row.source}: image has {image.shape[2]} channel(s), earlier images {channels}"
        )
    if not row.split or "/" in row.split or not row.id:
        raise UserError(f"{row.source}: split and id must be non-empty (split without '/')")
    if row.id in ids:
        raise UserError(f"{row.source}: id {row.id!r} appears twice in split {row.split!r}")
    ids.add(row.id)
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in values if v >= options.num_classes and v != options.ignore_index]
    if bad:
        raise UserError(
            f"{row.source}: class id(s) {_list(bad)} ≥ number of classes ({options.num_classes}) "
            f"and not the ignore index {options.ignore_index}"
        )
    return image.shape[2]


class _Stats:
    """Per-class pixel counts, per-class image presence and per-channel value histograms of the
    train split."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_counts = np.zeros(256, dtype=np.int64)
        self.image_counts = np.zeros(num_classes, dtype=np.int64)
        self.image_pixels = np.zeros(num_classes, dtype=np.int64)
        self.histograms: np.ndarray | None = None

    def add(self, row: Row) -> None:
        if row.split != "train":
            return
        counts = np.bincount(row.mask.ravel(), minlength=256)
        self.class_counts += counts
        present = counts[: self.num_classes] > 0
        self.image_counts += present
        self.image_pixels += present * (counts.sum() - counts[self.ignore_index])
        channels = row.image.shape[2]
        if self.histograms is None:
            self.histograms = np.zeros((channels, 256), dtype=np.int64)
        for c in range(channels):
            self.histograms[c] += np.bincount(row.image[:, :, c].ravel(), minlength=256)

    def info(
        self,
        classes: tuple[str, ...],
        splits: dict[str, int],
        channels: int,
        shards: dict[str, tuple[str, ...]],
    ) -> DatasetInfo:
        levels = np.arange(256, dtype=np.float64) / 255
        hist = self.histograms.astype(np.float64)
        total = hist.sum(axis=1)
        mean = (hist * levels).sum(axis=1) / total
        var = np.maximum((hist * levels**2).sum(axis=1) / total - mean**2, 0.0)
        return DatasetInfo(
            classes=classes,
            ignore_index=self.ignore_index,
            splits=dict(sorted(splits.items())),
            class_pixel_counts=tuple(int(n) for n in self.class_counts[: self.num_classes]),
            class_image_counts=tuple(int(n) for n in self.image_counts),
            class_image_pixels=tuple(int(n) for n in self.image_pixels),
            mean=tuple(round(float(m), 6) for m in mean),
            std=tuple(round(float(s), 6) for s in np.sqrt(var)),
            channels=channels,
            shards=dict(sorted(shards.items())),
        )


class _SplitWriter:
    """Parquet shards of one split: small row groups to stream, a new file at the size limit.

    File names carry the ingest's `token`, so they never collide with a dataset being replaced.
    """

    def __init__(self, fs: pafs.FileSystem, directory: str, shard_bytes: int, token: str) -> None:
        self.fs, self.directory, self.shard_bytes = fs, directory, shard_bytes
        self.token = token
        self.paths: list[str] = []
        self.buffer: list[tuple[str, bytes, bytes, int, int]] = []
        self.buffered = 0
        self.file_bytes = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: Row, image: bytes, mask: bytes) -> None:
        height, width = row.mask.shape
        self.buffer.append((row.id, image, mask, height, width))
        self.buffered += len(image) + len(mask)
        if len(self.buffer) >= ROW_GROUP_ROWS or self.buffered >= min(
            ROW_GROUP_BYTES, self.shard_bytes
        ):
            self._flush()

    def relative_paths(self, root: str) -> tuple[str, ...]:
        """The shards written, relative to the dataset's root (as dataset.json lists them)."""
        return tuple(path[len(root) + 1 :] for path in self.paths)

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        """Close quietly after a failure; the caller deletes the files."""
        if self.writer is not None:
            with contextlib.suppress(Exception):  # the original error matters, not this one
                self.writer.close()
            self.writer = None

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is not None and self.file_bytes + self.buffered > self.shard_bytes:
            self.writer.close()
            self.writer = None
        if self.writer is None:
            path = join(self.directory, f"part-{self.token}-{len(self.paths):05d}.parquet")
            self.paths.append(path)
            self.writer = pq.ParquetWriter(
                path,
                SCHEMA,
                filesystem=self.fs,
                compression="none",
                use_dictionary=False,
                write_statistics=["id", "height", "width"],
            )
            self.file_bytes = 0
        columns = list(zip(*self.buffer, strict=True))
        table = pa.Table.from_arrays([pa.array(col) for col in columns], schema=SCHEMA)
        self.writer.write_table(table, row_group_size=len(self.buffer))
        self.file_bytes += self.buffered
        self.buffer, self.buffered = [], 0


def _write_text(fs: pafs.FileSystem, path: str, text: str, token: str) -> None:
    """Replace a small file at once: a temporary file renamed over it locally (os.replace), a
    single PUT on S3 (an object is replaced whole)."""
    data = text.encode("utf-8")
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    temporary = f"{path}.{token}.tmp"
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _remove_partial(
    destination: Destination, writers: Iterable[_SplitWriter], created_root: bool
) -> None:
    """Best effort: delete what this ingest wrote, so nothing half-written is left behind."""
    fs = destination.fs
    for writer in writers:
        writer.abort()
        for path in writer.paths:
            with contextlib.suppress(OSError):
                fs.delete_file(path)
        _remove_empty_dir(fs, writer.directory)
    if created_root:
        _remove_empty_dir(fs, destination.root)


def _remove_empty_dir(fs: pafs.FileSystem, path: str) -> None:
    """Remove a folder (or, on S3, the marker object pyarrow leaves) when nothing is in it."""
    with contextlib.suppress(OSError):
        if not fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            fs.delete_dir(path)


def _desc(array: np.ndarray) -> str:
    return f"{array.dtype} {array.shape}"


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}×{array.shape[0]}"


def _list(values: list[int], limit: int = 5) -> str:
    return ", ".join(map(str, values[:limit])) + and_more(len(values), limit)
