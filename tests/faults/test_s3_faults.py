"""S3 faults while a dataset is read: the endpoint down for a few seconds, a shard deleted.

Each test runs its own moto server on a fixed port, so it can be stopped and started again at
the same address; moto keeps its buckets in this process, so they survive the restart.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from segsearch.data.ingest import ingest
from segsearch.data.ray_data import load_splits
from segsearch.errors import DataError
from tests.test_ingest import make_pairs
from tests.test_ray_data import collect, read_units, row_group_units

CLASSES = ["background", "cell", "border"]
DOWN_SECONDS = 3.0


class Endpoint:
    """A moto S3 server at a fixed address that can go down and come back."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        """Stop answering: stop() alone keeps the listening socket, so close it too."""
        self.server.stop()
        self.server._server.server_close()

    def outage(self, seconds: float) -> threading.Thread:
        """Go down now and come back after `seconds`, in the background."""
        self.stop()
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()))
        thread.start()
        return thread


@pytest.fixture
def endpoint(monkeypatch, s3_endpoint) -> Iterator[Endpoint]:
    """Our own server, and the AWS variables (set by `s3_endpoint`) pointed at it."""
    server = Endpoint()
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dataset(tmp_path: Path, endpoint: Endpoint) -> str:
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint.url).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/ds"
    ingest(*make_pairs(tmp_path, n=10, size=(16, 16)), uri, classes=CLASSES, val_fraction=0.2)
    return uri


def test_a_read_waits_for_the_endpoint_to_come_back(dataset, endpoint) -> None:
    units = row_group_units(dataset)
    started = time.monotonic()
    comeback = endpoint.outage(DOWN_SECONDS)
    batches = read_units(*units)
    comeback.join()
    assert time.monotonic() - started >= DOWN_SECONDS  # it did meet the outage
    assert sum(len(batch["id"]) for batch in batches) == 8


def test_ray_data_reads_go_on_after_the_endpoint_restarts(dataset, endpoint, ray_cluster) -> None:
    """The path a trial takes: footers listed on the driver, rows read by Ray Data tasks."""
    train = load_splits(dataset, image_size=(8, 8))["train"]
    assert len(collect(train)) == 8  # warm: the next pass starts reading at once
    comeback = endpoint.outage(DOWN_SECONDS)
    rows = collect(train)
    comeback.join()
    assert len(rows) == 8


def test_a_shard_deleted_after_the_dataset_was_opened_is_named(
    dataset, endpoint, ray_cluster
) -> None:
    units = row_group_units(dataset)
    train = load_splits(dataset, image_size=None)["train"]
    shard = str(units[2][0]["path"][0])
    bucket, _, key = shard.partition("/")
    boto3.client("s3", endpoint_url=endpoint.url).delete_object(Bucket=bucket, Key=key)
    with pytest.raises(DataError, match=f"^s3://{shard}: shard is missing"):
        read_units(*units)
    with pytest.raises(DataError) as caught:
        collect(train)
    assert f"s3://{shard}: shard is missing" in str(caught.value)
