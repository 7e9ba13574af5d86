"""segsearch: search semantic-segmentation models with Optuna in Ray Tune, tracked in MLflow."""

__version__ = "0.1.0"
