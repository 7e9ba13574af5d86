"""Warm start: a new search first tries the best configurations of an earlier one.

They come from the earlier search's persistent study (`search/study.py`), or, for a search
without one (an older one, another storage), from its completed trial runs in MLflow. Each must
fit the current space — every parameter the space would suggest for it present and inside its
range or choices — and parameters the space no longer has are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from segsearch.errors import UserError
from segsearch.mlflow_uri import without_password
from segsearch.search.study import load_study
from segsearch.space import Param, SearchSpec, WarmStartSpec, flatten_sections
from segsearch.tracking.tags import ROLE, STATUS


def warm_start_points(
    spec: SearchSpec, url: str, *, tracking_uri: str, echo: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The best `top_k` trials of `spec.warm_start.search` that fit `spec`, best first: from its
    study at `url`, else from its completed MLflow trial runs. One line says how many, and why
    any was skipped."""
    warm = spec.warm_start
    if warm is None:
        return []
    found = _from_study(warm.search, url, top_k=warm.top_k)
    if found is None:
        found = _from_mlflow(spec, warm, tracking_uri)
    best, source = found
    points, skipped = [], []
    for label, params in best:
        fitted, problem = fit_to_space(spec, params)
        if problem is None:
            points.append(fitted)
        else:
            skipped.append(f"{label} ({problem})")
    line = f"warm start: {len(points)} of the best {len(best)} trial(s) of {source} go first"
    echo(f"{line}; skipped {', '.join(skipped)}" if skipped else line)
    return points


Candidates = tuple[list[tuple[str, dict[str, Any]]], str]


def _from_study(name: str, url: str, *, top_k: int) -> Candidates | None:
    """(label, params) of the study's best complete trials, or None without such a study."""
    import optuna

    try:
        earlier = load_study(name, url)
    except UserError:
        return None
    complete = earlier.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    maximize = earlier.direction == optuna.study.StudyDirection.MAXIMIZE
    best = sorted(complete, key=lambda t: t.value, reverse=maximize)[:top_k]
    source = f"{name!r} in {without_password(url)}"
    return [(f"trial {t.number}", dict(t.params)) for t in best], source


def _from_mlflow(spec: SearchSpec, warm: WarmStartSpec, tracking_uri: str) -> Candidates:
    """(label, params read back into the space's types) of the best completed trial runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(warm.search)
    if experiment is None:
        raise UserError(
            f"warm_start: no search named {warm.search!r}: neither an Optuna study of that name "
            f"nor an MLflow experiment at {without_password(tracking_uri)}"
        )
    order = "DESC" if spec.mode == "max" else "ASC"
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{ROLE}` = 'trial' and tags.`{STATUS}` = 'completed'",
        order_by=[f"metrics.`{spec.metric}` {order}"],
        max_results=warm.top_k,
    )
    best = [(f"run {run.info.run_id}", _typed(spec, run.data.params)) for run in runs]
    return best, f"MLflow experiment {warm.search!r}"


def _typed(spec: SearchSpec, texts: Mapping[str, str]) -> dict[str, Any]:
    """MLflow's text params as the space's values: a choice whose text matches, else a number."""
    typed: dict[str, Any] = {}
    for param in spec.params:
        text = texts.get(param.key)
        if text is None:
            continue
        matches = [c for c in param.choices if str(c) == text]
        if matches:
            typed[param.key] = matches[0]
        elif param.kind != "choice":
            with contextlib.suppress(ValueError):
                number = float(text)
                whole = param.kind == "int" and number.is_integer()
                typed[param.key] = int(number) if whole else number
        else:
            typed[param.key] = text
    return typed


def fit_to_space(spec: SearchSpec, params: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the params the space suggests, taken from `params`; None) or ({}, why they do not fit)."""
    chosen: dict[str, Any] = flatten_sections(spec.fixed)
    fitted: dict[str, Any] = {}
    for param in spec.params:
        if not param.active(chosen):
            continue
        if param.key not in params:
            return {}, f"no value for {param.key}"
        value = params[param.key]
        if not _contains(param, value):
            return {}, f"{param.key}={value!r} is outside this space"
        chosen[param.key] = fitted[param.key] = value
    return fitted, None


def _contains(param: Param, value: Any) -> bool:
    from optuna.distributions import FloatDistribution, IntDistribution

    if param.kind == "choice":
        return any(type(value) is type(c) and value == c for c in param.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if param.kind == "int":
        dist: Any = IntDistribution(
            int(param.low), int(param.high), step=int(param.step or 1), log=param.log
        )
        if not float(value).is_integer():
            return False
    else:
        dist = FloatDistribution(param.low, param.high, step=param.step, log=param.log)
    return dist._contains(dist.to_internal_repr(value))
