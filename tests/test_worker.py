"""A one-worker trial's run folder: checkpoints saved, found again on resume, pruned; a data
error kept for Tune's retry."""

from __future__ import annotations

from pathlib import Path

import boto3

from segsearch.search.worker import CHECKPOINTS_KEPT, RunFolder


def _checkpoint(folder: Path, epoch: int) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(f'{{"epoch": {epoch}}}')
    return str(folder)


def test_the_last_complete_checkpoint_is_found_again_and_older_ones_pruned(tmp_path) -> None:
    run = RunFolder(str(tmp_path / "runs" / "train-a"))
    assert run.latest() is None
    paths = [run.save(_checkpoint(tmp_path / f"local{e}", e), e) for e in (1, 2, 3)]

    latest = RunFolder(str(tmp_path / "runs" / "train-a")).latest()
    assert latest is not None and latest.path == paths[-1]
    with latest.as_directory() as directory:
        assert Path(directory, "metrics.json").read_text() == '{"epoch": 3}'
    kept = sorted(p.name for p in (tmp_path / "runs" / "train-a").glob("checkpoint_*"))
    assert kept == [Path(p).name for p in paths[-CHECKPOINTS_KEPT:]]


def test_with_a_metric_the_best_epochs_are_kept_beside_the_latest(tmp_path) -> None:
    """The trial offers its best epoch's model (as a Train run with a score attribute does)."""
    run = RunFolder(str(tmp_path / "train-best"), metric="val_miou", mode="max")
    scores = {1: 0.2, 2: 0.6, 3: 0.1, 4: 0.5, 5: float("nan"), 6: 0.3}
    for epoch, score in scores.items():
        run.save(_checkpoint(tmp_path / f"local{epoch}", epoch), epoch, score=score)
    kept = sorted(p.name for p in (tmp_path / "train-best").glob("checkpoint_*"))
    assert kept == ["checkpoint_000002", "checkpoint_000004", "checkpoint_000006"]
    assert run.latest().path.endswith("checkpoint_000006")


def test_a_checkpoint_cut_off_mid_upload_is_not_resumed_from(tmp_path) -> None:
    """A process killed while a checkpoint uploads leaves its folder without the pointer."""
    run = RunFolder(str(tmp_path / "train-b"))
    first = run.save(_checkpoint(tmp_path / "local1", 1), 1)
    _checkpoint(tmp_path / "train-b" / "checkpoint_000002", 2)
    assert run.latest().path == first


def test_a_data_error_is_kept_on_s3_for_the_same_job_only(s3_endpoint) -> None:
    """Tune's retry (same job) fails at once; `--resume` (a new job) trains again."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="run-folder")
    run = RunFolder("s3://run-folder/runs/search-train/train-c")
    assert run.bad_data("01000000") is None
    run.mark_bad_data("shard-0.parquet: row 3 (id a): image does not decode", "01000000")
    again = RunFolder("s3://run-folder/runs/search-train/train-c")
    assert again.bad_data("01000000") == "shard-0.parquet: row 3 (id a): image does not decode"
    assert again.bad_data("02000000") is None
    assert again.latest() is None
