"""Lean decode path: one text query per sequence, gathering only what it attends.

A decode step reads the cached region descriptors (routing GEMV), picks the
Top-K regions, gathers their keys/values plus the dense text/context keys, and
attends over that small set. Nothing proportional to all visual keys is read
when ``descriptors`` come from the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.stats import GazeStats, compute_stats, context_before
from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import (
    budgets,
    decode_route,
    query_positions,
    region_descriptors,
    routing_scores,
    select_regions,
)


def can_decode(q: torch.Tensor, k: torch.Tensor, layout: GazeLayout) -> bool:
    """True when every query is a single text token (the lean path's precondition)."""
    if q.shape[2] != 1:
        return False
    if k.shape[2] > layout.length:
        # past the layout every position is text
        return True
    return bool((layout.kinds[:, -1] == TokenKind.TEXT).all())


# a decode step over at most this many keys x routing heads attends over every key with a mask
# (the selected regions' tokens and every text and context key) instead of gathering the
# attended ones: below it, the gather's index bookkeeping costs more than reading all keys
# (bench/decode_model.py, the small size: 83 keys x 2 heads)
MASKED_DECODE_KEYS = 4096


def _masked_keys(k, v, kv_head, chosen, layout: GazeLayout):
    """Every key and value per routing head ([B, Hr, Tk, D]: views when the routing is per KV
    head) and which of them the query attends ([B, Hr, Tk]): text and context keys, and the
    tokens of the regions ``chosen`` [B, Hr, R] (bool) picked."""
    hr = chosen.shape[1]
    base, region = _key_tables(layout, k.shape[2], k.device)
    # a last column of False for the keys that are in no region
    picked = F.pad(chosen, (0, 1)).gather(-1, region[:, None].expand(-1, hr, -1))
    valid = picked | base[:, None]
    if hr != k.shape[1]:
        k, v = k.index_select(1, kv_head()), v.index_select(1, kv_head())
    return k, v, valid


def _key_tables(layout: GazeLayout, tk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Tk] the text and context keys (decoded ones past the layout are text), and [B, Tk]
    the region of each visual key (the number of regions elsewhere).

    Views of tables made for a capacity that doubles as the keys grow: past the layout every
    key is text, so a decode step takes the first Tk columns instead of building new tables
    (once per layout and doubling, not once per step)."""
    key = ("decode_key_tables", device)
    held = layout._derived.get(key)
    if held is None or held[0].shape[1] < tk:
        capacity = max(2 * tk, layout.length, 64)
        kinds, _, region = layout.padded(capacity)
        kinds, region = kinds.to(device), region.to(device)
        base = (kinds == TokenKind.TEXT) | (kinds == TokenKind.CONTEXT)
        region = torch.where(region >= 0, region, layout.regions.size.shape[1])
        held = layout._derived[key] = (base, region)
    base, region = held
    return base[:, :tk], region[:, :tk]


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
    plan = _step_plan(layout, tk, q.device, config, top_k)
    if descriptors is None:
        descriptors = region_descriptors(k, layout)
    scores = routing_scores(q, descriptors, config, query_positions(1, tk, q.device))
    ids, chosen = select_regions(
        scores, plan["visible_or_all"], plan["k"], plan["k_max"], plan["k_min"]
    )
    hr = scores.shape[1]

    def kv_head() -> torch.Tensor:  # the KV head of each routing head
        return torch.arange(hr, device=q.device) // (hr // hkv)

    if tk * hr <= MASKED_DECODE_KEYS:
        # few keys: every key, masked to what the query attends, costs less than the
        # gather's bookkeeping (the same keys, the same softmax)
        kg, vg, valid = _masked_keys(k, v, kv_head, chosen[:, :, 0], layout)
    else:
        positions, valid = gather_plan(layout, ids[:, :, 0], tk)
        m = positions.shape[-1]
        heads = kv_head()
        kg = _gather_rows(k, heads, positions).view(batch, hr, m, dim)
        vg = _gather_rows(v, heads, positions).view(batch, hr, m, dim)
    # [B, Hr, G, D]: the query heads that share each gathered set
    qg = q.view(batch, hr, hq // hr, dim)
    mask = valid[:, :, None, :]
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    out = out.view(batch, hq, 1, dim)
    # compute_stats' counts, from the step's shared parts: routed entries + context tokens
    attended = (chosen.to(torch.float32) @ plan["size"]).squeeze(-1) + plan["context"]
    stats = GazeStats(
        attended=attended,
        dense=plan["dense"],
        routed=plan["routed"],
        selected=ids if return_selection else None,
    )
    return out, stats


def _step_plan(layout: GazeLayout, tk: int, device, config: GazeConfig, top_k) -> dict:
    """What every layer of one decode step shares (the query, the regions it sees, its K,
    the dense counts): computed at the first layer, not at each.

    A query past the layout (each decode step after the prompt) sees every region and
    context token of its row, wherever it is: one plan serves all those steps."""
    key = ("decode_plan", "past" if tk > layout.length else tk, device, config, top_k)
    if key not in layout._derived:
        every = decode_route(layout, tk, device)
        q_pos, visible = every.q_pos, every.visible
        base = compute_stats(layout, every)
        size = layout.regions.size.to(device=device, dtype=torch.float32)[:, None, :, None]
        dense = base.dense  # [B, 1]: every visible region and context token
        k = budgets(config, visible.sum(-1), top_k)
        plan = {
            "k": k,
            "k_max": int(k.max()) if k.numel() else 0,
            "k_min": int(k.min()) if k.numel() else 0,
            # None when every region is visible: nothing to mask
            "visible_or_all": None if bool(visible.all()) else visible,
            "size": size,
            "dense": dense,
            "routed": base.routed,
            # the context tokens before the query, attended whatever the routing picks
            "context": context_before(layout, q_pos, device)[:, None, :],
        }
        layout._keep_latest(key, plan)
    return layout._derived[key]


def _gather_rows(x: torch.Tensor, kv_head: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, kv_head[h], positions[b, h, m]] as [B * Hr * M, D], read in place.

    ``x`` [B, Hkv, Tk, D] may be a view into a larger cache buffer (a batch that sequences
    join and leave); its rows of D are then addressed through its strides instead of
    copying all of it to make it contiguous.
    """
    batch, _, tk, dim = x.shape
    s_b, s_h, s_t, s_d = x.stride()
    if s_d != 1 or s_t != dim or s_b % dim or s_h % dim:
        x = x.contiguous()
        s_b, s_h, s_t, _ = x.stride()
    # [N, D] over x's storage from its first element: row r starts at element r * D
    extent = ((batch - 1) * s_b + (x.shape[1] - 1) * s_h + (tk - 1) * s_t) // dim + 1
    flat = x.as_strided((extent, dim), (dim, 1))
    base = torch.arange(batch, device=x.device)[:, None, None] * (s_b // dim)
    rows = base + kv_head[None, :, None] * (s_h // dim) + positions * (s_t // dim)
    return flat.index_select(0, rows.reshape(-1))
