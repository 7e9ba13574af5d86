"""The bad-input table, data rows: each bad dataset or data input, run through the real CLI.

Every row: exit code 2 (3 for an S3 endpoint that does not answer), one line on stderr naming
the culprit, no traceback, no dataset that looks complete, nothing left in the working directory
or the temp folder (a search reads every shard footer on the driver before it starts Ray or opens
a tracking run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segsearch.data.demo import make_demo_dataset
from segsearch.data.format import read_dataset_info, shard_paths
from segsearch.data.storage import filesystem_for
from tests.test_ingest import CLASSES, make_pairs, strict_s3  # noqa: F401  (strict_s3: fixture)
from tests.test_search import tiny_space

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Case:
    """One CLI call and what its one line must name."""

    args: list[str]
    names: list[str]
    env: dict[str, str] = field(default_factory=dict)
    dataset: Path | None = None  # a local dataset the call must leave as it was
    exit_code: int = 2  # 3: a service that did not answer


def ingest_case(tmp_path: Path, spoil: Callable[[Path, Path], list[str]]) -> Case:
    images, masks = make_pairs(tmp_path / "in", n=12, size=(32, 32))
    names = spoil(images, masks)
    dest = tmp_path / "ds"
    return Case(["ingest", str(images), str(masks), str(dest), "--classes", CLASSES], names)


def size_mismatch(images: Path, masks: Path) -> list[str]:
    Image.fromarray(np.zeros((32, 31), dtype=np.uint8)).save(masks / "9.png")
    return ["9.png", "31×32", "32×32"]


def label_out_of_range(images: Path, masks: Path) -> list[str]:
    Image.fromarray(np.full((32, 32), 5, dtype=np.uint8)).save(masks / "9.png")
    return ["9.png", "class id(s) 5"]


def search_case(tmp_path: Path, dataset: str, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space("bad-data", trials=1, epochs=1)))
    return [
        "search", str(space), "--dataset", dataset, "--storage", str(tmp_path / "runs"),
        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *extra,
    ]  # fmt: skip


def local_dataset(tmp_path: Path) -> Path:
    dest = tmp_path / "ds"
    make_demo_dataset(str(dest), n_train=8, n_val=4, size=(16, 16))
    return dest


def edit_info(dest: Path, **changes: object) -> None:
    info = json.loads((dest / "dataset.json").read_text())
    (dest / "dataset.json").write_text(json.dumps({**info, **changes}))


def corrupt_parquet(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    dest = local_dataset(tmp_path)
    fs, root = filesystem_for(str(dest))
    shard = Path(shard_paths(fs, root, "train")[0])
    shard.write_bytes(shard.read_bytes()[:-100])
    args = search_case(tmp_path, str(dest))
    return Case(args, [str(shard), "not a readable Parquet file"], dataset=dest)


def empty_split(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    dest = local_dataset(tmp_path)
    edit_info(dest, splits={"train": 8, "val": 0})
    return Case(search_case(tmp_path, str(dest)), ["dataset.json", "'splits'"], dataset=dest)


def missing_info(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    dest = local_dataset(tmp_path)
    (dest / "dataset.json").unlink()
    return Case(search_case(tmp_path, str(dest)), [str(dest), "dataset.json missing"], dataset=dest)


def wrong_version(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    dest = local_dataset(tmp_path)
    edit_info(dest, format="segsearch/v9")
    names = ["dataset.json", "'format'", "segsearch/v9"]
    return Case(search_case(tmp_path, str(dest)), names, dataset=dest)


def bad_endpoint(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"}
    args = search_case(tmp_path, "s3://somebucket/ds")
    return Case(args, ["cannot reach", endpoint, "somebucket"], env=env, exit_code=3)


def bad_credentials(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    endpoint = request.getfixturevalue("strict_s3")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONG",
        "AWS_SECRET_ACCESS_KEY": "wrong-secret-value",
    }
    args = search_case(tmp_path, "s3://somebucket/ds")
    return Case(args, ["refused the credentials", endpoint, "somebucket"], env=env)


CASES: dict[str, Callable[[Path, pytest.FixtureRequest], Case]] = {
    "mask size differs (ingest)": lambda tmp_path, _: ingest_case(tmp_path, size_mismatch),
    "label out of range (ingest)": lambda tmp_path, _: ingest_case(tmp_path, label_out_of_range),
    "corrupt parquet": corrupt_parquet,
    "empty split": empty_split,
    "missing dataset.json": missing_info,
    "wrong dataset.json version": wrong_version,
    "bad S3 endpoint": bad_endpoint,
    "bad S3 credentials": bad_credentials,
}


def snapshot(folder: Path | None) -> dict[str, bytes]:
    if folder is None or not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_and_exit_2_or_3(tmp_path, request, case) -> None:
    run = CASES[case](tmp_path, request)
    before = snapshot(run.dataset)
    cwd, temp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp), **run.env}
    result = subprocess.run(
        [sys.executable, "-m", "segsearch", *run.args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == run.exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in run.names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in result.stdout + result.stderr
    assert "wrong-secret-value" not in result.stdout + result.stderr
    assert snapshot(run.dataset) == before
    if run.args[0] == "ingest":
        with pytest.raises(Exception, match=r"dataset\.json missing"):
            read_dataset_info(run.args[3])
        assert not Path(run.args[3]).exists()
    assert not list(cwd.iterdir()) and not list(temp.iterdir())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
