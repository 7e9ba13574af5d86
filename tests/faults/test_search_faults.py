"""A search meeting bad data or a Ctrl-C: clear lines, honest exit codes, runs ended honestly.

Each test runs the real CLI (`python -m segsearch search`) on the session's Ray instance with a
tiny local dataset, and reads the sqlite MLflow store it wrote.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from segsearch.data.demo import make_demo_dataset
from segsearch.data.format import SCHEMA, shard_paths
from segsearch.data.storage import filesystem_for
from segsearch.search.trial import TRAIN_RETRIES
from tests.faults.cli import Sandbox, run_statuses, run_tags, runs_by_role, write_space

STATUS, ERROR = "segsearch.status", "segsearch.error"
CTRL_C_EPOCHS = 30


def _dataset(root: Path) -> Path:
    make_demo_dataset(str(root), n_train=16, n_val=8, size=(32, 32))
    return root


def _truncate_an_image(shard: Path, row: int = 3) -> None:
    """Cut one image's PNG bytes in half, as a broken upload would."""
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[row] = images[row][: len(images[row]) // 2]
    table = table.set_column(table.schema.get_field_index("image"), "image", [images])
    pq.write_table(table.cast(SCHEMA), shard)


def _first_shard(dataset: Path, split: str) -> Path:
    fs, root = filesystem_for(str(dataset))
    return Path(shard_paths(fs, root, split)[0])


def _search_args(space: Path, dataset: Path, root: Path, ray_address: str) -> list[str]:
    return [
        "search",
        str(space),
        "--dataset",
        str(dataset),
        "--storage",
        str(root / "runs"),
        "--address",
        ray_address,
        "--tracking-uri",
        f"sqlite:///{root}/mlflow.db",
    ]


def test_a_corrupt_train_image_fails_its_trial_at_once_and_the_search_says_why(
    ray_cluster: str, tmp_path: Path
) -> None:
    dataset = _dataset(tmp_path / "data")
    _truncate_an_image(_first_shard(dataset, "train"))
    space = write_space(tmp_path / "space.yaml", name="corrupt-train")
    box = Sandbox.under(tmp_path / "box")

    done = box.run(*_search_args(space, dataset, tmp_path, ray_cluster), timeout=300)

    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if " failed: " in line]
    assert len(failed) == 2, done.stdout  # the trial's progress line and the closing summary
    shard = _first_shard(dataset, "train").name
    assert all(shard in line and "row 3" in line and "does not decode" in line for line in failed)
    assert done.stderr.strip().splitlines()[-1].startswith("error: all 1 trials failed (")
    assert "Traceback" not in done.stdout + done.stderr
    (error_file,) = (tmp_path / "runs" / "corrupt-train").glob("*/error.txt")
    attempts = error_file.read_text().split("Failure #")[1:]
    # A one-worker trial trains in Tune's process, which Tune retries once (a killed process);
    # the retry fails at once with the first attempt's line, without reading the data again.
    assert 1 <= len(attempts) <= 1 + TRAIN_RETRIES, "Tune retried a trial with bad data"
    assert all("row 3" in attempt and "does not decode" in attempt for attempt in attempts)
    assert "RUNNING" not in run_statuses(tmp_path / "mlflow.db")
    assert runs_by_role(tmp_path / "mlflow.db") == {"search": ["FAILED"], "trial": ["FAILED"]}
    assert box.stray_files() == []


@pytest.mark.parametrize("fault", ["truncated val image", "deleted val shard"])
def test_bad_data_met_after_the_parent_run_opened_fails_it_in_one_line(
    fault: str, ray_cluster: str, tmp_path: Path
) -> None:
    dataset = _dataset(tmp_path / "data")
    shard = _first_shard(dataset, "val")
    if fault == "deleted val shard":
        shard.unlink()
    else:
        _truncate_an_image(shard, row=0)
    space = write_space(tmp_path / "space.yaml", name="bad-val")
    box = Sandbox.under(tmp_path / "box")

    done = box.run(*_search_args(space, dataset, tmp_path, ray_cluster))

    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "val" in lines[0], lines
    assert "Traceback" not in done.stdout + done.stderr
    if fault == "deleted val shard":  # found with the footers, before a run opens
        assert not (tmp_path / "mlflow.db").exists()
    else:  # found when the overlay images are decoded, after the parent run opened
        assert runs_by_role(tmp_path / "mlflow.db") == {"search": ["FAILED"]}
        (reason,) = run_tags(tmp_path / "mlflow.db", ERROR).values()
        assert reason == lines[0].removeprefix("error: ")
    assert box.stray_files() == []


def test_ctrl_c_exits_130_marks_runs_killed_and_resume_finishes(
    ray_cluster: str, tmp_path: Path
) -> None:
    dataset = _dataset(tmp_path / "data")
    # Enough epochs that the search is still training when the SIGINT arrives after epoch 1.
    space = write_space(tmp_path / "space.yaml", name="ctrl-c", epochs=CTRL_C_EPOCHS)
    box = Sandbox.under(tmp_path / "box")
    command = [sys.executable, "-m", "segsearch"]
    command += _search_args(space, dataset, tmp_path, ray_cluster)
    driver = subprocess.Popen(
        command, cwd=box.cwd, env=box.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert driver.stdout is not None
    deadline = time.monotonic() + 300
    for line in driver.stdout:
        if f" epoch 1/{CTRL_C_EPOCHS} " in line or time.monotonic() > deadline:
            break
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)

    assert driver.returncode == 130, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("interrupted — continue with `segsearch search ")
    resume = shlex.split(message.split("`")[1])
    args = _search_args(space, dataset, tmp_path, ray_cluster)
    assert resume == ["segsearch", *args[:4], "--name", "ctrl-c", *args[4:], "--resume"]
    runs = runs_by_role(tmp_path / "mlflow.db")
    assert runs["search"] == ["KILLED"] and runs["trial"] == ["KILLED"], runs
    assert set(run_tags(tmp_path / "mlflow.db", STATUS).values()) == {"interrupted"}
    assert "stopped early" not in out and "best trial" not in out

    again = box.run(*resume[1:], timeout=400)

    assert again.returncode == 0, again.stderr[-3000:]
    runs = runs_by_role(tmp_path / "mlflow.db")
    assert runs == {"search": ["FINISHED"], "trial": ["FINISHED"]}, runs
