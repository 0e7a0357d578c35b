"""Reference gaze attention: the exact mask of DESIGN.md section 2, computed in fp32.

This is the oracle every other backend is tested against. It materialises a
``[B, H, Tq, Tk]`` mask, so it is meant for tests and CPU, not for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import route


def gaze_mask(
    layout: GazeLayout, q_pos: torch.Tensor, chosen: torch.Tensor, tk: int
) -> torch.Tensor:
    """The keys each query may attend: chosen [B, Hr, Tq, R] -> [B, Hr, Tq, Tk] bool."""
    kinds, segment, region = layout.padded(tk)
    kinds, segment, region = (
        kinds.to(q_pos.device),
        segment.to(q_pos.device),
        region.to(q_pos.device),
    )
    k_pos = torch.arange(tk, device=q_pos.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
    key_ok = kinds != TokenKind.PAD  # [B, Tk]
    q_kind = kinds[:, q_pos]  # [B, Tq]
    q_seg = segment[:, q_pos]
    base = causal[None] & key_ok[:, None, :]  # [B, Tq, Tk]

    key_in_segment = (kinds == TokenKind.VISUAL) | (kinds == TokenKind.CONTEXT)
    own_segment = key_in_segment[:, None, :] & (segment[:, None, :] == q_seg[:, :, None])
    context_rule = base & own_segment

    # a visual key is kept when its region was chosen; text and context keys always
    batch, hr, tq, _ = chosen.shape
    key_region = region.clamp(min=0)[:, None, None, :].expand(batch, hr, tq, tk)
    # a batch without images has no regions (and no visual keys) to gather from
    chosen = chosen if chosen.shape[-1] else chosen.new_zeros(batch, hr, tq, 1)
    region_chosen = chosen.gather(-1, key_region)  # [B, Hr, Tq, Tk]
    key_visual = (kinds == TokenKind.VISUAL)[:, None, None, :]
    text_rule = base[:, None] & (~key_visual | region_chosen)

    kind = q_kind[:, None, :, None]
    return torch.where(
        kind == TokenKind.TEXT,
        text_rule,
        torch.where(
            kind == TokenKind.CONTEXT,
            context_rule[:, None],
            (kind == TokenKind.VISUAL) & base[:, None],
        ),
    )


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """fp32 attention under a bool mask [B, Hr, Tq, Tk] with Hr dividing Hq; rows without keys give 0.

    SDPA computes softmax(q k^T * scale, masked) v in fp32 from the explicit mask (one fused
    CPU kernel instead of a matmul-softmax-matmul chain; the same result to fp32 rounding).
    A row without keys would be NaN there: it sees every key, then is zeroed.
    """
    hq, hkv, hr = q.shape[1], k.shape[1], mask.shape[1]
    has_keys = mask.any(-1, keepdim=True).repeat_interleave(hq // hr, dim=1)
    mask = mask.repeat_interleave(hq // hr, dim=1) | ~has_keys
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask, scale=scale)
    return out * has_keys


def gaze_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    *,
    scale: float | None = None,
    descriptors: torch.Tensor | None = None,
    top_k: int | None = None,
    dense: bool = False,
    return_selection: bool = False,
) -> tuple[torch.Tensor, GazeStats]:
    """Exact gaze attention; see ``gazeattn.ops.gaze_attention`` for the shapes."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    routed = route(q, k, layout, config, descriptors=descriptors, top_k=top_k, dense=dense)
    mask = gaze_mask(layout, routed.q_pos, routed.chosen, k.shape[2])
    out = masked_attention(q, k, v, mask, scale).to(q.dtype)
    return out, compute_stats(layout, routed, return_selection)
