"""Running the `segsearch` CLI as a user would, and checking what a failed command left behind."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

#: A space small enough for a trial of a few seconds on a CPU.
TINY_SPACE = {
    "name": "tiny",
    "trials": 1,
    "epochs": 2,
    "scheduler": {"kind": "none"},
    "sampler": {"kind": "random", "seed": 0},
    "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2, "model.width": 4},
    "space": {"model.arch": {"choice": ["fcn", "unet"]}},
}


@dataclass
class Sandbox:
    """A working directory and a TMPDIR of its own for one CLI run, so leftovers are visible."""

    cwd: Path
    tmp: Path

    @classmethod
    def under(cls, root: Path) -> Sandbox:
        box = cls(root / "cwd", root / "tmp")
        box.cwd.mkdir(parents=True)
        box.tmp.mkdir()
        return box

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1"}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "segsearch", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stray_files(self) -> list[str]:
        """What the command left in the working directory or as segsearch temp folders."""
        left = [p.name for p in self.cwd.iterdir()]
        left += [p.name for p in self.tmp.glob("segsearch-*")]
        return sorted(left)


def write_space(path: Path, **overrides: object) -> Path:
    path.write_text(yaml.safe_dump({**TINY_SPACE, **overrides}))
    return path


def run_statuses(database: Path) -> list[str]:
    """The status of every MLflow run in a sqlite store (read directly: a client would migrate
    or create the database)."""
    if not database.exists():
        return []
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("select status from runs")]


def run_tags(database: Path, key: str) -> dict[str, str]:
    """Run id → value of tag `key` in a sqlite MLflow store."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute("select run_uuid, value from tags where key = ?", (key,))
        return dict(rows.fetchall())


def runs_by_role(database: Path) -> dict[str, list[str]]:
    """`segsearch.role` (search / trial) → the sorted statuses of its runs in a sqlite store."""
    query = (
        "select tags.value, runs.status from runs join tags on tags.run_uuid = runs.run_uuid "
        "and tags.key = 'segsearch.role'"
    )
    found: dict[str, list[str]] = {}
    with sqlite3.connect(database) as connection:
        for role, status in connection.execute(query):
            found.setdefault(role, []).append(status)
    return {role: sorted(statuses) for role, statuses in found.items()}
