"""Segmentation networks: FCN, U-Net, residual U-Net and FC-DenseNet on one Segmenter forward.

`build_model(cfg, in_channels=..., num_classes=...)` is the entry point; `ARCHS`, `BLOCKS` and
`UPSAMPLERS` are the registries a test or a search space can list.
"""

from segsearch.models.blocks import BLOCKS
from segsearch.models.config import ARCHS, ModelConfig
from segsearch.models.segmenter import Segmenter, build_model, count_parameters
from segsearch.models.upsample import UPSAMPLERS

__all__ = [
    "ARCHS",
    "BLOCKS",
    "UPSAMPLERS",
    "ModelConfig",
    "Segmenter",
    "build_model",
    "count_parameters",
]
