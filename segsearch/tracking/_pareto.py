"""A multi-objective search's Pareto front as parent-run artifacts: `pareto_front.json` (what
`promote --pick` reads), `pareto_front.csv` and `pareto_front.png`.

The picture is drawn on a bare matplotlib Figure (no pyplot): the tracker's writer thread draws
it, and no global style or open figure is left behind.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segsearch.search.pareto import ParetoFront, values_of
from segsearch.tracking._clean import mask
from segsearch.tracking._files import write_json

FRONT_JSON = "pareto_front.json"
FRONT_CSV = "pareto_front.csv"
FRONT_PNG = "pareto_front.png"


def objectives_tag(objectives: Mapping[str, str]) -> str:
    """The parent run's tag value naming the objectives in order, e.g. `val_miou:max,...`."""
    return ",".join(f"{name}:{mode}" for name, mode in objectives.items())


def front_members(pareto: ParetoFront, runs: Mapping[str, str]) -> list[dict[str, Any]]:
    """A plain record per front member: trial id, MLflow run id, best epoch, checkpoint (masked)
    and each objective's value."""
    return [
        {
            "trial_id": row["trial_id"],
            "run_id": runs.get(row["trial_id"]),
            "best_epoch": row.get("best_epoch"),
            "checkpoint": mask(str(row["checkpoint"])) if row.get("checkpoint") else None,
            **{name: row.get(name) for name in pareto.objectives},
        }
        for row in pareto.members
    ]


def write_front(pareto: ParetoFront, runs: Mapping[str, str], folder: Path) -> list[Path]:
    """The front's JSON, CSV and picture in `folder`; the files written."""
    members = front_members(pareto, runs)
    json_file, csv_file, picture = folder / FRONT_JSON, folder / FRONT_CSV, folder / FRONT_PNG
    write_json(json_file, {"objectives": pareto.objectives, "front": members})
    columns = ["trial_id", "run_id", *pareto.objectives, "best_epoch", "checkpoint"]
    with csv_file.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(members)
    draw_front(pareto, picture)
    return [json_file, csv_file, picture]


def draw_front(pareto: ParetoFront, path: Path) -> None:
    """One panel per further objective: it across, the first objective up; every trial grey,
    the front red, each front member labelled with its trial id."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(pareto.objectives)
    first, others = names[0], names[1:]
    figure = Figure(figsize=(4.5 * len(others), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(others), squeeze=False)[0]
    for ax, other in zip(axes, others, strict=True):
        for rows, style in ((pareto.trials, {"color": "0.7"}), (pareto.members, {"color": "C3"})):
            points = [v for v in (values_of(r, [other, first]) for r in rows) if v is not None]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=24, **style)
        for row in pareto.members:
            ax.annotate(str(row["trial_id"]), (row[other], row[first]), fontsize=7)
        ax.set_xlabel(f"{other} ({pareto.objectives[other]})")
        ax.set_ylabel(f"{first} ({pareto.objectives[first]})")
    figure.suptitle(f"Pareto front: {len(pareto.members)} of {len(pareto.trials)} trials")
    figure.savefig(path, dpi=110)
