"""Ingest: folders of images and masks (or arrays) → Parquet shards + dataset.json.

Orchestration only: `pairing` finds and splits the files, `mask_colors` maps mask colours to class
ids, `dataset_writer` checks the destination and writes shards, statistics and dataset.json.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from segsearch.data.dataset_writer import Destination, Row, WriteOptions, write_rows
from segsearch.data.format import DatasetInfo
from segsearch.data.images import read_image_for_storage
from segsearch.data.mask_colors import MaskMapper, parse_colors
from segsearch.data.pairing import Pair, check_headers, pair_files
from segsearch.errors import UserError

__all__ = ["Sample", "ingest", "parse_colors", "write_dataset"]

#: (split, id, image H×W×C uint8, mask H×W uint8 of class ids)
Sample = tuple[str, str, np.ndarray, np.ndarray]


def write_dataset(
    dest: str | os.PathLike[str],
    samples: Iterable[Sample],
    *,
    classes: Sequence[str],
    ignore_index: int = 255,
    shard_size_mb: float = 256,
    overwrite: bool = False,
) -> DatasetInfo:
    """Write samples as a dataset at `dest` (local folder or s3://); dataset.json comes last."""
    options = WriteOptions.make(classes, ignore_index, shard_size_mb)
    destination = Destination.check(os.fspath(dest), overwrite=overwrite)
    rows = (_sample_row(sample) for sample in samples)
    return write_rows(destination, rows, options, channels=None)


def ingest(
    images: str | Path,
    masks: str | Path,
    dest: str | os.PathLike[str],
    *,
    classes: Sequence[str] | str,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size_mb: float = 256,
    colors: Sequence[str] | str | None = None,
    ignore_index: int = 255,
    overwrite: bool = False,
    progress: bool = False,
) -> DatasetInfo:
    """Pair images with masks by file stem, split them, and write the dataset at `dest`.

    A pre-split layout (train/ and val/ under both folders) is kept as is; otherwise a seeded
    `val_fraction` of the pairs becomes the val split. Masks hold class ids, or colours (RGB
    "r,g,b" or grey "v", one per class) mapped by `colors`.
    """
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",")]
    options = WriteOptions.make(classes, ignore_index, shard_size_mb)
    palette = parse_colors(colors, num_classes=len(options.classes)) if colors else None
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    destination = Destination.check(os.fspath(dest), overwrite=overwrite)
    pairs = pair_files(Path(images), Path(masks), val_fraction=val_fraction, seed=seed)
    channels = check_headers(pairs)
    mapper = MaskMapper(palette, options.num_classes, options.ignore_index)
    rows = _ordered_map(lambda pair: _file_row(pair, mapper, channels), pairs)
    if progress and sys.stderr.isatty():
        rows = _with_progress(rows, len(pairs))
    return write_rows(destination, rows, options, channels=channels)


def _file_row(pair: Pair, mapper: MaskMapper, channels: int) -> Row:
    image, data = read_image_for_storage(pair.image)
    if image.shape[2] != channels:
        image = np.repeat(image, channels, axis=2)
    mask = mapper(pair.mask)
    return Row(pair.split, pair.id, image, mask, data, str(pair.mask))


def _sample_row(sample: Sample) -> Row:
    try:
        split, sample_id, image, mask = sample
    except (TypeError, ValueError):
        raise UserError(f"a sample must be (split, id, image, mask), got {type(sample)}") from None
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim == 2:
        image = image[:, :, None]
    return Row(str(split), str(sample_id), image, mask, None, f"sample {split}/{sample_id}")


def _ordered_map(fn: Callable[[Pair], Row], items: Sequence[Pair]) -> Iterator[Row]:
    """fn over items on a few threads (PIL decodes without the GIL), results in order."""
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Future[Row]] = []
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


def _with_progress(rows: Iterator[Row], total: int) -> Iterator[Row]:
    import click

    with click.progressbar(rows, length=total, label="ingest", file=sys.stderr) as bar:
        yield from bar
