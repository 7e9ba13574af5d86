"""Search-level pictures for the parent run, drawn by `optuna.visualization.matplotlib` from the
search's own study: parameter importances, optimization history, parallel coordinates and the
per-epoch (intermediate) values with the trials ASHA pruned.

Optuna's matplotlib plots (PNG, no new dependency; its plotly ones need plotly, and a static image
of those kaleido) use pyplot and set the ggplot style globally: each is drawn inside
`rc_context` and its figure closed, so no style or figure outlives the call (a notebook shows none).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segsearch.errors import first_line


def _importances(study: Any, metric: str) -> Any:
    import optuna
    from optuna.visualization import matplotlib as plots

    if _complete(study) < 2:
        raise ValueError("fewer than 2 complete trials")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return plots.plot_param_importances(study, evaluator=evaluator, target_name=metric)


def _history(study: Any, metric: str) -> Any:
    from optuna.visualization import matplotlib as plots

    return plots.plot_optimization_history(study, target_name=metric)


def _parallel(study: Any, metric: str) -> Any:
    from optuna.visualization import matplotlib as plots

    if _complete(study) < 1:
        raise ValueError("no complete trial")
    return plots.plot_parallel_coordinate(study, target_name=metric)


def _intermediate(study: Any, metric: str) -> Any:
    from optuna.visualization import matplotlib as plots

    ax = plots.plot_intermediate_values(study)
    ax.set_ylabel(f"{metric} per epoch")
    return ax


#: The parent run's pictures: file name → how Optuna draws it from (study, metric).
PICTURES: dict[str, Callable[[Any, str], Any]] = {
    "param_importances.png": _importances,
    "optimization_history.png": _history,
    "parallel_coordinates.png": _parallel,
    "intermediate_values.png": _intermediate,
}


def study_pictures(study: Any, folder: Path, *, metric: str) -> tuple[list[Path], list[str]]:
    """Draw PICTURES of `study` into `folder`: (files written, "name: why" of those not drawn)."""
    import matplotlib

    files, missing = [], []
    if not study.get_trials(deepcopy=False):
        return [], [f"{name}: the study has no trials" for name in PICTURES]
    for name, draw in PICTURES.items():
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", and singular axes of one value
            try:
                figure = _figure_of(draw(study, metric))
            except (RuntimeError, ValueError) as err:
                missing.append(f"{name}: {first_line(err)}")
                continue
            try:
                figure.savefig(folder / name, dpi=110, bbox_inches="tight")
            finally:
                _close(figure)
        files.append(folder / name)
    return files, missing


def _figure_of(drawn: Any) -> Any:
    """The Figure of what Optuna returned (an Axes, or an array of them)."""
    axes = drawn.flat[0] if hasattr(drawn, "flat") else drawn
    return axes.get_figure()


def _close(figure: Any) -> None:
    from matplotlib import pyplot

    pyplot.close(figure)


def _complete(study: Any) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
