"""A trial's Train run started again after a failure that is not the data's (a lost node, a dead
worker), and how the search says so: every report carries where the workers ran and how often the
run was restarted, and the driver prints one line at the first report after a restart."""

from __future__ import annotations

import re
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from segsearch.errors import last_line
from segsearch.search import placement

#: Result keys: the workers' nodes in rank order (comma-separated node ids), the restarts of the
#: trial's Train run so far, and what the last restart was after.
WORKER_NODES_KEY = "worker_nodes"
RESTARTS_KEY = "train_restarts"
RESTART_REASON_KEY = "restart_reason"
#: Characters of a node id shown in output (Ray's own logs shorten them the same way).
SHORT_ID = 8


class TrialReport(TuneReportCallback):
    """Tune's report of the Train run (rank 0's metrics), plus every worker's node and the
    run's restarts so far."""

    def __init__(self, *, restarts: int = 0, reason: str | None = None) -> None:
        super().__init__()
        self.extra: dict[str, Any] = {RESTARTS_KEY: restarts}
        if reason:
            self.extra[RESTART_REASON_KEY] = reason

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        nodes = ",".join(str(worker.get(placement.NODE_KEY, "?")) for worker in metrics)
        first = {**metrics[0], **self.extra, WORKER_NODES_KEY: nodes}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def restart_line(trial_id: str, result: dict[str, Any], *, seen_epoch: int) -> str:
    """What the search prints at the first result after a restart of the trial's Train run.

    A run restored from a checkpoint first reports that checkpoint's epoch again (train.py), so
    a first result at or before the last epoch seen (`seen_epoch`) is the restored one; a later
    one is the first epoch trained after it. Where the workers run now shows in the next results
    (`worker_nodes`), not in a repeated one.
    """
    epoch = int(result.get("epoch") or result.get("training_iteration", 1))
    restored = epoch if epoch <= seen_epoch else epoch - 1
    reason = result.get(RESTART_REASON_KEY) or "unknown failure"
    resumed = f"its checkpoint of epoch {restored}" if restored > 0 else "the start"
    return f"trial {trial_id} restarted from {resumed} after: {reason}"


def recover_line(trial_id: str, error_text: str, last_result: dict[str, Any]) -> str:
    """What the search prints when Tune starts a trial again after its own process died (a
    one-worker trial, or a Train run's driver, on a lost node): from its last checkpoint."""
    epoch = int(last_result.get("epoch") or 0)
    resumed = f"its checkpoint of epoch {epoch}" if epoch else "the start"
    lost = _lost_nodes(error_text)
    lines = [line.strip() for line in error_text.strip().splitlines() if line.strip()]
    reason = lost or (lines[-1] if lines else "unknown failure")
    return f"trial {trial_id} restarted from {resumed} after: {reason}"


def failure_reason(err: BaseException) -> str:
    """Why a Train run failed, in one line: the node(s) that died under its workers, when Ray
    says so, else the last line of the first failed worker's error (or of the error itself)."""
    failures = getattr(err, "worker_failures", None) or {}
    text = "\n".join(str(failure) for failure in [err, *failures.values()])
    return _lost_nodes(text) or last_line(failures[min(failures)] if failures else err)


def _lost_nodes(text: str) -> str | None:
    """ "node X lost" for the nodes an error says died, or None."""
    lost = sorted({short(node) for node in _DEAD_NODE.findall(text)})
    return f"node {', '.join(lost)} lost" if lost else None


#: How Ray names the node in the error of an actor (a Train worker) whose node died.
_DEAD_NODE = re.compile(r"node (?:has )?died[^\n]*?[Nn]ode [Ii][Dd]:? ?([0-9a-f]{16,})")


def short(node_id: str) -> str:
    return node_id[:SHORT_ID]
