"""Lean decode path: one text query per sequence, gathering only what it attends.

A decode step reads the cached region descriptors (routing GEMV), picks the
Top-K regions, gathers their keys/values plus the dense text/context keys, and
attends over that small set. Nothing proportional to all visual keys is read
when ``descriptors`` come from the cache.
"""

from __future__ import annotations

import torch

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import route


def can_decode(q: torch.Tensor, k: torch.Tensor, layout: GazeLayout) -> bool:
    """True when every query is a single text token (the lean path's precondition)."""
    if q.shape[2] != 1:
        return False
    kinds, _, _ = layout.padded(k.shape[2])
    return bool((kinds[:, -1] == TokenKind.TEXT).all())


def gather_plan(
    layout: GazeLayout, ids: torch.Tensor, tk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions a decode query reads: ids [B, Hr, K] -> positions [B, Hr, M] and validity."""
    batch, hr, k_max = ids.shape
    tokens = layout.regions.tokens.to(ids.device)
    width = tokens.shape[-1]
    # [B, Hr, K, S] token positions of every selected region
    picked = tokens.gather(1, ids.clamp(min=0).reshape(batch, hr * k_max, 1).expand(-1, -1, width))
    picked = picked.view(batch, hr, k_max * width)
    picked_ok = (picked >= 0) & (ids >= 0).repeat_interleave(width, dim=-1)
    dense_idx, dense_ok = layout.dense_index(tk)
    dense_idx = dense_idx.to(ids.device)[:, None].expand(batch, hr, -1)
    dense_ok = dense_ok.to(ids.device)[:, None].expand(batch, hr, -1)
    positions = torch.cat([dense_idx, picked.clamp(min=0)], dim=-1)
    return positions, torch.cat([dense_ok, picked_ok], dim=-1)


def gaze_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    *,
    scale: float | None = None,
    descriptors: torch.Tensor | None = None,
    top_k: int | None = None,
    return_selection: bool = False,
) -> tuple[torch.Tensor, GazeStats]:
    """Decode one text token per sequence: q [B, Hq, 1, D], k/v [B, Hkv, Tk, D] (contiguous)."""
    batch, hq, _, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    routed = route(q, k, layout, config, descriptors=descriptors, top_k=top_k)
    hr = routed.ids.shape[1]
    positions, valid = gather_plan(layout, routed.ids[:, :, 0], tk)
    # row of each gathered key in k viewed as [B * Hkv * Tk, D]
    kv_head = torch.arange(hr, device=q.device) // (hr // hkv)
    rows = (
        torch.arange(batch, device=q.device)[:, None, None] * hkv + kv_head[None, :, None]
    ) * tk + positions
    m = rows.shape[-1]
    kg = k.reshape(-1, dim).index_select(0, rows.reshape(-1)).view(batch, hr, m, dim)
    vg = v.reshape(-1, dim).index_select(0, rows.reshape(-1)).view(batch, hr, m, dim)
    # [B, Hr, G, D]: the query heads that share each gathered set
    qg = q.view(batch, hr, hq // hr, dim)
    logits = (qg @ kg.transpose(-1, -2)).float() * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = (probs @ vg).view(batch, hq, 1, dim)
    return out, compute_stats(layout, routed, return_selection)
