"""Teacher -> student distillation: feature taps, loss primitives and registered methods."""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .losses import (
    at_loss,
    attention_map,
    cwd_loss,
    kl_from_probs,
    kl_pixelwise,
    resize_to,
    segmentation_loss,
)
from .method_registry import (
    METHODS,
    DistillMethod,
    MissingTapError,
    build_method,
    method_defaults,
    register_method,
)
from .methods import HLFD
from .taps import FeatureTaps, probe_channels, run_with_taps

__all__ = [
    "HLFD",
    "METHODS",
    "DistillMethod",
    "FeatureTaps",
    "MissingTapError",
    "at_loss",
    "attention_map",
    "build_method",
    "cwd_loss",
    "kl_from_probs",
    "kl_pixelwise",
    "method_defaults",
    "probe_channels",
    "register_method",
    "resize_to",
    "run_with_taps",
    "segmentation_loss",
]
