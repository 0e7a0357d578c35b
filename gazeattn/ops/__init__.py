"""Tensor-level gaze attention: config, layout, routing and the attention op (no Ray, no transformers)."""

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze import GazeStats, gaze_attention, kv_savings, resolve_backend
from gazeattn.ops.layout import (
    GazeLayout,
    Image,
    RegionTable,
    TokenKind,
    Video,
    VisualSpan,
    build_layout,
)
from gazeattn.ops.routing import (
    Progressive,
    budgets,
    keep_ratio_at,
    keep_ratio_schedule,
    region_descriptors,
    region_scores,
    schedule_progress,
    select_regions,
    top_k_schedule,
    visible_regions,
)

__all__ = [
    "GazeConfig",
    "GazeLayout",
    "GazeStats",
    "kv_savings",
    "Image",
    "Progressive",
    "RegionTable",
    "TokenKind",
    "Video",
    "VisualSpan",
    "budgets",
    "build_layout",
    "keep_ratio_at",
    "keep_ratio_schedule",
    "gaze_attention",
    "region_descriptors",
    "region_scores",
    "resolve_backend",
    "schedule_progress",
    "select_regions",
    "top_k_schedule",
    "visible_regions",
]
