"""Dense backend: plain causal attention with the context-token rules, through SDPA.

Text queries attend every earlier key; visual queries are dense causal;
context queries see only their own image or frame. This is the dense twin the
paper compares against, and what ``top_k = "all"`` must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.naive import gaze_mask
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout
from gazeattn.ops.routing import route


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, GazeStats]:
    """Dense attention under the layout's rules; q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]."""
    routed = route(q, k, layout, config, dense=True)
    mask = gaze_mask(layout, routed.q_pos, routed.chosen, k.shape[2])  # [B, 1, Tq, Tk]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    # rows with no allowed key (padding queries) come back as NaN from SDPA
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out, compute_stats(layout, routed)
