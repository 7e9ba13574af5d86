"""MaskPredictor: what `segsearch predict` and the MLflow model (pt2) both run."""

from __future__ import annotations

import pytest
import torch

from segsearch.models import ARCHS, build_model
from segsearch.serve.predictor import MaskPredictor
from tests.test_checkpoint import one_torch_thread  # noqa: F401 (an autouse fixture)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_every_architecture_exports_with_dynamic_batch_and_size(arch):
    """What mlflow_model logs (pt2): the predictor exports and matches eager at a new size."""
    meta = {"in_channels": 3, "num_classes": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    net = build_model({"arch": arch, "depth": 2, "width": 4}, in_channels=3, num_classes=3)
    predictor = MaskPredictor(net.eval(), {**meta, "image_size": [32, 32]}).eval()
    auto = torch.export.Dim.AUTO
    example = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    program = torch.export.export(
        predictor, (example,), dynamic_shapes=[{0: auto, 1: auto, 2: auto}]
    )
    images = torch.randint(0, 256, (3, 57, 33, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), predictor(images), rtol=0, atol=0)
