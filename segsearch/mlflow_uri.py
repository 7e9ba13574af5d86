"""Where MLflow lives: one resolution rule for every command, and a fast reachability check."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from segsearch.errors import ServiceUnavailable, UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(value: str | None) -> str:
    """The --tracking-uri value, else $MLFLOW_TRACKING_URI, else the embedded sqlite:///mlflow.db.

    The SQLite default keeps the model registry working without a server (it is relative to the
    working directory, like `mlflow ui --backend-store-uri sqlite:///mlflow.db`).
    """
    return value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_server(uri: str, *, timeout_s: float = 10.0, existing: bool = False) -> None:
    """Fail in seconds with ServiceUnavailable when an http(s) tracking server does not answer
    /health.

    MLflow's own client retries a dead server for minutes before it gives up; this check runs
    first so a wrong URI or a stopped server is one clear line. With `existing` (commands that
    only read), a sqlite:/// store must already exist: MLflow would create an empty one.
    """
    if existing and uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :].split("?")[0])
        if not path.is_file():
            raise UserError(
                f"no MLflow database at {path} (tracking URI {uri}); run from the folder that "
                "holds it or pass --tracking-uri / MLFLOW_TRACKING_URI"
            )
    if not uri.startswith(("http://", "https://")):
        return
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise ServiceUnavailable(
        f"MLflow tracking server {without_password(uri)} is unreachable ({problem}); start it or "
        "pass another --tracking-uri / MLFLOW_TRACKING_URI"
    )


def without_password(uri: str) -> str:
    """The URI as it may be shown: a `user:password@` part loses its password."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
