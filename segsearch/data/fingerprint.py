"""A dataset's identity independent of where it is read from: the promote gate compares these.

The same dataset reached by another path (another working directory, a symlink, a copy on S3,
the same files ingested again) has the same fingerprint; a re-ingest that changes dataset.json's
contents or any shard has another. Shard file names carry a random token per ingest, so a shard
counts by its place in its split and its size, not by its name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import pyarrow.fs as pafs

from segsearch.data.format import INFO_FILE, SHARDS_FIELD, shard_paths
from segsearch.data.storage import filesystem_for, join, storage_errors

PREFIX = "sha256:"


def dataset_fingerprint(uri: str, splits: Iterable[str]) -> str:
    """sha256 over dataset.json's contents (less its shard names) and each split's shard sizes."""
    fs, root = filesystem_for(uri)
    digest = hashlib.sha256()
    with storage_errors(uri):
        with fs.open_input_stream(join(root, INFO_FILE)) as stream:
            info = json.loads(stream.read())
        info.pop(SHARDS_FIELD, None)
        digest.update(json.dumps(info, sort_keys=True).encode())
        for split in sorted(splits):
            for index, size in enumerate(_sizes(fs, shard_paths(fs, root, split))):
                digest.update(f"\n{split}/{index}\0{size}".encode())
    return PREFIX + digest.hexdigest()


def _sizes(fs: pafs.FileSystem, paths: list[str]) -> list[int]:
    return [info.size for info in fs.get_file_info(paths)]
