"""Dense backend: plain causal attention with the context-token rules, through SDPA.

Text queries attend every earlier key; visual queries are dense causal;
context queries see only their own image or frame. This is the dense twin the
paper compares against, and what ``top_k = "all"`` must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.decode import can_decode
from gazeattn.ops.gaze.naive import gaze_mask
from gazeattn.ops.gaze.prefill import gaze_prefill, prefill_spans
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import decode_route, route


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, GazeStats]:
    """Dense attention under the layout's rules; q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D].

    Inference takes paths without the layout's ``[B, 1, Tq, Tk]`` mask: a decode step of
    text queries is plain SDPA over the non-padding keys (``dense_decode``, what the stock
    model runs), a prefill is causal SDPA plus the context queries (``gaze_prefill``).
    """
    if not torch.is_grad_enabled():
        if can_decode(q, k, layout):
            return dense_decode(q, k, v, layout, scale=scale)
        if q.shape[2] == k.shape[2]:
            spans = prefill_spans(layout, k.shape[2])
            if spans is not None:
                return gaze_prefill(q, k, v, layout, config, spans, scale=scale, dense=True)
    routed = route(q, k, layout, config, dense=True)
    mask = gaze_mask(layout, routed.q_pos, routed.chosen, k.shape[2])  # [B, 1, Tq, Tk]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    # rows with no allowed key (padding queries) come back as NaN from SDPA
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out, compute_stats(layout, routed)


def dense_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, GazeStats]:
    """One text query per sequence over every non-padding key: q [B, Hq, 1, D], k/v [B, Hkv, Tk, D].

    No layout mask: a text query sees every earlier key, so only padding keys are masked
    ([B, 1, 1, Tk], or no mask at all when no row is padded). The query heads of a KV head
    go in as that head's queries (no K/V repeated for GQA), as transformers' SDPA does.
    """
    batch, hq, _, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    key_ok = key_padding_mask(layout, tk)
    grouped = q.reshape(batch, hkv, hq // hkv, dim)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=key_ok, scale=scale)
    return out.reshape(batch, hq, 1, dim), _decode_stats(layout, tk, q.device)


def _decode_stats(layout: GazeLayout, tk: int, device) -> GazeStats:
    """A dense decode step's stats: the same at every layer, and past the layout the same at
    every step (such a query sees every region and context token), so computed once."""
    past = tk > layout.length
    key = ("dense_decode_stats",) if past else ("dense_decode_stats", tk)
    if key not in layout._derived:
        every = decode_route(layout, tk, device)
        stats = compute_stats(layout, every)
        layout._derived[key] = stats
    return layout._derived[key]


def key_padding_mask(layout: GazeLayout, tk: int) -> torch.Tensor | None:
    """[B, 1, 1, Tk] True at the non-padding keys, or None when no row has padding."""
    key = ("key_ok", tk)
    if key not in layout._derived:
        ok = layout.kinds != TokenKind.PAD
        value = None
        if not bool(ok.all()):
            value = F.pad(ok, (0, tk - layout.length), value=True)[:, None, None, :]
        layout._keep_latest(key, value)
    return layout._derived[key]
