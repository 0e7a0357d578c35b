"""Gaze Attention (arXiv 2605.13080) for multimodal LLMs."""

from gazeattn.ops import GazeConfig, GazeLayout, GazeStats, gaze_attention

__all__ = ["GazeConfig", "GazeLayout", "GazeStats", "gaze_attention"]
