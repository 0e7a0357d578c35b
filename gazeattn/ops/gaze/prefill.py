"""Inference prefill without a ``[B, H, T, T]`` mask: causal SDPA, then the queries gaze changes.

In a prompt most queries attend exactly as in the base model: every visual query
(dense causal), and every query that sees no region yet (text before the first
image). Only context queries (their own image or frame) and text queries after an
image (routed) differ. So each sequence goes through causal SDPA once over its
unpadded positions (no mask at all), and then only those queries are recomputed
under the layout's rules with the mask restricted to them: ``[B, Hr, Tsub, T]``
for ``Tsub`` such queries, in blocks of ``QUERY_BLOCK``. For an 8-frame video
prompt that is 32 context tokens plus the question instead of 4.6K x 4.6K.

The result equals the reference (``gaze_attention_reference``) up to float
rounding; the stats are the reference's for every query (zero where nothing is
routed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.naive import gaze_mask, masked_attention
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import (
    Route,
    budgets,
    region_descriptors,
    routing_scores,
    select_regions,
    visible_regions,
)

QUERY_BLOCK = 256


def prefill_spans(layout: GazeLayout, tk: int) -> list[tuple[int, int]] | None:
    """Per sequence, the [start, end) of its non-padding positions; None when one row's
    positions are not contiguous (then only the exact-mask reference applies)."""
    kinds, _, _ = layout.padded(tk)
    valid = (kinds != TokenKind.PAD).cpu()
    spans = []
    for row in valid:
        where = row.nonzero().flatten()
        if where.numel() == 0:
            spans.append((0, 0))
            continue
        start, end = int(where[0]), int(where[-1]) + 1
        if end - start != where.numel():
            return None
        spans.append((start, end))
    return spans


def gaze_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    spans: list[tuple[int, int]],
    *,
    scale: float | None = None,
    descriptors: torch.Tensor | None = None,
    top_k: int | None = None,
    dense: bool = False,
    return_selection: bool = False,
) -> tuple[torch.Tensor, GazeStats]:
    """Prefill (Tq = Tk): q [B, Hq, T, D], k/v [B, Hkv, T, D] -> out [B, Hq, T, D] and stats.

    ``spans`` from ``prefill_spans``. ``dense`` attends every visible region (the dense twin).
    """
    batch, hq, tk, dim = q.shape
    hkv = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    out = q.new_zeros(batch, hq, tk, dim)
    for b, (start, end) in enumerate(spans):
        if end > start:
            part = slice(start, end)
            out[b : b + 1, :, part] = F.scaled_dot_product_attention(
                q[b : b + 1, :, part],
                k[b : b + 1, :, part],
                v[b : b + 1, :, part],
                is_causal=True,
                scale=scale,
                enable_gqa=hq != hkv,
            )
    kinds, _, _ = layout.padded(tk)
    kinds = kinds.to(q.device)
    hr = 1 if dense else (hkv if config.routing == "kv_head" else hq)
    attended = torch.zeros(batch, hr, tk, device=q.device)
    dense_count = torch.zeros(batch, tk, device=q.device)
    chosen_ids: list[tuple[torch.Tensor, torch.Tensor]] = []
    sub = _recomputed_queries(kinds)
    if sub.numel() and not dense and descriptors is None:
        descriptors = region_descriptors(k, layout)
    for block in sub.split(QUERY_BLOCK) if sub.numel() else ():
        q_kind = kinds[:, block]
        visible = visible_regions(layout, block, q_kind)
        if dense:
            ids, chosen = None, visible[:, None]
        else:
            scores = routing_scores(q[:, :, block], descriptors, config, block)
            ids, chosen = select_regions(scores, visible, budgets(config, visible.sum(-1), top_k))
        mask = gaze_mask(layout, block, chosen, tk)
        out[:, :, block] = masked_attention(q[:, :, block], k, v, mask, scale).to(q.dtype)
        routed = Route(q_pos=block, q_kind=q_kind, visible=visible, ids=ids, chosen=chosen)
        stats = compute_stats(layout, routed)
        attended[:, :, block] = stats.attended
        dense_count[:, block] = stats.dense
        if return_selection and ids is not None:
            chosen_ids.append((block, ids))
    selected = _selection(chosen_ids, batch, hr, tk, q.device) if return_selection else None
    routed = kinds == TokenKind.TEXT
    return out, GazeStats(attended=attended, dense=dense_count, routed=routed, selected=selected)


def _recomputed_queries(kinds: torch.Tensor) -> torch.Tensor:
    """Positions [Tsub] where some row has a text or context query at or after its first
    visual token: the only ones whose keys differ from plain causal attention."""
    visual = kinds == TokenKind.VISUAL
    if not bool(visual.any()):
        return torch.zeros(0, dtype=torch.long, device=kinds.device)
    tk = kinds.shape[1]
    pos = torch.arange(tk, device=kinds.device)
    first = torch.where(visual, pos, tk).min(dim=1, keepdim=True).values  # [B, 1]
    other = (kinds == TokenKind.TEXT) | (kinds == TokenKind.CONTEXT)
    return ((other & (pos >= first)).any(0)).nonzero().flatten()


def _selection(blocks, batch: int, hr: int, tk: int, device) -> torch.Tensor:
    """Selected region ids [B, Hr, T, K] (-1 where a query routed nothing) from the blocks."""
    k_max = max((ids.shape[-1] for _, ids in blocks), default=0)
    selected = torch.full((batch, hr, tk, k_max), -1, dtype=torch.long, device=device)
    for block, ids in blocks:
        selected[:, :, block, : ids.shape[-1]] = ids
    return selected
