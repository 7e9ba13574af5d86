"""Local copies of what goes to MLflow as artifacts: checkpoint pictures, the model, tables.

Files are copied when the event happens, because Train keeps only the last checkpoints and a
queued upload may run after the one it names is gone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segsearch.checkpoint import PICTURE_FILES, RESUME_ONLY_FILES
from segsearch.tracking._clean import is_secret_key, mask, plain_data


def stage_pictures(checkpoint: str, filesystem: Any, folder: Path) -> list[Path]:
    """Copy a checkpoint's pictures into `folder`; return the copies."""
    return [folder / name for name in copy_files(checkpoint, filesystem, folder, PICTURE_FILES)]


def copy_checkpoint(directory: str, filesystem: Any, dest: Path) -> None:
    """Copy a checkpoint directory (without optimizer state) into a local folder."""
    import pyarrow.fs as pafs

    fs, root = _location(directory, filesystem)
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = tuple(
        e.base_name
        for e in entries
        if e.type == pafs.FileType.File and e.base_name not in RESUME_ONLY_FILES
    )
    copy_files(directory, filesystem, dest, names)


def copy_files(directory: str, filesystem: Any, dest: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of `names` that exist in a checkpoint directory to `dest`; return them."""
    fs, root = _location(directory, filesystem)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        try:
            with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as stream:
                (dest / name).write_bytes(stream.read())
        except FileNotFoundError:
            continue
        copied.append(name)
    return copied


def parent_files(staging: Path, space_path: str | Path | None, info: Any) -> list[Path]:
    """The search space file as it is, and dataset.json, for the parent run's artifacts."""
    files = []
    if space_path is not None:
        files.append(Path(space_path))
    if info is not None:
        data = info.to_dict() if hasattr(info, "to_dict") else plain_data(info)
        write_json(staging / "dataset.json", data)
        files.append(staging / "dataset.json")
    return files


def trials_table(results: Any, children: Mapping[str, str], path: Path) -> None:
    """Tune's trials table (last result per trial) with each trial's MLflow run id, no secrets."""
    frame = results.get_dataframe()
    frame = frame[[c for c in frame.columns if not is_secret_key(str(c))]]
    if "trial_id" in frame.columns:
        frame.insert(0, "mlflow_run_id", frame["trial_id"].map(children))
    for column in frame.select_dtypes(include="object").columns:
        frame[column] = frame[column].map(lambda v: mask(v) if isinstance(v, str) else v)
    frame.to_csv(path, index=False)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _location(directory: str, filesystem: Any) -> tuple[Any, str]:
    """A URI names its own filesystem; a bare path is on Tune's storage filesystem (or local)."""
    import pyarrow.fs as pafs

    if "://" in directory:
        from segsearch.data.storage import filesystem_for

        return filesystem_for(directory)
    return filesystem or pafs.LocalFileSystem(), directory
