"""The MLflow tag names segsearch writes and reads, and the quoting for filter strings.

One owner for both sides: tracking writes these tags on experiments, runs and logged models,
promote finds runs by them and copies some onto registered model versions.
"""

from __future__ import annotations

__all__ = [
    "BEST",
    "BEST_MODEL_URI",
    "BEST_RUN_ID",
    "BEST_TRIAL_ID",
    "DATASET",
    "DATASET_FINGERPRINT",
    "EPOCHS_RUN",
    "ERROR",
    "METRIC",
    "METRIC_VALUE",
    "MODE",
    "MODEL_CHECKPOINT",
    "MODEL_URI",
    "PARENT_RUN",
    "REASON",
    "REFIT_MODEL_URI",
    "REFIT_OF",
    "REFIT_ON",
    "REFIT_RANK",
    "REFIT_RUN_ID",
    "ROLE",
    "SEARCH",
    "STATUS",
    "TEST_MODEL",
    "TRIAL",
    "TRIAL_ID",
    "export_tag",
    "quoted",
]

# Runs and experiments.
ROLE = "segsearch.role"  # "search" (experiment, parent run), "trial" or "refit" (child runs)
SEARCH = "segsearch.search"  # the search's name
TRIAL_ID = "segsearch.trial_id"  # Tune's trial id, on a trial's run
STATUS = "segsearch.status"  # running, finished, failed, interrupted...
ERROR = "segsearch.error"  # why a trial or search failed, one line
REASON = "segsearch.reason"  # why a trial's run was ended by segsearch (lost with the driver)
BEST = "segsearch.best"  # "true" on the best trial's run only
EPOCHS_RUN = "segsearch.epochs_run"
DATASET_FINGERPRINT = "segsearch.dataset_fingerprint"  # what the promote gate compares
DATASET = "segsearch.dataset"  # dataset URI, compared when runs have no fingerprint
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: a trial's run → its search's run

# A refit run: the search trial whose configuration it trains again, its rank in the search
# (1 = best), and the splits it trained on ("train", or "train+val": then no held-out score).
REFIT_OF = "segsearch.refit_of"
REFIT_RANK = "segsearch.refit_rank"
REFIT_ON = "segsearch.refit_on"

# The search's parent run: its best trial and model.
BEST_TRIAL_ID = "segsearch.best_trial_id"
BEST_RUN_ID = "segsearch.best_run_id"
BEST_MODEL_URI = "segsearch.best_model_uri"
METRIC = "segsearch.metric"  # the metric the best trial (or a model version) was chosen by
REFIT_RUN_ID = "segsearch.refit_run_id"  # the refit run whose model promote takes
REFIT_MODEL_URI = "segsearch.refit_model_uri"
TEST_MODEL = "segsearch.test_model"  # the model the parent's test_* metrics are of

# The best trial's logged model, and registered model versions.
MODEL_URI = "segsearch.model_uri"
MODEL_CHECKPOINT = "segsearch.model_checkpoint"  # the checkpoint the model was logged from
TRIAL = "segsearch.trial"  # a model version's trial (id, else run name)
METRIC_VALUE = "segsearch.metric_value"
MODE = "segsearch.mode"  # "max" or "min"


def export_tag(fmt: str) -> str:
    """A model version's tag naming its checked export file of `fmt` (promote --export)."""
    return f"segsearch.export.{fmt}"


def quoted(value: str) -> str:
    """`value` for a single-quoted string in an MLflow filter string (search_runs and friends)."""
    return value.replace("'", "\\'")
