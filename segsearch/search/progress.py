"""One concise line per trial event, and the final table, in place of Ray's own progress output."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from segsearch.search import failover

COST_HEADERS = {"cost_gpu_s": "GPU-s", "cost_cpu_s": "CPU-s"}
SHOWN_PARAMS = ("model.arch", "model.depth", "model.width", "model.upsample", "loss.kind")


class TrialProgress(Callback):
    """Prints `trial <id> started | epoch k/E metric=… | stopped early | finished | failed`, and
    `restarted from …` at the first result after its Train run was started again."""

    def __init__(
        self, *, metric: str, epochs: int, echo: Callable[[str], None] | None = None
    ) -> None:
        self.metric = metric
        self.epochs = epochs
        self.echo = echo or print_line
        self._restarts: dict[str, int] = {}
        self._epochs_seen: dict[str, int] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.echo(f"trial {trial.trial_id} started: {describe(trial.config)}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        restarts = result.get(failover.RESTARTS_KEY, 0)
        if restarts > self._restarts.get(trial.trial_id, 0):
            self._restarts[trial.trial_id] = restarts
            seen = self._epochs_seen.get(trial.trial_id, 0)
            self.echo(failover.restart_line(trial.trial_id, result, seen_epoch=seen))
        self._epochs_seen[trial.trial_id] = max(
            self._epochs_seen.get(trial.trial_id, 0), result_epoch(result)
        )
        epoch = result_epoch(result)
        score = result.get(self.metric, math.nan)
        speed = result.get("images_per_s", math.nan)
        self.echo(
            f"trial {trial.trial_id} epoch {epoch}/{self.epochs} {self.metric}={score:.4f} "
            f"train_loss={result.get('train_loss', math.nan):.4f} ({speed:.1f} img/s)"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = result_epoch(trial.last_result or {})
        how = "finished" if done >= self.epochs else f"stopped early after epoch {done}"
        self.echo(f"trial {trial.trial_id} {how}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error_text(trial.error_file)
        self.echo(failover.recover_line(trial.trial_id, error, trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.echo(f"trial {trial.trial_id} failed: {_last_error_line(trial.error_file)}")
        if trial.error_file:
            self.echo(f"  full traceback: {trial.error_file}")


def result_epoch(result: dict[str, Any]) -> int:
    """The epoch a Tune result is about: the trial's own `epoch`, not Tune's iteration count,
    which starts again from 1 when Tune restarts a trial (a retry, or `--resume`)."""
    epoch = result.get("epoch")
    return int(epoch if epoch is not None else result.get("training_iteration") or 0)


def print_line(line: str) -> None:
    """The default echo: a module function, so a pickled callback refers to it by name (a
    reference to the builtin `print` fails to pickle when something has wrapped `print`)."""
    print(line, flush=True)


def _last_error_line(error_file: str | None) -> str:
    """The exception line of a trial's traceback (the part that says what went wrong)."""
    lines = _error_text(error_file).strip().splitlines()
    return lines[-1].strip() if lines else "unknown error"


def _error_text(error_file: str | None) -> str:
    """A trial's error file as Tune wrote it; empty when there is none or it cannot be read."""
    try:
        return Path(error_file).read_text() if error_file else ""
    except OSError:
        return ""


def describe(config: dict[str, Any]) -> str:
    """The few parameters people scan for first, in a fixed order."""
    parts = [f"{key.split('.')[-1]}={config[key]}" for key in SHOWN_PARAMS if key in config]
    if "optim.lr" in config:
        parts.append(f"lr={config['optim.lr']:.2g}")
    return " ".join(parts)


def format_table(rows: Sequence[dict[str, Any]], *, metric: str) -> str:
    """A plain-text table of trials: id, the score of its best epoch and which epoch that was,
    the last epoch's score, epochs run, what it cost (GPU-seconds when trials held GPUs, else
    CPU-seconds, where rows have costs), and the key parameters."""
    cost = _cost_key(rows)
    header = ["trial", metric, "best epoch", "last", "epochs"]
    header += [COST_HEADERS[cost]] if cost else []
    header.append("params")
    lines = [header] + [
        [
            row["trial_id"],
            _score(row[metric]),
            "-" if row.get("best_epoch") is None else str(row["best_epoch"]),
            _score(row.get("last")),
            str(row["epochs"]),
            *([f"{row[cost]:.0f}"] if cost else []),
            describe(row["config"]),
        ]
        for row in rows
    ]
    columns = len(header) - 1
    widths = [max(len(line[i]) for line in lines) for i in range(columns)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:columns], widths, strict=True))
        + "  "
        + line[columns]
        for line in lines
    )


def _cost_key(rows: Sequence[dict[str, Any]]) -> str | None:
    if not rows or any("cost_cpu_s" not in row for row in rows):
        return None
    return "cost_gpu_s" if any(row.get("cost_gpu_s") for row in rows) else "cost_cpu_s"


def _score(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"
