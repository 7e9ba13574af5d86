"""Warm start: a new search first tries the best configurations of an earlier one.

They come from the earlier search's persistent study (`search/study.py`); each must fit the
current space — every parameter the space would suggest for it present and inside its range or
choices — and parameters the space no longer has are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from segsearch.mlflow_uri import without_password
from segsearch.search.study import load_study
from segsearch.space import Param, SearchSpec, flatten_sections


def warm_start_points(
    spec: SearchSpec, url: str, *, echo: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The best `top_k` complete trials of `spec.warm_start.search` that fit `spec`, best first;
    one line says how many, and why any was skipped."""
    import optuna

    warm = spec.warm_start
    if warm is None:
        return []
    earlier = load_study(warm.search, url)
    complete = earlier.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    maximize = earlier.direction == optuna.study.StudyDirection.MAXIMIZE
    best = sorted(complete, key=lambda t: t.value, reverse=maximize)[: warm.top_k]
    points, skipped = [], []
    for trial in best:
        params, problem = fit_to_space(spec, trial.params)
        if problem is None:
            points.append(params)
        else:
            skipped.append(f"trial {trial.number} ({problem})")
    where = f"{warm.search!r} in {without_password(url)}"
    line = f"warm start: {len(points)} of the best {len(best)} trial(s) of {where} go first"
    echo(f"{line}; skipped {', '.join(skipped)}" if skipped else line)
    return points


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
