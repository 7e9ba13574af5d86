"""`segsearch search` as a separate process with its own local Ray, and the end of all of it.

Each run starts in a new process session and carries a marker variable that every process it
spawns (Ray's GCS, raylet, workers) inherits, so a test can find, measure and kill exactly its
own processes, never another Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

MARKER = "SEGSEARCH_FAULT_RUN"
#: Ray's variables that would make the CLI join another Ray instead of starting its own.
_RAY_JOIN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
KILL_TIMEOUT_S = 30


def search_command(space_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "segsearch", "search", str(space_file), *args]


def start(command: Sequence[str], *, tag: str) -> subprocess.Popen:
    """Start `command` in its own session, marked by `tag`, with a Ray temp dir of its own."""
    env = {k: v for k, v in os.environ.items() if k not in _RAY_JOIN}
    env.update(
        PYTHONUNBUFFERED="1",
        RAY_TMPDIR=tempfile.mkdtemp(prefix="rf-", dir="/tmp"),  # short: Ray's socket paths
        **{MARKER: tag},
    )
    return subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def processes(run: subprocess.Popen, tag: str) -> list[int]:
    """Live processes of the run: in its session or carrying its marker (zombies excluded)."""
    wanted = f"{MARKER}={tag}".encode()
    found = []
    for pid, (state, _ppid, sid) in _process_table().items():
        if state == "Z" or pid == os.getpid():
            continue
        try:
            if sid == run.pid or wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (a Ray started in this process: GCS, raylet, its workers)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (state, ppid, _sid) in table.items():
        if state != "Z":
            children.setdefault(ppid, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def command_line(pid: int) -> str:
    """The process's title as Ray sets it (ray::RayTrainWorker...), '' once it is gone."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def kill_all(run: subprocess.Popen, tag: str) -> None:
    """SIGKILL the run's process group and every process it left; fail if one survives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while left := processes(run, tag):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the killed search still alive: {left}")
        time.sleep(0.2)
    run.wait()


def memory(pids: Iterable[int]) -> tuple[int, int]:
    """Summed (RSS, PSS) of `pids` in bytes. RSS counts shared pages (torch's libraries) once per
    process, an upper bound; PSS splits them among their users. Gone processes count 0."""
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("Rss", "Pss"):
                    kib = int(value.split()[0]) * 1024
                    rss, pss = (rss + kib, pss) if key == "Rss" else (rss, pss + kib)
    return rss, pss


def _process_table() -> dict[int, tuple[str, int, int]]:
    """pid → (state, parent pid, session id) of every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid, _pgrp, sid = stat[stat.rindex(")") + 2 :].split()[:4]
        table[int(entry.name)] = (state, int(ppid), int(sid))
    return table
