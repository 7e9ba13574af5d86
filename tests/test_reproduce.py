"""`segsearch reproduce RUN_ID`: one trial trained again from its manifest gives its metric."""

from __future__ import annotations

import re

import pytest
from mlflow import MlflowClient

from segsearch.data.demo import make_demo_dataset
from segsearch.search.tuner import run_search
from segsearch.space import parse_space
from tests.test_predict import run_cli
from tests.test_search import tiny_space


@pytest.mark.slow
def test_reproduce_gives_the_same_metric_on_cpu(ray_cluster, tmp_path):
    dataset = str(tmp_path / "tiny")
    make_demo_dataset(dataset, n_train=16, n_val=8, size=(32, 32), seed=2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = tiny_space("orig", trials=1, epochs=2)
    result = run_search(
        parse_space(space), dataset=dataset, storage=str(tmp_path), tracking_uri=uri
    )
    (trial,) = result.trials
    assert trial["error"] is None
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("orig")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'trial'")

    output = run_cli("reproduce", run.info.run_id, "--tracking-uri", uri)
    assert output.exit_code == 0, output.output
    found = re.search(
        r"val_miou at epoch 2: original (\S+), reproduced (\S+) \(difference", output.output
    )
    assert found, output.output
    original, reproduced = float(found[1]), float(found[2])
    assert original == pytest.approx(trial["history"][-1]["val_miou"], abs=1e-6)
    assert abs(original - reproduced) <= 1e-6
    rerun = client.search_experiments(filter_string="name LIKE 'reproduce-%'")
    assert len(rerun) == 1


def test_reproduce_needs_a_run_with_a_manifest(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("old")).info.run_id
    output = run_cli("reproduce", run_id, "--tracking-uri", uri)
    assert output.exit_code == 2
    assert output.stderr.startswith(f"error: run {run_id} at {uri}: ")
    assert "runs logged before manifests have none" in output.stderr
