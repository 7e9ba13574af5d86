"""MLflow tracking of a search: a parent run per search and a nested child run per Tune trial."""

from segsearch.tracking._refit import RefitPhase
from segsearch.tracking._tracker import EPOCH_METRICS, SearchTracker, TrackingSummary

__all__ = ["EPOCH_METRICS", "RefitPhase", "SearchTracker", "TrackingSummary"]
