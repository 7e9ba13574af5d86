"""MLflow faults during a real Tune search: a tracking server that hangs, one that is restarted.

Training never waits on MLflow (the Tune callback only queues calls). What waited is logged once
the server answers again; what still could not be logged at the end is listed, never silently
dropped. The module runs one `mlflow server` of its own (SQLite, local artifacts) on a fixed port,
restarted in place by the last test.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from segsearch.tracking._writer import CALL_TIMEOUT_S, HEALTH_TIMEOUT_S
from tests.fixtures.mlflow_server import end_group, free_port, launch, wait_healthy
from tests.test_tracking import (
    EPOCHS,
    GOOD_LR,
    artifacts,
    image_steps,
    run_search,
    runs_of,
    start_tracker,
    steps,
)

LRS = [GOOD_LR, GOOD_LR * 2]


class Server:
    """A real `mlflow server` that can be killed (its whole process group) and started again."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on the same port and store; return once it answers /health."""
        self.process, self.uri = launch(self.workdir, self.port, str(self.workdir / "artifacts"))
        wait_healthy(self.uri, self.process, self.workdir / "server.log")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            end_group(self.process)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory) -> Iterator[Server]:
    """One server for the module (starting one takes 7 to 70 s here). Ray starts first."""
    server = Server(tmp_path_factory.mktemp("mlflow-restartable"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_hanging_server_holds_up_neither_training_nor_the_end(server, ray_cluster, tmp_path):
    started = time.monotonic()
    run_search("base", storage=str(tmp_path / "runs"), callbacks=[], **_trials(tmp_path, "base"))
    without_mlflow_s = time.monotonic() - started
    proxy = HangingProxy(server.uri)
    lines: list[str] = []
    try:
        tracker = start_tracker(proxy.uri, "tiny-hang", tmp_path, lines, retry_every_s=0.5)
        started = time.monotonic()
        hang = {("first", "epoch2"): _logged_then(tracker, proxy.hang)}
        with _Conductor(tmp_path / "flags", hang):
            results = run_search(
                "tiny-hang",
                storage=str(tmp_path / "runs"),
                callbacks=[tracker.tune_callback()],
                signals=str(tmp_path / "flags"),
                **_trials(tmp_path, "tiny-hang"),
            )
        search_s = time.monotonic() - started
        started = time.monotonic()
        summary = tracker.finish(results, metric="val_miou", mode="max")
        finish_s = time.monotonic() - started
    finally:
        proxy.close()

    assert all(r.error is None and r.metrics["epoch"] == EPOCHS for r in results)
    assert search_s < 2 * without_mlflow_s + 15, (search_s, without_mlflow_s)
    assert finish_s < 2 * (CALL_TIMEOUT_S + HEALTH_TIMEOUT_S) + 20, finish_s
    assert any("training goes on" in line for line in lines)
    first, second = sorted(r.metrics["trial_id"] for r in results)
    for item in (
        f"trial {first}: metrics of epoch 2",
        f"trial {first}: metrics of epoch 3",
        f"trial {first}: image overlays of epoch 2",
        f"trial {second}: run and params",
        f"trial {second}: metrics of epoch 3",
        "search run: end",
    ):
        assert item in summary.unlogged
    warning = next(line for line in lines if "not logged" in line)
    kept = Path(re.search(r"files kept in (\S+)\)", warning).group(1))
    assert (kept / first / "epoch_003" / "overlays.png").is_file()
    client = MlflowClient(tracking_uri=server.uri)
    parent, children = runs_of(client, "tiny-hang")
    assert [steps(client, c.info.run_id) for c in children] == [[1]]
    assert parent.info.status == "RUNNING"


def test_hanging_server_gets_what_waited_once_it_answers(server, ray_cluster, tmp_path):
    proxy = HangingProxy(server.uri)
    lines: list[str] = []
    try:
        tracker = start_tracker(proxy.uri, "tiny-unhang", tmp_path, lines, retry_every_s=0.5)

        def answer_again() -> None:
            _wait_for(lambda: any("training goes on" in line for line in lines))
            proxy.forward()

        actions = {
            ("first", "epoch2"): _logged_then(tracker, proxy.hang),
            ("second", "epoch1"): answer_again,
        }
        with _Conductor(tmp_path / "flags", actions):
            results = run_search(
                "tiny-unhang",
                storage=str(tmp_path / "runs"),
                callbacks=[tracker.tune_callback()],
                signals=str(tmp_path / "flags"),
                **_trials(tmp_path, "tiny-unhang"),
            )
        summary = tracker.finish(results, metric="val_miou", mode="max")
    finally:
        proxy.close()

    assert summary.unlogged == ()
    assert any("answers again; caught up" in line for line in lines)
    _assert_all_logged(MlflowClient(tracking_uri=server.uri), "tiny-unhang")
    assert summary.model_uri


def test_restarted_server_gets_the_metrics_of_its_downtime(server, ray_cluster, tmp_path):
    lines: list[str] = []
    tracker = start_tracker(server.uri, "tiny-restart", tmp_path, lines, retry_every_s=0.5)
    actions = {
        ("first", "epoch2"): _logged_then(tracker, server.kill),
        ("second", "epoch1"): server.start,
    }
    with _Conductor(tmp_path / "flags", actions):
        results = run_search(
            "tiny-restart",
            storage=str(tmp_path / "runs"),
            callbacks=[tracker.tune_callback()],
            signals=str(tmp_path / "flags"),
            **_trials(tmp_path, "tiny-restart"),
        )
    summary = tracker.finish(results, metric="val_miou", mode="max")

    assert all(r.error is None and r.metrics["epoch"] == EPOCHS for r in results)
    assert any("training goes on" in line for line in lines)
    assert any("answers again; caught up" in line for line in lines)
    assert summary.unlogged == ()
    _assert_all_logged(MlflowClient(tracking_uri=server.uri), "tiny-restart")


def _trials(tmp_path: Path, name: str) -> dict[str, Any]:
    """Two trials one after the other, every epoch run (no early stopping)."""
    (tmp_path / "flags").mkdir(exist_ok=True)
    return {"root": str(tmp_path / name / "checkpoints"), "lrs": LRS, "asha": False}


def _assert_all_logged(client: MlflowClient, name: str) -> None:
    parent, children = runs_of(client, name)
    assert len(children) == len(LRS)
    for child in children:
        assert steps(client, child.info.run_id) == list(range(1, EPOCHS + 1))
        assert child.info.status == "FINISHED"
        assert "overlays.png" in artifacts(client, child.info.run_id)
        every_epoch = list(range(1, EPOCHS + 1))
        assert image_steps(client, child.info.run_id) == {
            "overlays": every_epoch,
            "confusion": every_epoch,
        }
    assert parent.info.status == "FINISHED"


def _logged_then(tracker: Any, fault: Callable[[], None]) -> Callable[[], None]:
    """Inject `fault` once everything so far is logged, so the test knows what came before it."""

    def act() -> None:
        assert tracker.drain(60)
        fault()

    return act


def _wait_for(condition: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


class _Conductor(threading.Thread):
    """Runs an action when a trial reaches an epoch, then lets the trial go on.

    Keys are ("first" | "second", "epochN"): trials by the order they announce themselves.
    """

    def __init__(self, folder: Path, actions: dict[tuple[str, str], Callable[[], None]]) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.actions = actions
        self.trials: list[str] = []
        self.stopping = threading.Event()

    def __enter__(self) -> _Conductor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        self.join()

    def run(self) -> None:
        while not self.stopping.is_set():
            for flag in sorted(self.folder.glob("*-epoch*"), key=lambda p: p.stat().st_mtime):
                if flag.name.endswith(".ack") or Path(f"{flag}.ack").exists():
                    continue
                trial_id, _, epoch = flag.name.rpartition("-")
                if trial_id not in self.trials:
                    self.trials.append(trial_id)
                order = ("first", "second", "later")[min(self.trials.index(trial_id), 2)]
                action = self.actions.get((order, epoch))
                if action is not None:
                    action()
                Path(f"{flag}.ack").touch()
            time.sleep(0.05)


class HangingProxy:
    """A real HTTP reverse proxy to the MLflow server that can start hanging: it then accepts
    every request and never answers, until it is told to forward again."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.hanging = threading.Event()
        self.released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _forwarder(self))
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def hang(self) -> None:
        self.released.clear()
        self.hanging.set()

    def forward(self) -> None:
        """Forward again; requests held so far are closed unanswered (their clients gave up)."""
        self.hanging.clear()
        self.released.set()

    def close(self) -> None:
        self.forward()
        self._server.shutdown()
        self._server.server_close()


def _forwarder(proxy: HangingProxy) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        def forward(self) -> None:
            if proxy.hanging.is_set():
                proxy.released.wait()
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in ("host", "connection", "transfer-encoding", "content-length")
            }
            connection = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            connection.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Forward
