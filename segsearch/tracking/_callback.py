"""The Tune callback: relays trial events from the Tune driver to the search's tracker.

Tune pickles its callbacks into the experiment's tuner.pkl, and `Tuner.restore` runs the unpickled
ones, not new ones. So a callback pickles as its tracker's key (tracking URI, search name) and,
unpickled in a resumed search, attaches to the tracker that process started for that search.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from segsearch.tracking._writer import masked_first_line

if TYPE_CHECKING:
    from segsearch.tracking._tracker import SearchTracker

_LIVE: weakref.WeakValueDictionary[tuple[str, str], SearchTracker] = weakref.WeakValueDictionary()


def register(tracker: SearchTracker) -> None:
    """Make `tracker` the one that restored callbacks with its key attach to."""
    _LIVE[tracker.key] = tracker


def unregister(tracker: SearchTracker) -> None:
    if _LIVE.get(tracker.key) is tracker:
        del _LIVE[tracker.key]


class TrackingCallback(Callback):
    """Relays Tune's trial events to a SearchTracker; never raises into Tune, never waits on MLflow.

    The tracker only queues MLflow calls here (its writer thread runs them), so an event returns
    at once even while the tracking server hangs.
    """

    def __init__(self, tracker: SearchTracker) -> None:
        self.tracker = tracker
        self._seen_trials = False

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _restored_callback, (self.tracker.key,)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._seen_trials:
            self._seen_trials = True
            try:
                self.tracker.end_lost_runs({trial.trial_id for trial in trials})
            except Exception as err:
                reason = masked_first_line(err)
                self.tracker.writer.echo(f"warning: tracking lost trials failed: {reason}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._guard(trial):
            self.tracker.trial_started(trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        with self._guard(trial):
            self.tracker.trial_result(trial.trial_id, result, trial.storage.storage_filesystem)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._guard(trial):
            self.tracker.trial_ended(trial.trial_id, trial.last_result or {}, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._guard(trial):
            self.tracker.trial_ended(trial.trial_id, trial.last_result or {}, _error_of(trial))

    @contextlib.contextmanager
    def _guard(self, trial: Any) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            where = f"trial {trial.trial_id}"
            self.tracker.writer.note_dropped(f"{where}: event ({masked_first_line(err)})")
            self.tracker.writer.echo(f"warning: tracking {where} failed: {masked_first_line(err)}")


def _error_of(trial: Any) -> str:
    """The trial's error.txt: Tune writes it on the driver before it calls on_trial_error."""
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return trial.get_error() or "trial failed (no error text)"


def _restored_callback(key: tuple[str, str]) -> Callback:
    """The live tracker's callback for `key`, or a silent one when no tracker was started."""
    tracker = _LIVE.get(key)
    return tracker.tune_callback() if tracker is not None else Callback()
