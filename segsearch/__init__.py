"""segsearch: search semantic-segmentation models with Optuna in Ray Tune, tracked in MLflow.

The Python API (`segsearch.search`, `ingest`, `promote`, `predict`, `evaluate`, …: see
segsearch/api.py) is loaded on first use, so `import segsearch` imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the module that defines it, imported when the name is first used.
_LAZY = {
    "search": "segsearch.api",
    "plan": "segsearch.api",
    "ingest": "segsearch.api",
    "promote": "segsearch.api",
    "evaluate": "segsearch.api",
    "load_model": "segsearch.api",
    "predict": "segsearch.api",
    "predict_files": "segsearch.api",
    "searches": "segsearch.api",
    "best": "segsearch.api",
    "Model": "segsearch.api",
    "SearchResult": "segsearch.search.tuner",
    "SearchInterrupted": "segsearch.search.tuner",
    "SearchPlan": "segsearch.search.plan",
    "DatasetInfo": "segsearch.data.format",
    "Promotion": "segsearch.serve.promote",
    "Evaluation": "segsearch.serve.evaluate",
    "SearchSummary": "segsearch.tracking.catalog",
    "BestTrial": "segsearch.tracking.catalog",
    "UserError": "segsearch.errors",
    "ServiceUnavailable": "segsearch.errors",
}

__all__ = [
    "BestTrial",
    "DatasetInfo",
    "Evaluation",
    "Model",
    "Promotion",
    "SearchInterrupted",
    "SearchPlan",
    "SearchResult",
    "SearchSummary",
    "ServiceUnavailable",
    "UserError",
    "__version__",
    "best",
    "evaluate",
    "ingest",
    "load_model",
    "plan",
    "predict",
    "predict_files",
    "promote",
    "search",
    "searches",
]

if TYPE_CHECKING:
    from segsearch.api import (
        Model,
        best,
        evaluate,
        ingest,
        load_model,
        plan,
        predict,
        predict_files,
        promote,
        search,
        searches,
    )
    from segsearch.data.format import DatasetInfo
    from segsearch.errors import ServiceUnavailable, UserError
    from segsearch.search.plan import SearchPlan
    from segsearch.search.tuner import SearchInterrupted, SearchResult
    from segsearch.serve.evaluate import Evaluation
    from segsearch.serve.promote import Promotion
    from segsearch.tracking.catalog import BestTrial, SearchSummary


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'segsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """`segsearch.search` is the API function, though the subpackage segsearch/search/ has the
    same name: importing the subpackage would set the package attribute to it, so that one
    assignment is skipped (the subpackage stays in sys.modules, which imports use)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "search" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
