"""The Python API a notebook uses, and the CLI's views of what it leaves in MLflow.

One tiny search through `segsearch.search`, one through `segsearch search -q --json`, both on one
embedded SQLite store; then list, best, promote and predict of one image in memory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import segsearch
from segsearch.cli import main
from segsearch.data.demo import make_demo_dataset
from tests.test_search import tiny_space

#: Variables segsearch sets while a search runs (Tune's and MLflow's output, Tune's save period).
SET_DURING_A_SEARCH = (
    "RAY_AIR_NEW_OUTPUT",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "TUNE_GLOBAL_CHECKPOINT_S",
    "MLFLOW_TRACKING_URI",
)


def test_import_segsearch_stays_light_and_exports_the_api() -> None:
    code = (
        "import sys, segsearch\n"
        "heavy = {'torch', 'ray', 'mlflow', 'optuna', 'numpy', 'pyarrow'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import segsearch.search.tuner\n"  # the subpackage of the same name must not shadow it
        "assert callable(segsearch.search) and segsearch.search.__module__ == 'segsearch.api'\n"
        "print(sorted(segsearch.__all__))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = set(segsearch.__all__) - {"__version__"}
    assert names == set(segsearch._LAZY)
    for name in names:
        assert getattr(segsearch, name).__name__ == name


@pytest.fixture(scope="module")
def local_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("api") / "data"
    make_demo_dataset(str(root), n_train=24, n_val=8, size=(32, 32), seed=1)
    return str(root)


def test_notebook_session_leaves_the_process_as_it_was(
    ray_cluster, local_data, tmp_path, monkeypatch
):
    """search → DataFrame → CLI search, list, best → promote → predict one image."""
    for name in SET_DURING_A_SEARCH:
        monkeypatch.delenv(name, raising=False)
    for name in ("ray.tune", "mlflow", "optuna"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)  # put back after the test
        logger.setLevel(logging.INFO)
    root = logging.getLogger()
    environ, cwd = dict(os.environ), os.getcwd()
    root_state = (root.level, list(root.handlers))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    space = tiny_space("api", trials=1, epochs=1)

    result = segsearch.search(
        space, dataset=local_data, storage=str(tmp_path / "runs"), tracking_uri=tracking
    )

    assert dict(os.environ) == environ and os.getcwd() == cwd
    assert (root.level, list(root.handlers)) == root_state
    assert all(logging.getLogger(n).level == logging.INFO for n in ("ray.tune", "mlflow", "optuna"))
    trials = result.to_dataframe()
    assert list(trials["trial_id"]) == [t["trial_id"] for t in result.trials]
    assert {"val_miou", "epochs", "model.arch", "optim.lr"} <= set(trials.columns)
    assert list(result.to_dataframe(history=True)["epoch"]) == [1]

    space_file = tmp_path / "space.yaml"
    space_file.write_text(json.dumps(tiny_space("cli", trials=1, epochs=1)))
    args = ["search", str(space_file), "--dataset", local_data, "--storage", str(tmp_path / "runs")]
    cli = CliRunner().invoke(main, ["-q", *args, "--tracking-uri", tracking, "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["trials"][0]["epochs"] == 1  # stdout is the JSON alone
    assert "started" not in cli.stderr  # -q: no progress lines

    listed = CliRunner().invoke(main, ["list", "--tracking-uri", tracking, "--json"])
    by_name = {s["name"]: s for s in json.loads(listed.stdout)}
    assert by_name["api"]["trials"] == 1 and by_name["api"]["state"] == "finished"
    assert by_name["api"]["best_metric"] == pytest.approx(result.best_metric)
    assert by_name["cli"]["trials"] == 1
    best = CliRunner().invoke(main, ["best", "api", "--tracking-uri", tracking, "--json"])
    assert json.loads(best.stdout)["trial_id"] == result.best_trial_id

    environ = dict(os.environ)  # a CLI run owns its process; the API calls below must not
    promotion = segsearch.promote("api", model_name="api-seg", tracking_uri=tracking)
    assert promotion.trial == result.best_trial_id and str(promotion.version) == "1"
    model = segsearch.load_model("models:/api-seg@champion", tracking_uri=tracking)
    image = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    mask = model.predict(image)
    assert mask.shape == (40, 52) and mask.dtype == np.uint8 and mask.max() < len(model.classes)
    assert np.array_equal(segsearch.predict(result.best_checkpoint, image), mask)
    assert model.overlay(image, mask).shape == (40, 52, 3)
    assert dict(os.environ) == environ
    assert (root.level, list(root.handlers)) == root_state
    assert Path(cwd) == Path.cwd()
