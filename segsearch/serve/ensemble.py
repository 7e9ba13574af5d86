"""Ensembles: the masks of several models from their mean softmax, at each image's own size.

Each member keeps its own preprocessing (trained image size, mean and std, channels); its logits
are resized back to the image's own size, turned into probabilities there (softmax over the
classes), and the members' probabilities are averaged with equal weights; the mask is the argmax
of the mean. Members must predict the same classes in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from segsearch.errors import UserError, first_line
from segsearch.serve.predictor import MaskPredictor, predict_logits

__all__ = ["Ensemble", "load_models", "top_models"]


class Ensemble:
    """Several MaskPredictors used as one: `segsearch predict` and `evaluate` take either."""

    def __init__(self, members: Sequence[MaskPredictor]) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(members)}")
        if len({member.num_classes for member in members}) != 1:
            raise ValueError("the members of an ensemble must predict the same classes")
        self.members = list(members)
        self.num_classes = members[0].num_classes

    def to(self, device: torch.device | str) -> Ensemble:
        for member in self.members:
            member.to(device)
        return self

    def input_shape(self, image: np.ndarray) -> tuple[int, ...]:
        """Images with equal network input shapes for every member can share a batch."""
        return tuple(size for member in self.members for size in member.input_shape(image))

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The members' mean class probabilities K,H,W of each image, at its own size."""
        per_member = [
            [logits.softmax(0) for logits in predict_logits(member, images)]
            for member in self.members
        ]
        return [torch.stack(probs).mean(0) for probs in zip(*per_member, strict=True)]

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class-id masks (H,W uint8): the argmax of the mean probabilities."""
        return [
            probs.argmax(0).to(torch.uint8).cpu().numpy() for probs in self.probabilities(images)
        ]


def load_models(
    model_uris: Sequence[str], *, tracking_uri: str | None = None
) -> tuple[MaskPredictor | Ensemble, tuple[str, ...]]:
    """One model's predictor, or the ensemble of several; and the class names they predict."""
    from segsearch.serve.predict import load_network

    if not model_uris:
        raise UserError("give a model: MODEL_URI, several for an ensemble, or --top-k and --search")
    loaded = [load_network(uri, tracking_uri=tracking_uri) for uri in model_uris]
    classes = [tuple(meta["classes"]) for _, meta in loaded]
    for uri, names in zip(model_uris, classes, strict=True):
        if names != classes[0]:
            raise UserError(
                f"{uri} predicts classes {list(names)}, {model_uris[0]} {list(classes[0])}: "
                "an ensemble needs models of the same classes"
            )
    predictors = [MaskPredictor(net, meta).eval() for net, meta in loaded]
    if len(predictors) == 1:
        return predictors[0], classes[0]
    return Ensemble(predictors), classes[0]


def top_models(
    search_name: str,
    k: int,
    *,
    metric: str = "val_miou",
    mode: str = "max",
    tracking_uri: str | None = None,
) -> list[str]:
    """models:/<id> of the `k` best finished trials of a search that have a logged model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri
    from segsearch.serve.promote import _all_runs, _logged_models
    from segsearch.tracking.tags import ROLE

    if k < 1:
        raise UserError(f"--top-k must be at least 1, got {k}")
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri, existing=True)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(search_name)
        if experiment is None:
            raise UserError(f"no search {search_name!r} at {uri} (check --tracking-uri)")
        runs = _all_runs(
            client,
            experiment.experiment_id,
            f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'",
        )
        models = _logged_models(client, experiment.experiment_id)
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: {first_line(err)}") from None
    ranked = sorted(
        (
            run
            for run in runs
            if math.isfinite(run.data.metrics.get(metric, math.nan)) and run.info.run_id in models
        ),
        key=lambda run: run.data.metrics[metric],
        reverse=mode == "max",
    )
    if len(ranked) < k:
        raise UserError(
            f"search {search_name!r} has {len(ranked)} finished trial(s) with a logged model and "
            f"metric {metric!r}, fewer than --top-k {k} (a search logs the model of its best trial)"
        )
    return [f"models:/{models[run.info.run_id]}" for run in ranked[:k]]
