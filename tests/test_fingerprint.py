"""Dataset fingerprints: the same bytes by any path are the same dataset, a re-ingest is not."""

from __future__ import annotations

import shutil
from pathlib import Path

from segsearch.data.demo import make_demo_dataset
from segsearch.data.fingerprint import dataset_fingerprint
from segsearch.data.format import shard_paths
from segsearch.data.storage import filesystem_for

SPLITS = ("train", "val")


def test_fingerprint_follows_the_data_not_the_path(tmp_path, monkeypatch, s3_bucket):
    original = tmp_path / "a" / "ds"
    make_demo_dataset(str(original), n_train=4, n_val=2, size=(16, 16), seed=0)
    first = dataset_fingerprint(str(original), SPLITS)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64

    copy = tmp_path / "b" / "ds"
    shutil.copytree(original, copy)
    monkeypatch.chdir(tmp_path)
    assert dataset_fingerprint("b/ds", SPLITS) == first
    assert dataset_fingerprint(f"file://{copy}", reversed(SPLITS)) == first

    make_demo_dataset(f"s3://{s3_bucket}/ds", n_train=4, n_val=2, size=(16, 16), seed=0)
    assert dataset_fingerprint(f"s3://{s3_bucket}/ds/", SPLITS) == first

    make_demo_dataset(str(copy), n_train=4, n_val=2, size=(16, 16), seed=1, overwrite=True)
    assert dataset_fingerprint(str(copy), SPLITS) != first
    fs, root = filesystem_for(str(original))
    Path(shard_paths(fs, root, "val")[0]).unlink()
    assert dataset_fingerprint(str(original), SPLITS) != first
