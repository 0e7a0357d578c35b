"""Visual routing shared by every backend: descriptors, scores, budgets and Top-K.

Every backend routes through ``route``, so all of them pick the same set:
regions ranked by score, ties broken towards the lower region id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gazeattn.ops.config import ALL, GazeConfig
from gazeattn.ops.layout import GazeLayout, TokenKind

# keep_ratio * n is rounded up after removing float noise (0.07 * 100 = 7.000000000000001).
_CEIL_EPS = 1e-9


def region_descriptors(k: torch.Tensor, layout: GazeLayout) -> torch.Tensor:
    """Mean key of every region: k [B, Hkv, Tk, D] -> [B, Hkv, R, D] in fp32 (0 for padding regions)."""
    batch, heads, _, dim = k.shape
    tokens = layout.regions.tokens.to(k.device)
    _, num_r, width = tokens.shape
    index = tokens.clamp(min=0).view(batch, 1, num_r * width, 1).expand(batch, heads, -1, dim)
    # [B, Hkv, R, S, D]
    gathered = k.gather(2, index).view(batch, heads, num_r, width, dim).float()
    weight = (tokens >= 0).to(torch.float32)[:, None, :, :, None]
    size = layout.regions.size.to(k.device).clamp(min=1).to(torch.float32)[:, None, :, None]
    return (gathered * weight).sum(3) / size


def region_scores(q: torch.Tensor, descriptors: torch.Tensor, routing: str) -> torch.Tensor:
    """Scores s = q . d: q [B, Hq, Tq, D], descriptors [B, Hkv, R, D] -> [B, Hr, Tq, R] fp32.

    ``kv_head`` sums the scores over each KV head's group of query heads (Hr = Hkv);
    ``query_head`` keeps one score per query head (Hr = Hq).
    """
    batch, hq, tq, dim = q.shape
    hkv = descriptors.shape[1]
    qf = q.float()
    if routing == "kv_head":
        # the sum of a group's dot products is the dot product with the group's summed query
        qf = qf.view(batch, hkv, hq // hkv, tq, dim).sum(2)
        return qf @ descriptors.transpose(-1, -2)
    return qf @ descriptors.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2)


def routing_scores(
    q: torch.Tensor, descriptors: torch.Tensor, config: GazeConfig, q_pos: torch.Tensor
) -> torch.Tensor:
    """The scores every backend ranks regions by: ``region_scores`` under the config's
    routing, or with ``config.random_routing_seed`` pseudo-random ones of the same shape."""
    scores = region_scores(q, descriptors, config.routing)
    if config.random_routing_seed is None:
        return scores
    return random_scores(scores.shape, q_pos, config.random_routing_seed)


def random_scores(shape: torch.Size, q_pos: torch.Tensor, seed: int) -> torch.Tensor:
    """Scores in [0, 1) [B, Hr, Tq, R] that are a hash of (seed, head, query position, region):
    reproducible, the same whatever else is in the batch, and different per step and head."""
    _, heads, _, num_r = shape
    device = q_pos.device
    h = torch.arange(heads, device=device, dtype=torch.int64)[:, None, None]
    t = q_pos.to(torch.int64)[None, :, None]
    r = torch.arange(num_r, device=device, dtype=torch.int64)[None, None, :]
    # int64 arithmetic wraps: a splitmix-style mix of the four coordinates
    x = seed * 0x9E3779B97F4A7C1 + h * 0x85EBCA77C2B2AE3 + t * 0x27D4EB2F165667C5 + r * 0x165667B1
    for shift, mult in ((33, 0x7F51AFD7ED558CCD), (29, 0x44CEB9FE1A85EC53), (32, 1)):
        x = (x ^ (x >> shift)) * mult
    unit = ((x >> 11) & ((1 << 40) - 1)).to(torch.float32) / float(1 << 40)
    return unit[None].expand(shape).contiguous()


def query_positions(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Queries are the last ``tq`` of the ``tk`` key positions."""
    if tq > tk:
        raise ValueError(f"{tq} queries but only {tk} keys: queries must be the last keys")
    return torch.arange(tk - tq, tk, device=device)


def visible_regions(layout: GazeLayout, q_pos: torch.Tensor, q_kind: torch.Tensor) -> torch.Tensor:
    """[B, Tq, R]: regions a query may route to (text queries only; the region lies before it)."""
    last = layout.regions.last.to(q_pos.device)
    before = last[:, None, :] < q_pos[None, :, None]
    return before & (q_kind == TokenKind.TEXT)[:, :, None]


@dataclass(frozen=True)
class Progressive:
    """A Top-K budget on its way from dense to ``target`` (the progressive schedule).

    Each query keeps ``round(n - progress * (n - min(target, n)))`` of the ``n`` regions it
    sees: all of them at progress 0, ``target`` at progress 1, shrinking from its own count.
    """

    target: int
    progress: float

    def __post_init__(self) -> None:
        if self.target < 1 or not 0.0 <= self.progress <= 1.0:
            raise ValueError(f"target must be >= 1 and progress in [0, 1]: {self}")


def budgets(
    config: GazeConfig, visible_count: torch.Tensor, top_k: int | Progressive | None = None
) -> torch.Tensor:
    """K per query from the number of regions it sees (same shape, int64); ``top_k`` overrides."""
    visible_count = visible_count.to(torch.int64)
    if isinstance(top_k, Progressive):
        floor = visible_count.clamp(max=top_k.target)
        k = visible_count - top_k.progress * (visible_count - floor).to(torch.float64)
        return torch.round(k).to(torch.int64).clamp(min=floor)
    if top_k is not None:
        return visible_count.clamp(max=top_k)
    if config.top_k == ALL:
        return visible_count
    if config.top_k is not None:
        return visible_count.clamp(max=config.top_k)
    k = torch.ceil(visible_count.to(torch.float64) * config.keep_ratio - _CEIL_EPS).to(torch.int64)
    return torch.where(visible_count > 0, k.clamp(min=1), 0).minimum(visible_count)


def select_regions(
    scores: torch.Tensor,
    visible: torch.Tensor | None,
    k: torch.Tensor,
    k_max: int | None = None,
    k_min: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K regions per query and head.

    scores [B, Hr, Tq, R], visible [B, Tq, R], k [B, Tq] ->
    ids [B, Hr, Tq, Kmax] (ranked; -1 where a query has fewer than Kmax) and
    chosen [B, Hr, Tq, R] bool.

    What a decode step's plan knows once for all its steps, so that it is not recomputed
    at every call: ``visible`` None when every region is visible, and ``k.max()`` /
    ``k.min()`` as ``k_max`` / ``k_min``.
    """
    masked = scores if visible is None else scores.masked_fill(~visible[:, None], -math.inf)
    if k_max is None:
        k_max = int(k.max()) if k.numel() else 0
    if k_max == 1:
        # one region each (a decode step's usual budget): the first maximum is the lower id
        # of equal scores, as the sort below ranks them, without the sort
        best = masked.argmax(-1, keepdim=True)
        chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        if k_min == 1:  # every query picks one
            return best, chosen.scatter_(-1, best, True)
        ok = (k[:, None, :, None] > 0).expand_as(best)
        return torch.where(ok, best, -1), chosen.scatter_(-1, best, ok)
    # a stable descending sort keeps equal scores in id order: ties go to the lower id
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(k_max, device=k.device) < k[:, None, :, None]
    ids = torch.where(rank_ok, order[..., :k_max], -1)
    # unused ranks scatter into an extra column that is dropped
    num_r = scores.shape[-1]
    target = torch.where(rank_ok, ids, num_r)
    chosen = torch.zeros(*scores.shape[:-1], num_r + 1, dtype=torch.bool, device=scores.device)
    chosen = chosen.scatter(-1, target, True)[..., :num_r]
    return ids, chosen


@dataclass(frozen=True, kw_only=True)
class Route:
    """Where the queries of one call route.

    q_pos:   [Tq] key position of each query (the last Tq of Tk).
    q_kind:  [B, Tq] TokenKind of each query.
    visible: [B, Tq, R] regions a query may route to (text queries only).
    ids:     [B, Hr, Tq, K] selected region ids, ranked, -1 padded (None when dense).
    chosen:  [B, Hr, Tq, R] bool selection (dense: [B, 1, Tq, R], every visible region).
    """

    q_pos: torch.Tensor
    q_kind: torch.Tensor
    visible: torch.Tensor
    ids: torch.Tensor | None
    chosen: torch.Tensor


def decode_route(layout: GazeLayout, tk: int, device) -> Route:
    """The dense route of one text query per sequence at key position ``tk - 1`` (a decode
    step): every region it may see chosen. What decode paths count their entries against."""
    q_pos = query_positions(1, tk, device)
    q_kind = torch.full((layout.batch_size, 1), int(TokenKind.TEXT), device=device)
    visible = visible_regions(layout, q_pos, q_kind)
    return Route(q_pos=q_pos, q_kind=q_kind, visible=visible, ids=None, chosen=visible[:, None])


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    *,
    descriptors: torch.Tensor | None = None,
    top_k: int | None = None,
    dense: bool = False,
) -> Route:
    """Route every query of q [B, Hq, Tq, D] against k [B, Hkv, Tk, D]: text queries select
    their Top-K visible regions by ``q . descriptor`` (``dense``: every visible region).

    descriptors: [B, Hkv, R, D] fp32 region means (e.g. cached); computed from k if not given.
    top_k: overrides the config's budget.
    """
    tq, tk = q.shape[2], k.shape[2]
    q_pos = query_positions(tq, tk, q.device)
    kinds, _, _ = layout.padded(tk)
    q_kind = kinds.to(q.device)[:, q_pos]
    visible = visible_regions(layout, q_pos, q_kind)
    if dense:
        return Route(q_pos=q_pos, q_kind=q_kind, visible=visible, ids=None, chosen=visible[:, None])
    if descriptors is None:
        descriptors = region_descriptors(k, layout)
    scores = routing_scores(q, descriptors, config, q_pos)
    ids, chosen = select_regions(scores, visible, budgets(config, visible.sum(-1), top_k))
    return Route(q_pos=q_pos, q_kind=q_kind, visible=visible, ids=ids, chosen=chosen)


def schedule_progress(step: int, *, warmup_steps: int, kind: str = "linear") -> float:
    """How far the progressive schedule is, 0 (dense) at step 0 to 1 (target) at ``warmup_steps``."""
    if kind not in ("linear", "cosine"):
        raise ValueError(f"schedule kind must be 'linear' or 'cosine', got {kind!r}")
    if warmup_steps < 0:
        raise ValueError("warmup_steps must be >= 0")
    if step >= warmup_steps:
        return 1.0
    frac = max(step, 0) / warmup_steps
    return 0.5 * (1.0 - math.cos(math.pi * frac)) if kind == "cosine" else frac


def top_k_schedule(
    step: int,
    *,
    total_regions: int,
    target: int,
    warmup_steps: int,
    kind: str = "linear",
) -> int:
    """Progressive Top-K: ``total_regions`` (dense) at step 0, ``target`` from ``warmup_steps`` on."""
    if target < 1 or total_regions < 1:
        raise ValueError("target and total_regions must be >= 1")
    target = min(target, total_regions)
    frac = schedule_progress(step, warmup_steps=warmup_steps, kind=kind)
    return max(target, round(total_regions - frac * (total_regions - target)))


def keep_ratio_schedule(
    step: int, *, target: float, warmup_steps: int, kind: str = "linear"
) -> float:
    """Progressive keep ratio: 1.0 (dense) at step 0, ``target`` from ``warmup_steps`` on."""
    return keep_ratio_at(schedule_progress(step, warmup_steps=warmup_steps, kind=kind), target)


def keep_ratio_at(progress: float, target: float) -> float:
    """The keep ratio ``progress`` (0 to 1) of the way from 1.0 (dense) to ``target``."""
    return 1.0 - progress * (1.0 - target)
