"""A deliberately simple, independent gaze attention: one query at a time, plain Python.

It rebuilds the token sequence from the parts spec itself (not from GazeLayout
tensors), groups regions by grid coordinates, and follows DESIGN.md section 2
line by line. The vectorised backends are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazeattn.ops import GazeConfig, Image, Video


@dataclass(frozen=True)
class Tok:
    kind: str  # "text" | "visual" | "context" | "pad"
    segment: int = -1  # image or frame id
    region: tuple | None = None  # (span, t-block, h-block, w-block) for visual tokens


def lay_tokens(parts, *, n_ctx: int, region_size, total: int | None = None, side: str = "right"):
    """Token list of one sequence spec, padded to ``total`` on ``side``."""
    rt, rh, rw = region_size
    toks: list[Tok] = []
    segment = 0
    span = 0
    for part in parts:
        if isinstance(part, int):
            toks += [Tok("text")] * part
            continue
        t = part.t if isinstance(part, Video) else 1
        assert isinstance(part, Image | Video)
        for f in range(t):
            for y in range(part.h):
                for x in range(part.w):
                    toks.append(Tok("visual", segment, (span, f // rt, y // rh, x // rw)))
            toks += [Tok("context", segment)] * n_ctx
            segment += 1
        span += 1
    total = len(toks) if total is None else total
    pad = [Tok("pad")] * (total - len(toks))
    return pad + toks if side == "left" else toks + pad


def loop_attention(q, k, v, toks: list[Tok], config: GazeConfig, scale: float | None = None):
    """q [Hq, Tq, D], k/v [Hkv, Tk, D] for one sequence; queries are the last Tq keys.

    Returns out [Hq, Tq, D] (autograd flows to q, k, v) and the chosen region keys
    per (routing head, query) as sets.
    """
    hq, tq, dim = q.shape
    hkv, tk, _ = k.shape
    group = hq // hkv
    scale = dim**-0.5 if scale is None else scale
    toks = toks + [Tok("text")] * (tk - len(toks))
    region_keys = sorted({t.region for t in toks if t.region is not None})
    members = {r: [j for j, t in enumerate(toks) if t.region == r] for r in region_keys}
    routing_heads = hkv if config.routing == "kv_head" else hq
    rows = [[None] * tq for _ in range(hq)]
    chosen_sets = {}
    for i in range(tq):
        p = tk - tq + i
        qt = toks[p]
        visible = [r for r in region_keys if max(members[r]) < p] if qt.kind == "text" else []
        k_sel = config.budget(len(visible))
        for hr in range(routing_heads):
            kvh = hr if config.routing == "kv_head" else hr // group
            heads = range(kvh * group, (kvh + 1) * group) if config.routing == "kv_head" else [hr]
            scored = []
            for order, r in enumerate(visible):
                desc = k[kvh, members[r]].detach().double().mean(0)
                score = sum(float(q[h, i].detach().double() @ desc) for h in heads)
                scored.append((-score, order, r))
            chosen = {r for _, _, r in sorted(scored)[:k_sel]}
            chosen_sets[(hr, i)] = chosen
            for h in heads:
                keys = []
                for j in range(p + 1):
                    kt = toks[j]
                    if kt.kind == "pad":
                        continue
                    if qt.kind == "visual":
                        keys.append(j)
                    elif qt.kind == "context":
                        if kt.kind in ("visual", "context") and kt.segment == qt.segment:
                            keys.append(j)
                    elif qt.kind == "text":
                        if kt.kind != "visual" or kt.region in chosen:
                            keys.append(j)
                if not keys:
                    rows[h][i] = torch.zeros(dim, dtype=torch.float64)
                    continue
                logits = (k[kvh, keys].double() @ q[h, i].double()) * scale
                rows[h][i] = torch.softmax(logits, 0) @ v[kvh, keys].double()
    out = torch.stack([torch.stack(r) for r in rows])
    return out, chosen_sets, region_keys


def ctx_count(toks: list[Tok], p: int) -> int:
    return sum(1 for t in toks[:p] if t.kind == "context")


def dense_visual(toks: list[Tok], p: int) -> int:
    return sum(1 for t in toks[:p] if t.kind == "visual")
