"""Search-level pictures for the parent run: parameter importances, history, parallel coordinates.

Drawn with matplotlib's object API (no pyplot, no global backend), so it is safe in any process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from segsearch.errors import first_line
from segsearch.tracking._outcome import COMPLETED, ERROR, TrialOutcome
from segsearch.values import is_integer, is_number

#: Trial ids written under the history's x axis at most (every k-th one beyond that).
MAX_LABELS = 30
_STATUS_STYLE = {
    COMPLETED: ("o", "tab:blue", "completed"),
    "stopped_early": ("v", "tab:orange", "stopped early"),
    ERROR: ("x", "tab:red", "error"),
}


def param_importances(
    study: Any, outcomes: Sequence[TrialOutcome], *, metric: str, mode: str
) -> dict[str, float]:
    """fANOVA importances of the study's parameters (or of the trials' configs without a study).

    Raises ValueError when they cannot be computed (fewer than 2 complete trials, nothing varied).
    """
    import optuna

    if study is None or _complete(study) < 2:
        study = _study_from(outcomes, metric=metric, mode=mode)
    if _complete(study) < 2:
        raise ValueError("fewer than 2 complete trials")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as err:
        raise ValueError(first_line(err)) from None
    if not importances:
        raise ValueError("no parameter varied across the complete trials")
    return {name: float(value) for name, value in importances.items()}


def importance_chart(importances: Mapping[str, float], path: Path, *, metric: str) -> None:
    """Horizontal bars, most important parameter on top."""
    names = list(importances)[::-1]
    values = [importances[name] for name in names]
    fig = Figure(figsize=(7, 1.2 + 0.4 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(names, values, color="tab:blue")
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)")
    ax.set_xlim(0, max([*values, 0.01]) * 1.15)
    ax.set_title("Parameter importances")
    _save(fig, path)


def history_chart(outcomes: Sequence[TrialOutcome], path: Path, *, metric: str, mode: str) -> None:
    """Each trial's score (its best epoch's) in trial order, marked by how it ended, and the
    best so far."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    values = [o.value(metric) for o in outcomes]
    for status, (marker, colour, label) in _STATUS_STYLE.items():
        points = [
            (i, v)
            for i, (o, v) in enumerate(zip(outcomes, values, strict=True))
            if o.status == status and v is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, marker=marker, color=colour, label=label, zorder=3)
    best, running = [], None
    for outcome, value in zip(outcomes, values, strict=True):
        counts = value is not None and outcome.status != ERROR
        if counts and (running is None or _better(value, running, mode)):
            running = value
        best.append(math.nan if running is None else running)
    ax.step(range(len(best)), best, where="post", color="black", linewidth=1, label="best so far")
    every = max(1, math.ceil(len(outcomes) / MAX_LABELS))
    shown = range(0, len(outcomes), every)
    ax.set_xticks(shown, [outcomes[i].trial_id for i in shown], rotation=60, fontsize=7)
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(metric)
    ax.set_title(f"Optimization history ({mode} {metric})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def parallel_chart(outcomes: Sequence[TrialOutcome], path: Path, *, metric: str) -> None:
    """One vertical axis per varied parameter and one for the metric; a line per scored trial."""
    scored = [o for o in outcomes if o.value(metric) is not None]
    keys = varied_keys([o.config for o in scored])
    fig = Figure(figsize=(max(6.0, 1.6 * (len(keys) + 1)), 5), layout="constrained")
    ax = fig.add_subplot()
    scores = np.array([o.value(metric) for o in scored], dtype=float)
    axes = [_axis([o.config.get(key) for o in scored]) for key in keys]
    axes.append(_axis(list(scores)))
    colours = _colour_mapper(scores)
    fig.colorbar(colours, ax=ax, label=metric, fraction=0.04)
    for row, score in enumerate(scores):
        heights = [positions[row] for positions, _ in axes]
        ax.plot(range(len(axes)), heights, color=colours.to_rgba(score), alpha=0.8)
    for x, (_, labels) in enumerate(axes):
        ax.axvline(x, color="grey", linewidth=0.8)
        for y, label in labels:
            ax.text(x, y, f" {label}", fontsize=7, va="center")
    ax.set_xticks(range(len(axes)), [*keys, metric], rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Parallel coordinates ({len(scored)} scored trials)")
    _save(fig, path)


def varied_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose value differs between trials (or is missing in some), sorted."""
    keys = sorted({key for config in configs for key in config})
    return [k for k in keys if len({repr(config.get(k)) for config in configs}) > 1]


def _axis(values: list[Any]) -> tuple[list[float], list[tuple[float, str]]]:
    """Positions in 0..1 for each value, and (position, label) ticks for the axis."""
    numbers = [v for v in values if is_number(v)]
    if values and len(numbers) == len(values):
        low, high = min(numbers), max(numbers)
        use_log = low > 0 and high / low > 100
        scale = np.log10 if use_log else (lambda x: x)
        span = (scale(high) - scale(low)) or 1.0
        positions = [float((scale(v) - scale(low)) / span) for v in values]
        return positions, [(0.0, f"{low:.3g}"), (1.0, f"{high:.3g}")]
    categories = sorted({repr(v) for v in values})
    step = 1.0 / max(len(categories) - 1, 1)
    where = {c: i * step for i, c in enumerate(categories)}
    labels = [(where[c], c.strip("'")) for c in categories]
    return [where[repr(v)] for v in values], labels


def _colour_mapper(scores: np.ndarray) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    low, high = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    return ScalarMappable(Normalize(low, high if high > low else low + 1e-9), cmap="viridis")


def _study_from(outcomes: Sequence[TrialOutcome], *, metric: str, mode: str) -> Any:
    """An in-memory Optuna study rebuilt from the trials' configs and scores (best epochs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scored = [o for o in outcomes if o.value(metric) is not None]
    keys = varied_keys([o.config for o in scored])
    distributions = {}
    for key in keys:
        values = [o.config[key] for o in scored if key in o.config]
        distributions[key] = _distribution(values)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for outcome in scored:
        params = {k: _param_value(outcome.config[k]) for k in keys if k in outcome.config}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=outcome.value(metric),
            )
        )
    return study


def _distribution(values: list[Any]) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if all(is_integer(v) for v in values):
        return IntDistribution(min(values), max(values))
    if all(is_number(v) for v in values):
        return FloatDistribution(float(min(values)), float(max(values)))
    return CategoricalDistribution(sorted({_param_value(v) for v in values}, key=repr))


def _param_value(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else repr(value)


def _complete(study: Any) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _better(value: float, than: float, mode: str) -> bool:
    return value > than if mode == "max" else value < than


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
