"""MLflow calls that never stop a search: a failed call waits in a queue and is tried again later.

Calls run in order on the caller's thread (the Tune driver), so a SQLite store has one writer. When
a call fails and the store does not answer either, the store is "down": the queue keeps growing,
and it is retried at most every `retry_every_s` (at the next event after that) and once more at
the end. A call that fails while the store answers is refused for itself: it is dropped, with why.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from segsearch.mlflow_uri import check_tracking_server
from segsearch.tracking._clean import mask

#: MLflow's client retries a dead server for about four minutes per call by default; the tracker
#: retries on its own schedule instead, so each call gives up in seconds. Set only where the user
#: has not set them, and only around the tracker's own calls.
BOUNDED_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


@contextlib.contextmanager
def bounded_requests() -> Iterator[None]:
    """Let MLflow HTTP calls fail within seconds inside the block (see BOUNDED_REQUESTS)."""
    added = {key: value for key, value in BOUNDED_REQUESTS.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@dataclass
class _Call:
    what: str
    call: Callable[[MlflowClient], Any]


class Writer:
    """Runs MLflow calls now when the store answers, later when it does not."""

    def __init__(
        self, tracking_uri: str, *, echo: Callable[[str], None], retry_every_s: float
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.echo = echo
        self.retry_every_s = retry_every_s
        self.dropped: list[str] = []
        self._queue: deque[_Call] = deque()
        self._down_since: float | None = None
        self._next_try = 0.0

    def now(self, call: Callable[[MlflowClient], Any]) -> Any:
        """Run one call right away and let its error propagate (used before trials start)."""
        with bounded_requests():
            return call(self.client)

    def submit(self, what: str, call: Callable[[MlflowClient], Any]) -> None:
        """Queue a call (described by `what` if it never succeeds) and flush the queue."""
        self._queue.append(_Call(what, call))
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Run queued calls in order; stop at an outage. Skipped while down unless it is time."""
        if not self._queue:
            return
        if self._down_since is not None and not force and time.monotonic() < self._next_try:
            return
        while self._queue:
            item = self._queue[0]
            try:
                with bounded_requests():
                    item.call(self.client)
            except Exception as err:
                if not self._answers():
                    self._went_down(err)
                    return
                self._queue.popleft()
                self._drop(item, err)
                continue
            self._queue.popleft()
        if self._down_since is not None:
            self.echo(f"tracking: MLflow at {mask(self.tracking_uri)} answers again; caught up")
            self._down_since = None

    @property
    def pending(self) -> list[str]:
        """What is still waiting to be logged, oldest first."""
        return [item.what for item in self._queue]

    @property
    def unlogged(self) -> list[str]:
        """Everything that did not reach MLflow: dropped calls (with why), then waiting ones."""
        return [*self.dropped, *self.pending]

    def _answers(self) -> bool:
        try:
            check_tracking_server(self.tracking_uri, timeout_s=5.0)
            with bounded_requests():
                self.client.search_experiments(max_results=1)
        except Exception:  # UserError, MlflowException, OSError, a store driver's own errors
            return False
        return True

    def _went_down(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.echo(
                f"warning: MLflow at {mask(self.tracking_uri)} failed ({first_line(err)}); "
                f"training goes on, logging waits and is retried every {self.retry_every_s:g} s"
            )
        self._next_try = time.monotonic() + self.retry_every_s

    def _drop(self, item: _Call, err: BaseException) -> None:
        reason = first_line(err)
        self.dropped.append(f"{item.what} ({reason})")
        self.echo(f"warning: MLflow refused {item.what}: {reason}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message (secrets masked), or its type when it has none."""
    text = str(err).strip()
    return mask(text.splitlines()[0][:300]) if text else type(err).__name__
