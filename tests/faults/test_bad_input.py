"""Bad input to the CLI: exit 2 (3 for a service that does not answer), one line on stderr
naming the culprit, nothing left behind.

Every case runs `python -m segsearch` in a working directory and TMPDIR of its own; none may leave
a traceback, a run RUNNING in MLflow, a `segsearch-runs/` folder or a `segsearch-tracking-*`
staging folder. (The dataset rows are in test_bad_data.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from segsearch.data.demo import make_demo_dataset
from tests.faults.cli import Sandbox, run_statuses, write_space

#: Seconds a refused command may take (imports and, for the resource rows, joining Ray).
FAST_S = 60


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("bad-input") / "data"
    make_demo_dataset(str(root), n_train=16, n_val=8, size=(32, 32))
    return str(root)


def _space(root: Path, **overrides: object) -> str:
    return str(write_space(root / "space.yaml", **overrides))


def _malformed_yaml(root: Path) -> str:
    path = root / "space.yaml"
    path.write_text("name: tiny\nspace: {model.arch: {choice: [fcn, unet]\n")
    return str(path)


def _with_space(**space: object):
    def build(root: Path) -> str:
        return _space(root, space={"model.arch": {"choice": ["fcn"]}, **space})

    return build


def _search(space, *extra: str, tracking: bool = True):
    """A `segsearch search` command line for a case (the dataset and Ray filled in later)."""

    def args(root: Path, dataset: str, ray_address: str) -> list[str]:
        line = ["search", space(root), "--dataset", dataset, "--address", ray_address, *extra]
        if tracking:
            line += ["--tracking-uri", f"sqlite:///{root}/mlflow.db"]
        return [part.replace("{root}", str(root)) for part in line]

    return args


def _predict(register: bool):
    def args(root: Path, dataset: str, ray_address: str) -> list[str]:
        uri = f"sqlite:///{root}/mlflow.db"
        client = MlflowClient(uri)  # the store exists, with or without the model
        if register:
            client.create_registered_model("seg")
        else:
            client.search_registered_models()
        return ["predict", "models:/seg@nope", dataset, str(root / "out"), "--tracking-uri", uri]

    return args


def _under_a_file(root: Path, dataset: str, ray_address: str) -> list[str]:
    (root / "a-file").write_text("not a folder")
    return _search(lambda r: _space(r), "--storage", str(root / "a-file" / "runs"))(
        root, dataset, ray_address
    )


CASES = {
    "malformed yaml": (_search(_malformed_yaml), "space.yaml"),
    "unknown arch": (_search(_with_space(**{"model.arch": {"choice": ["nope"]}})), "nope"),
    "unknown loss": (_search(_with_space(**{"loss.kind": {"choice": ["nope"]}})), "nope"),
    "unknown augmentation": (_search(_with_space(**{"aug.warp": {"choice": [True]}})), "warp"),
    "gpu on a cpu cluster": (
        _search(lambda r: _space(r, resources={"gpus_per_worker": 1})),
        "resources.gpus_per_worker: 0",
    ),
    "more cpus per worker than any node": (
        _search(lambda r: _space(r, resources={"cpus_per_worker": 64})),
        "64 CPUs per worker",
    ),
    "unknown alias, no such model": (_predict(register=False), "seg"),
    "unknown alias of a registered model": (_predict(register=True), "nope"),
    "storage under a file": (_under_a_file, "a-file"),
    "storage on a read-only filesystem": (
        _search(lambda r: _space(r), "--storage", "/proc/segsearch-runs"),
        "/proc/segsearch-runs",
    ),
    "unreachable tracking server": (
        _search(lambda r: _space(r), "--tracking-uri", "http://127.0.0.1:9", tracking=False),
        "127.0.0.1:9",
    ),
}
#: Cases of a service that did not answer: exit code 3.
UNREACHABLE = {"unreachable tracking server"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_or_3_and_leaves_nothing(
    case: str, local_dataset: str, ray_cluster: str, tmp_path: Path
) -> None:
    build, culprit = CASES[case]
    box = Sandbox.under(tmp_path / "run")
    args = build(tmp_path, local_dataset, ray_cluster)

    started = time.monotonic()
    done = box.run(*args)
    took = time.monotonic() - started

    lines = done.stderr.strip().splitlines()
    assert done.returncode == (3 if case in UNREACHABLE else 2), done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert culprit in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert took < FAST_S
    assert "RUNNING" not in run_statuses(tmp_path / "mlflow.db")
    assert box.stray_files() == []
