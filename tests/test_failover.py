"""What the search says when a trial's Train run is started again (tests/test_cluster.py runs the
real thing on two nodes)."""

from __future__ import annotations

from ray.train import WorkerGroupError

from segsearch.search.failover import (
    RESTART_REASON_KEY,
    RESTARTS_KEY,
    WORKER_NODES_KEY,
    failure_reason,
    restart_line,
)
from segsearch.search.progress import TrialProgress
from segsearch.search.trial import TUNE_RETRIES

NODE_A = "a1" * 28
NODE_B = "b2" * 28


class _Trial:
    trial_id = "t_00000"


def _result(epoch: int, restarts: int, nodes: str, reason: str | None = None) -> dict:
    result = {
        "training_iteration": epoch,
        "val_miou": 0.5,
        RESTARTS_KEY: restarts,
        WORKER_NODES_KEY: nodes,
    }
    if reason:
        result[RESTART_REASON_KEY] = reason
    return result


def test_the_first_result_after_a_restart_says_from_which_checkpoint_and_why():
    lines: list[str] = []
    progress = TrialProgress(metric="val_miou", epochs=3, echo=lines.append)
    reason = f"node {NODE_B[:8]} lost"

    progress.on_trial_result(0, [], _Trial(), _result(1, 0, f"{NODE_A},{NODE_B}"))
    # The restored run reports its checkpoint's epoch again (train.py), with the old nodes.
    progress.on_trial_result(0, [], _Trial(), _result(1, 1, f"{NODE_A},{NODE_B}", reason))
    progress.on_trial_result(0, [], _Trial(), _result(2, 1, f"{NODE_A},{NODE_A}", reason))
    progress.on_trial_result(0, [], _Trial(), _result(3, 1, f"{NODE_A},{NODE_A}", reason))

    restarted = [line for line in lines if "restarted" in line]
    assert restarted == [
        f"trial t_00000 restarted from its checkpoint of epoch 1 after: node {NODE_B[:8]} lost"
    ]
    assert len(lines) == 5  # four epoch lines and one restart line


def test_a_restart_whose_first_result_is_a_new_epoch_resumed_from_the_one_before():
    line = restart_line("t_1", _result(3, 1, NODE_A, "worker crashed"), seen_epoch=2)
    assert line == "trial t_1 restarted from its checkpoint of epoch 2 after: worker crashed"


def test_a_restart_before_any_checkpoint_starts_from_the_beginning():
    line = restart_line("t_1", _result(1, 1, NODE_A, "worker crashed"), seen_epoch=0)
    assert "restarted from the start" in line and line.endswith("after: worker crashed")


def test_failure_reason_names_the_dead_node_of_a_worker():
    # The text Ray's GCS gives an actor whose node died (strings of gcs_server, Ray 2.60).
    died = RuntimeError(f"The actor died because its node has died. Node Id: {NODE_B}")
    failure = WorkerGroupError("worker 1 died", {0: RuntimeError("gloo: peer closed"), 1: died})
    assert failure_reason(failure) == f"node {NODE_B[:8]} lost"


def test_failure_reason_without_a_dead_node_is_the_errors_last_line():
    failure = WorkerGroupError("rank 0 raised", {0: RuntimeError("Connection closed by peer")})
    assert failure_reason(failure) == "Connection closed by peer"


def test_a_trial_tune_starts_again_says_from_which_epoch_and_which_node_was_lost(tmp_path):
    """The trial's own process (a Train run's driver, or a one-worker trial) died with its
    node: Tune starts the trial again, and the search says so."""
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Traceback (most recent call last):\nray.exceptions.ActorDiedError: The actor died "
        f"unexpectedly. The actor is dead because its node has died. Node Id: {NODE_B}\n"
    )
    trial = type("Trial", (), {"trial_id": "t_1", "error_file": str(error_file)})()
    trial.last_result = {"epoch": 2, "training_iteration": 2}
    lines: list[str] = []

    TrialProgress(metric="val_miou", epochs=3, echo=lines.append).on_trial_recover(0, [], trial)

    assert lines == [
        f"trial t_1 restarted from its checkpoint of epoch 2 after: node {NODE_B[:8]} lost"
    ]


def test_tune_starts_a_trial_again_when_its_own_process_is_lost():
    assert TUNE_RETRIES >= 1
