"""MLflow calls that never stop a search: one background thread runs them, in order.

The Tune driver only queues calls (`submit` never blocks), so a slow or hanging tracking server
cannot hold up training; one thread runs every call, so a SQLite store still has one writer. When
a call fails and the store does not answer either, the store is "down": the queue keeps growing
and is retried every `retry_every_s`. A call that fails while the store answers is refused for
itself: it is dropped, with why; unless it failed on the way (a timeout, a broken connection),
then it is tried again at once, up to TRIES_ON_THE_WAY times. `drain` waits (bounded) for the
queue; `close` stops the thread and leaves what is still queued listed as not logged.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from segsearch.errors import first_line
from segsearch.mlflow_uri import check_tracking_server
from segsearch.tracking._clean import mask

#: Seconds one MLflow HTTP request may wait for an answer before it fails (a hanging server).
CALL_TIMEOUT_S = 10
#: Seconds the server's /health may take when a call failed: a live server answers at once.
HEALTH_TIMEOUT_S = 3
#: Tries of a call that fails on the way (timeout, broken connection) while the store answers.
TRIES_ON_THE_WAY = 3
#: MLflow's client retries a dead server for minutes per call by default; the tracker retries on
#: its own schedule instead, so each call gives up within CALL_TIMEOUT_S. MLflow reads these from
#: the environment at each request, so they are set in this process while a writer is open,
#: only where the user has not set them, and removed when the last open one is closed (or gone).
BOUNDED_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CALL_TIMEOUT_S),
}


class _BoundedRequests:
    """BOUNDED_REQUESTS in os.environ while at least one writer is open (counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._added: list[str] = []

    def acquire(self) -> None:
        with self._lock:
            if self._open == 0:
                self._added = [key for key in BOUNDED_REQUESTS if key not in os.environ]
                os.environ.update({key: BOUNDED_REQUESTS[key] for key in self._added})
            self._open += 1

    def release(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                for key in self._added:
                    os.environ.pop(key, None)
                self._added = []


_BOUNDED = _BoundedRequests()


@dataclass
class _Call:
    what: str
    call: Callable[[MlflowClient], Any]
    failed_on_the_way: int = 0


class Writer:
    """Runs MLflow calls on its own thread: now when the store answers, later when it does not."""

    def __init__(
        self, tracking_uri: str, *, echo: Callable[[str], None], retry_every_s: float
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.echo = echo
        self.retry_every_s = retry_every_s
        self._dropped: list[str] = []
        self._queue: deque[_Call] = deque()
        self._changed = threading.Condition()
        self._down_since: float | None = None
        self._next_try = 0.0
        self._try_now = False
        self._failed_tries = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        _BOUNDED.acquire()
        self._release_bounded = weakref.finalize(self, _BOUNDED.release)

    def now(self, call: Callable[[MlflowClient], Any]) -> Any:
        """Run one call on the caller's thread and let its error propagate.

        Only before the first `submit` (opening the search), so calls never run concurrently.
        """
        if self._thread is not None:
            raise RuntimeError("Writer.now after the first submit")
        return call(self.client)

    def submit(self, what: str, call: Callable[[MlflowClient], Any]) -> None:
        """Queue a call (described by `what` if it never succeeds); returns at once."""
        with self._changed:
            if self._closed:
                self._dropped.append(f"{what} (tracking already closed)")
                return
            self._queue.append(_Call(what, call))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="segsearch-mlflow-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued is logged; True when it is.

        While the store is down, this tries it once more right away and returns when that try
        fails too; it never waits longer than `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            failed_before = self._failed_tries
            self._try_now = True
            self._changed.notify_all()
            while self._queue and self._failed_tries == failed_before:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._changed.wait(left)
            return not self._queue

    def close(self) -> None:
        """Stop the thread after its current call; what is still queued stays listed."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._release_bounded()

    def note_dropped(self, what: str) -> None:
        """List something that will never be logged (with why): a file that could not be made."""
        with self._changed:
            self._dropped.append(what)

    @property
    def pending(self) -> list[str]:
        """What is still waiting to be logged (the call running now first), oldest first."""
        with self._changed:
            return [item.what for item in self._queue]

    @property
    def unlogged(self) -> list[str]:
        """Everything that did not reach MLflow: dropped calls (with why), then waiting ones."""
        with self._changed:
            return [*self._dropped, *(item.what for item in self._queue)]

    def _run(self) -> None:
        """The writer thread: the oldest call, again and again, until closed."""
        while True:
            item = self._next_call()
            if item is None:
                return
            err, down = self._attempt(item)
            with self._changed:
                if self._closed:
                    return
                self._settle(item, err, down=down)
                self._changed.notify_all()

    def _next_call(self) -> _Call | None:
        """Wait until there is a call to run and it is time to run it; None once closed."""
        with self._changed:
            while not self._closed:
                wait_s = self._wait_s()
                if wait_s == 0.0:
                    self._try_now = False
                    return self._queue[0]
                self._changed.wait(wait_s)
            return None

    def _wait_s(self) -> float | None:
        """0 to run the next call now, else how long to wait (None: until something changes)."""
        if not self._queue:
            return None
        if self._down_since is None or self._try_now:
            return 0.0
        return max(0.0, self._next_try - time.monotonic())

    def _attempt(self, item: _Call) -> tuple[BaseException | None, bool]:
        """Run one call: (its error or None, whether the store is down)."""
        try:
            item.call(self.client)
        except Exception as err:
            return err, not self._answers()
        return None, False

    def _settle(self, item: _Call, err: BaseException | None, *, down: bool) -> None:
        """Record how one call went (the lock is held): logged, refused, or the store is down."""
        if err is not None and down:
            self._failed_tries += 1
            self._went_down(err)
            return
        if err is not None and _on_the_way(err):
            item.failed_on_the_way += 1
            if item.failed_on_the_way < TRIES_ON_THE_WAY:
                return
        self._queue.popleft()
        if err is not None:
            self._drop(item, err)
        self._next_try = 0.0
        if self._down_since is not None and not self._queue:
            self.echo(f"tracking: MLflow at {mask(self.tracking_uri)} answers again; caught up")
            self._down_since = None

    def _answers(self) -> bool:
        try:
            check_tracking_server(self.tracking_uri, timeout_s=HEALTH_TIMEOUT_S)
            self.client.search_experiments(max_results=1)
        except Exception:  # UserError, MlflowException, OSError, a store driver's own errors
            return False
        return True

    def _went_down(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.echo(
                f"warning: MLflow at {mask(self.tracking_uri)} failed ({masked_first_line(err)}); "
                f"training goes on, logging waits and is retried every {self.retry_every_s:g} s"
            )
        self._next_try = time.monotonic() + self.retry_every_s

    def _drop(self, item: _Call, err: BaseException) -> None:
        reason = masked_first_line(err)
        self._dropped.append(f"{item.what} ({reason})")
        self.echo(f"warning: MLflow refused {item.what}: {reason}")


def _on_the_way(err: BaseException) -> bool:
    """Whether a call failed in transport (MLflow wraps requests' errors, which are OSErrors)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def masked_first_line(err: BaseException) -> str:
    """An error's first line with secrets masked and cut to 300 characters: what tracking says
    about a failed MLflow call (its text may hold a URI with a password)."""
    return mask(first_line(err)[:300])
