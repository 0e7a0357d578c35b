"""Gaze Attention (arXiv 2605.13080) for multimodal LLMs."""

from gazeattn.ops import GazeConfig, GazeLayout, GazeStats, gaze_attention

__all__ = ["GazeConfig", "GazeLayout", "GazeStats", "gaze_attention", "load_model"]


def load_model(name_or_path, gaze=None, **kwargs):
    """``(model, processor)`` of a gaze or stock LLaVA checkpoint; see ``gazeattn.model.load_model``."""
    from gazeattn.model import load_model as _load

    return _load(name_or_path, gaze, **kwargs)
