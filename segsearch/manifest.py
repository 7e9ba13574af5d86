"""A trial's reproducibility manifest: what it takes to know, months later, how a model was made.

Written by the trial's rank-0 worker into every checkpoint (checkpoint.MANIFEST_FILE), and so
logged with the epoch's pictures to the trial's MLflow run. It holds the full trial config and
its seed (train.py derives the torch, augmentation and shuffle seeds from it), the dataset's
identity (fingerprint, dataset.json's sha256, each shard's split, place and size), the versions
of the packages that shape the numbers, the segsearch git commit when run from a checkout, and
the devices the trial ran on.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from segsearch.config import TrialConfig

FORMAT = "segsearch-manifest/1"
PACKAGES = ("segsearch", "torch", "ray", "optuna", "mlflow", "numpy", "pyarrow", "pillow")
GIT_TIMEOUT_S = 5


def trial_manifest(
    trial: TrialConfig, *, dataset: str, splits: Any, device: torch.device, workers: int
) -> dict[str, Any]:
    """The manifest of a trial run on `workers` workers of `device`'s kind, over `dataset`."""
    return {
        "format": FORMAT,
        "trial": trial.to_dict(),
        "seeds": {"trial": trial.seed},
        "dataset": dataset_identity(dataset, splits),
        "packages": package_versions(),
        "git": git_commit(),
        "devices": devices(device, workers),
    }


def dataset_identity(uri: str, splits: Any) -> dict[str, Any]:
    """The fingerprint the promote gate compares, dataset.json's sha256 and every shard's size."""
    from segsearch.data.fingerprint import dataset_fingerprint
    from segsearch.data.format import INFO_FILE, shard_paths
    from segsearch.data.storage import filesystem_for, join, storage_errors

    filesystem, root = filesystem_for(uri)
    shards = []
    with storage_errors(uri):
        with filesystem.open_input_stream(join(root, INFO_FILE)) as stream:
            info_sha256 = hashlib.sha256(stream.read()).hexdigest()
        for split in sorted(splits):
            paths = shard_paths(filesystem, root, split)
            for index, info in enumerate(filesystem.get_file_info(paths)):
                shards.append({"split": split, "index": index, "size": info.size})
    return {
        "uri": uri,
        "fingerprint": dataset_fingerprint(uri, splits),
        "dataset_json_sha256": info_sha256,
        "shards": shards,
    }


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a trial's numbers; CUDA/cuDNN when built in."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    cudnn = torch.backends.cudnn.is_available()
    versions["cudnn"] = str(torch.backends.cudnn.version()) if cudnn else None
    return versions


def git_commit() -> dict[str, Any] | None:
    """The commit of the checkout segsearch runs from (and whether it had changes); None when it
    is installed from a wheel or git is not there."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def devices(device: torch.device, workers: int) -> dict[str, Any]:
    """The kind and name of the device each worker trained on (rank 0's, the same kind on all)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"type": device.type, "name": name, "workers": workers}


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    )
    return done.stdout.strip()
