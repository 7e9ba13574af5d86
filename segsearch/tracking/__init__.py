"""MLflow tracking of a search: a parent run per search and a nested child run per Tune trial."""

from segsearch.tracking._tracker import EPOCH_METRICS, SearchTracker, TrackingSummary

__all__ = ["EPOCH_METRICS", "SearchTracker", "TrackingSummary"]
