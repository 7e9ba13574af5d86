"""A dataset's identity independent of where it is read from: the promote gate compares these.

The same dataset reached by another path (another working directory, a symlink, a copy on S3)
has the same fingerprint; a re-ingest that changes dataset.json or any shard has another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow.fs as pafs

from segsearch.data.format import INFO_FILE, shard_paths
from segsearch.data.storage import filesystem_for, join, storage_errors

PREFIX = "sha256:"


def dataset_fingerprint(uri: str, splits: Iterable[str]) -> str:
    """sha256 over dataset.json's bytes and each shard's path (relative to the root) and size."""
    fs, root = filesystem_for(uri)
    digest = hashlib.sha256()
    with storage_errors(uri):
        with fs.open_input_stream(join(root, INFO_FILE)) as stream:
            info = stream.read()
        digest.update(f"{INFO_FILE}\0{len(info)}\0".encode())
        digest.update(info)
        for split in sorted(splits):
            for path, size in _sizes(fs, shard_paths(fs, root, split)):
                digest.update(f"\n{_relative(path, root)}\0{size}".encode())
    return PREFIX + digest.hexdigest()


def _sizes(fs: pafs.FileSystem, paths: list[str]) -> list[tuple[str, int]]:
    return [(info.path, info.size) for info in fs.get_file_info(paths)]


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if path.startswith(root) else path
