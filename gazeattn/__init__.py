"""Gaze Attention (arXiv 2605.13080) for multimodal LLMs.

Importing the package registers the gaze models and processor with transformers' Auto
classes, so ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load saved gaze checkpoints.
"""

from gazeattn.model import load_model, register_auto_classes
from gazeattn.ops import GazeConfig, GazeLayout, GazeStats, gaze_attention
from gazeattn.processing import GazeProcessor, VisualBudget

__all__ = [
    "GazeConfig",
    "GazeLayout",
    "GazeProcessor",
    "GazeStats",
    "VisualBudget",
    "gaze_attention",
    "load_model",
]

register_auto_classes()
