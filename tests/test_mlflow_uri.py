"""Tracking URIs: resolution order, and no password in an error message."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from segsearch.cli import main
from segsearch.mlflow_uri import resolve_tracking_uri


def test_resolution_order(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_unreachable_server_error_hides_the_password():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://alice:hunter2-secret@127.0.0.1:{port}"
    result = CliRunner().invoke(main, ["promote", "s", "--model-name", "m", "--tracking-uri", uri])
    assert result.exit_code == 3
    assert "hunter2-secret" not in result.output
    assert f"alice:***@127.0.0.1:{port}" in result.output
    assert len(result.output.strip().splitlines()) == 1
