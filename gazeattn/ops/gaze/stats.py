"""What a gaze attention call reports for metrics (KV savings, routing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import Route


def kv_savings(attended: float, dense: float) -> float:
    """The fraction of the dense visual KV entries not attended (0.84 = 84% fewer), 0 when
    there was nothing visual to attend: the one formula every report uses (a layer's, a
    training step's, an evaluation's, a served request's)."""
    return 0.0 if dense == 0 else 1.0 - attended / dense


@dataclass(kw_only=True)
class GazeStats:
    """Per-query counts of visual KV entries, for text queries (routed ones).

    attended: [B, Hr, Tq] visual entries attended: tokens of the selected regions plus
              the visible context tokens (the paper's count, e.g. 20 * 36 + 4 * 8).
    dense:    [B, Tq] what a dense query at the same position attends, counted the same
              way: every visible region's tokens plus the same context tokens (so a
              dense twin attends exactly its dense count, and savings compare like
              with like).
    routed:   [B, Tq] bool, True for text queries (the ones that route).
    selected: [B, Hr, Tq, K] selected region ids, -1 padded (only when asked for).
    """

    attended: torch.Tensor
    dense: torch.Tensor
    routed: torch.Tensor
    selected: torch.Tensor | None = None

    def attended_mean(self) -> float:
        """Mean visual entries per routed query (over heads and queries)."""
        if not bool(self.routed.any()):
            return 0.0
        per_query = self.attended.float().mean(1)
        return float(per_query[self.routed].mean())

    def dense_mean(self) -> float:
        if not bool(self.routed.any()):
            return 0.0
        return float(self.dense.float()[self.routed].mean())

    def savings(self) -> float:
        """Fraction of the dense visual entries not attended (0.84 = 84% fewer)."""
        return kv_savings(self.attended_mean(), self.dense_mean())


def compute_stats(layout: GazeLayout, routed: Route, return_selection: bool = False) -> GazeStats:
    """Counts from a call's routing (``gazeattn.ops.routing.route``)."""
    chosen, visible, q_pos = routed.chosen, routed.visible, routed.q_pos
    size = layout.regions.size.to(chosen.device).to(torch.float32)
    routed_q = routed.q_kind == TokenKind.TEXT
    ctx_before = context_before(layout, q_pos, chosen.device)
    attended = chosen.to(torch.float32) @ size[:, None, :, None]
    dense = (visible.to(torch.float32) @ size[:, :, None]).squeeze(-1) + ctx_before
    attended = attended.squeeze(-1) + ctx_before[:, None, :]
    zero = torch.zeros((), device=chosen.device)
    return GazeStats(
        attended=torch.where(routed_q[:, None], attended, zero),
        dense=torch.where(routed_q, dense, zero),
        routed=routed_q,
        selected=routed.ids if return_selection else None,
    )


def context_before(layout: GazeLayout, q_pos: torch.Tensor, device) -> torch.Tensor:
    """[B, Tq] context tokens of the layout before each query position."""
    # a prefix sum (cum[:, p] counts the positions < p), so no [Tq, T] comparison is
    # materialised; once per layout, not per call (every layer of every decode step asks)
    key = ("context_cumsum", device)
    cum = layout._derived.get(key)
    if cum is None:
        kinds = layout.kinds.to(device)
        cum = torch.nn.functional.pad(
            (kinds == TokenKind.CONTEXT).to(torch.int64).cumsum(-1), (1, 0)
        )
        layout._derived[key] = cum
    return cum[:, q_pos.clamp(max=layout.length)]
