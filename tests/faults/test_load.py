"""Load: 20 short trials, 4 at a time, on the local Ray that `segsearch search` starts itself."""

from __future__ import annotations

import re
import threading
import time

import pytest
import yaml
from mlflow import MlflowClient

from segsearch.data.demo import make_demo_dataset
from tests.faults import searchproc
from tests.test_search import tiny_space

TRIALS, CONCURRENT = 20, 4
RUN_TIMEOUT_S = 1800
SAMPLE_EVERY_S = 0.5
#: How a trial's end is printed: finished, stopped early after epoch k, failed: <why>.
ENDED = re.compile(r"^trial (\S+) (finished|stopped early after epoch \d+|failed: .+)$", re.M)
ENDINGS = {"completed", "stopped_early", "error"}


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_twenty_trials_four_at_a_time_are_all_accounted_for(tmp_path):
    dataset = str(tmp_path / "data")
    make_demo_dataset(dataset, n_train=16, n_val=8, size=(16, 16), seed=2)
    space = tiny_space(
        "load",
        trials=TRIALS,
        epochs=2,
        max_concurrent=CONCURRENT,
        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        sampler={"kind": "random", "seed": 0},
        fixed={"batch_size": 8, "image_size": [16, 16], "model.depth": 2},
        # Half-CPU workers: 4 trials x (1 CPU trial driver + 0.5) leave 2 of the local Ray's 8
        # logical CPUs to Ray Data. With 1-CPU workers they take all 8 and no trial ever gets data.
        resources={"workers": 1, "cpus_per_worker": 0.5},
    )
    space["space"]["model.width"] = {"choice": [4]}
    space_file = tmp_path / "load.yaml"
    space_file.write_text(yaml.safe_dump(space))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    command = searchproc.search_command(
        space_file,
        "--dataset",
        dataset,
        "--storage",
        str(tmp_path / "runs"),
        "--tracking-uri",
        tracking,
    )

    started = time.monotonic()
    run = searchproc.start(command, tag="load")
    peak = _PeakMemory(run)
    peak.start()
    try:
        output, _ = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        peak.stop()
        searchproc.kill_all(run, "load")
        print(
            f"load: {TRIALS} trials, {CONCURRENT} at a time, {time.monotonic() - started:.0f} s, "
            f"peak memory of the search's processes: RSS {peak.rss / 2**30:.2f} GiB, "
            f"PSS {peak.pss / 2**30:.2f} GiB ({peak.processes} processes)"
        )
    assert run.returncode == 0, output[-3000:]

    ended = dict(ENDED.findall(output))
    assert len(ended) == TRIALS, output[-3000:]
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("load")
    runs = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'trial'")
    assert {r.data.tags["segsearch.trial_id"] for r in runs} == set(ended)
    for mlflow_run in runs:
        tags = mlflow_run.data.tags
        assert mlflow_run.info.status in {"FINISHED", "FAILED"}, tags["segsearch.trial_id"]
        assert tags["segsearch.status"] in ENDINGS
        if tags["segsearch.status"] == "error":
            assert tags.get("segsearch.error"), "a failed trial must say why"
    assert peak.pss > 0


class _PeakMemory:
    """Samples the summed resident memory of a run's processes in a background thread."""

    def __init__(self, run) -> None:
        self.run = run
        self.rss = self.pss = self.processes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_EVERY_S):
            pids = searchproc.processes(self.run, "load")
            rss, pss = searchproc.memory(pids)
            if pss > self.pss:
                self.rss, self.pss, self.processes = rss, pss, len(pids)
