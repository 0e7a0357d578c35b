"""Lean decode path: text queries at the end of the prompt, gathering only what they attend.

A decode step reads the cached region descriptors (routing GEMV), picks the
Top-K regions, gathers their keys/values plus the dense text/context keys, and
attends over that small set. Nothing proportional to all visual keys is read
when ``descriptors`` come from the cache. On CPU, after the routing scores, a step runs in
one C++ call (``cpu_kernel``'s ``decode_step``): the Top-K, then the keys, softmax and values
of the attended rows, each read once, in place. The torch ops below do the same where the
kernel is not built (and for several queries past the layout, the kernel's other loop).

The same path takes several text queries past the whole layout at once (``after_layout``):
the text of a prompt after a cached visual prefix, whose queries all see every region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.cpu_kernel import cpu_kernel
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


def after_layout(q: torch.Tensor, k: torch.Tensor, layout: GazeLayout) -> bool:
    """True when the queries are several, all past the layout (text that follows a cached
    prefix): they see every region and context token of their row, as a decode step does."""
    return q.shape[2] > 1 and k.shape[2] - q.shape[2] >= layout.length


# text queries past the layout go through the decode path this many at a time: each query
# gathers its own regions' keys ([B, Hr, Tq, K * S, D]), so a long text after an image is
# bounded in memory (16 queries of a 16-frame video at keep 0.16: about 13 MB per row)
AFTER_LAYOUT_QUERIES = 16


def gaze_after_layout(q, k, v, layout: GazeLayout, config: GazeConfig, **kwargs):
    """Text queries q [B, Hq, Tq, D] all past the layout (``after_layout``) through the
    decode path, ``AFTER_LAYOUT_QUERIES`` at a time (each against the keys up to its last)."""
    tq, tk = q.shape[2], k.shape[2]
    outs, stats = [], []
    for start in range(0, tq, AFTER_LAYOUT_QUERIES):
        end = min(start + AFTER_LAYOUT_QUERIES, tq)
        keys = tk - (tq - end)
        out, part = gaze_decode(
            q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], layout, config, **kwargs
        )
        outs.append(out)
        stats.append(part)
    if len(outs) == 1:
        return outs[0], stats[0]
    selected = [p.selected for p in stats]
    return torch.cat(outs, dim=2), GazeStats(
        attended=torch.cat([p.attended for p in stats], dim=-1),
        dense=torch.cat([p.dense for p in stats], dim=-1),
        routed=torch.cat([p.routed for p in stats], dim=-1),
        selected=None if selected[0] is None else torch.cat(selected, dim=2),
    )


# without the CPU kernel, a decode step over at most this many keys x routing heads attends
# over every key with a mask (the selected regions' tokens and every text and context key)
# instead of gathering the attended ones: below it, the gather's index bookkeeping in torch
# ops costs more than reading all keys (bench/decode_model.py, the small size: 83 keys x 2
# heads). Where the kernel is built, every decode step takes it (``_kernel_decode``).
MASKED_DECODE_KEYS = 1024


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
        k, v = k.index_select(1, kv_head), v.index_select(1, kv_head)
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


def region_runs(layout: GazeLayout, device) -> tuple[torch.Tensor, int]:
    """[B, R, N] the first position of each run of ``width`` consecutive tokens a region's
    tokens split into (-1 for padding), and ``width``: the longest run every region of the
    layout splits into (6 for 6 x 6 regions of a frame in raster order; 1 at worst).
    Computed once per layout."""
    key = ("region_runs", device)
    if key not in layout._derived:
        tokens = layout.regions.tokens
        size = tokens.shape[-1]
        for width in (w for w in range(size, 0, -1) if size % w == 0):
            runs = tokens.view(*tokens.shape[:-1], size // width, width)
            first = runs[..., :1]
            whole = (first >= 0) & (runs == first + torch.arange(width)).all(-1, keepdim=True)
            if bool((whole | (runs < 0).all(-1, keepdim=True)).all()):
                break
        layout._derived[key] = (first[..., 0].to(device, torch.int64).contiguous(), width)
    return layout._derived[key]


def _gathered_attention(qg, k, v, layout: GazeLayout, ids, heads, scale: float) -> torch.Tensor:
    """Attention of the queries qg [B, Hr, Tq, G, D] (the last Tq of the keys) over the keys
    they attend in k/v [B, Hkv, Tk, D]: the dense (text and context) keys, gathered one by
    one once for all the queries (causal), and the tokens of the regions ``ids``
    [B, Hr, Tq, K] (-1: none) chose, gathered as runs of consecutive keys (one row of
    ``width`` keys per run, ``region_runs``). One softmax over both sets; the values are
    summed where they lie. Returns [B, Hr, Tq, G, D]."""
    batch, hr, tq, k_max = ids.shape
    group, tk, dim = qg.shape[3], k.shape[2], k.shape[3]
    starts, width = region_runs(layout, ids.device)
    n = starts.shape[-1]
    # [B, Hr * Tq * K * N] the first key of each run of every chosen region
    picked = ids.clamp(min=0).reshape(batch, hr * tq * k_max, 1).expand(-1, -1, n)
    runs = starts.gather(1, picked).view(batch, hr, tq, k_max * n)
    run_ok = (runs >= 0) & (ids >= 0).repeat_interleave(n, dim=-1)
    dense, dense_ok = layout.dense_index(tk)
    dense, dense_ok = dense.to(ids.device), dense_ok.to(ids.device)
    if tq > 1:  # [B, Tq, Md]: a text key after the query is not attended
        q_pos = query_positions(tq, tk, ids.device)
        dense_ok = dense_ok[:, None] & (dense[:, None] <= q_pos[None, :, None])
    else:
        dense_ok = dense_ok[:, None]
    dense = dense[:, None].expand(batch, hr, -1)
    runs = runs.clamp(min=0)
    kernel = _usable_kernel(qg, k, v)
    if kernel is not None:
        return _kernel_attention(
            kernel, qg, k, v, heads, dense, dense_ok, runs, run_ok, width, scale
        )
    k_dense = _gather_rows(k, heads, dense).view(batch, hr, -1, dim)
    k_runs = _gather_rows(k, heads, runs.view(batch, hr, -1), width).view(batch, hr, tq, -1, dim)
    exact = torch.float32  # scores and softmax in fp32, as SDPA keeps them for lower precisions
    q32 = qg.to(exact)
    scores = torch.cat(
        [
            (q32.reshape(batch, hr, tq * group, dim) @ k_dense.to(exact).transpose(-1, -2)).view(
                batch, hr, tq, group, -1
            ),
            q32 @ k_runs.to(exact).transpose(-1, -2),
        ],
        dim=-1,
    )
    valid = torch.cat(
        [dense_ok[:, None].expand(-1, hr, -1, -1), run_ok.repeat_interleave(width, dim=-1)], -1
    )
    weights = torch.softmax(scores.mul_(scale).masked_fill_(~valid[:, :, :, None], -torch.inf), -1)
    # the values: each query's weighted sum read from the cache in place (embedding_bag sums
    # the rows it is given without a gathered copy of them), keys in the scores' order
    tokens = (runs[..., None] + torch.arange(width, device=runs.device)).view(batch, hr, tq, -1)
    attended = torch.cat([dense[:, :, None].expand(-1, -1, tq, -1), tokens], dim=-1)
    table, rows = _row_table(v, heads, attended.view(batch, hr, -1))
    index = rows.view(batch, hr, tq, 1, -1).expand(-1, -1, -1, group, -1).reshape(-1)
    per_query = attended.shape[-1]
    out = F.embedding_bag(
        index,
        table,
        torch.arange(0, index.numel(), per_query, device=index.device),
        mode="sum",
        per_sample_weights=weights.to(v.dtype).reshape(-1),
    )
    return out.view(batch, hr, tq, group, dim)


def _usable_kernel(q, k, v):
    """The CPU kernel (``cpu_kernel``) where it may serve this call, else None: CPU tensors,
    k and v with one layout (their rows share numbers) and no gradient recorded (the kernel
    has no backward)."""
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type != "cpu" or k.stride() != v.stride() or graph:
        return None
    return cpu_kernel()


def _kernel_decode(kernel, q, scores, k, v, layout: GazeLayout, plan: dict, scale: float):
    """One query per row (q [B, Hq, 1, D]) in one kernel call from its routing scores
    [B, Hr, 1, R] on: the Top-K regions of each row and head, ranked as ``select_regions``
    ranks them, and the attention over them and the dense keys (``_gathered_attention``'s
    keys, in its order), read from k/v [B, Hkv, Tk, D] in place. Returns out [B, Hq, 1, D],
    ids [B, Hr, 1, K] and the visual entries attended [B, Hr, 1] (``GazeStats.attended``)."""
    batch, hq, _, dim = q.shape
    if plan["visible_or_all"] is not None:
        scores = scores.masked_fill(~plan["visible_or_all"][:, None], -torch.inf)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    dense, dense_ok, tail = _kernel_dense(layout, k.shape[2], q.device)
    starts, width = region_runs(layout, q.device)
    out, ids, attended = kernel.decode_step(
        q.reshape(batch, hq, dim).to(torch.float32).contiguous(),
        k,
        v,
        scores.reshape(batch, scores.shape[1], -1).contiguous(),
        plan["budget"],
        plan["k_max"],
        dense,
        dense_ok,
        tail,
        k.shape[2],
        starts,
        width,
        plan["sizes"],
        plan["context_rows"],
        scale,
    )
    return out.to(v.dtype), ids, attended


def _kernel_dense(layout: GazeLayout, tk: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The dense keys of ``tk`` for ``decode_step``: [B, Md] positions (int64) and their
    validity, and the first position of the text past the layout (every position from it to
    ``tk`` is attended: not listed, so nothing is rebuilt as the keys grow)."""
    within = min(tk, layout.length)
    key = ("kernel_dense", within, device)
    if key not in layout._derived:
        dense, ok = layout.dense_index(within)
        dense = dense.to(device=device, dtype=torch.int64).contiguous()
        layout._derived[key] = (dense, ok.to(device).contiguous())
    return (*layout._derived[key], within)


def _kernel_attention(kernel, qg, k, v, heads, dense, dense_ok, runs, run_ok, width, scale):
    """``_gathered_attention``'s keys, softmax and values in the CPU kernel (``cpu_kernel``):
    each attended key and value row read once, in place. ``dense`` [B, Hr, Md] and ``runs``
    [B, Hr, Tq, N] are key positions, ``dense_ok`` [B, 1 or Tq, Md] and ``run_ok`` their
    validity; k and v share strides, so their rows share numbers."""
    batch, hr, tq = runs.shape[:3]
    # k and v share strides (made contiguous alike where they must be): one row number each
    (k_table, steps), (v_table, _) = _table(k), _table(v)
    dense_rows = _rows(steps, heads, dense)
    run_rows = _rows(steps, heads, runs.reshape(batch, hr, -1))
    out = kernel.gathered_attention(
        qg.to(torch.float32).contiguous(),
        k_table,
        v_table,
        dense_rows.view(batch, hr, -1),
        dense_ok.contiguous(),
        run_rows.view(batch, hr, tq, -1),
        run_ok.contiguous(),
        width,
        scale,
    )
    return out.to(v.dtype)


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
    """Decode one text token per sequence: q [B, Hq, 1, D], k/v [B, Hkv, Tk, D] (contiguous);
    or several text queries q [B, Hq, Tq, D] that are all past the layout (``after_layout``)."""
    batch, hq, tq, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    plan = step_plan(layout, tk, q.device, config, top_k)
    if descriptors is None:
        descriptors = region_descriptors(k, layout)
    scores = routing_scores(q, descriptors, config, query_positions(tq, tk, q.device))
    kernel = _usable_kernel(q, k, v) if tq == 1 else None
    if kernel is not None:
        # one query per row: the selection and the attention in one kernel call
        out, ids, attended = _kernel_decode(kernel, q, scores, k, v, layout, plan, scale)
        return out, _plan_stats(plan, attended, ids if return_selection else None, tq)
    hr = scores.shape[1]
    # [B, Hr, Tq, G, D]: the query heads that share each routing head's keys
    qg = q.view(batch, hr, hq // hr, tq, dim).transpose(2, 3)
    ids, chosen = select_regions(
        scores, plan["visible_or_all"], plan["k"].expand(-1, tq), plan["k_max"], plan["k_min"]
    )
    heads = torch.arange(hr, device=q.device) // (hr // hkv)  # the KV head of each routing head
    if tq == 1 and tk * hr <= MASKED_DECODE_KEYS:
        # few keys: every key, masked to what the query attends, costs less than the
        # gather's bookkeeping (the same keys, the same softmax)
        kg, vg, valid = _masked_keys(k, v, heads, chosen[:, :, 0], layout)
        out = F.scaled_dot_product_attention(
            qg[:, :, 0], kg, vg, attn_mask=valid[:, :, None], scale=scale
        )[:, :, None]
    else:
        out = _gathered_attention(qg, k, v, layout, ids, heads, scale)
    out = out.transpose(2, 3).reshape(batch, hq, tq, dim)
    return out, chosen_stats(plan, chosen, ids if return_selection else None)


def chosen_stats(plan: dict, chosen: torch.Tensor, selected=None) -> GazeStats:
    """``compute_stats``' counts from the step's plan (``step_plan``) and the regions each
    query chose (``chosen`` [B, Hr, Tq, R]): their tokens plus the context tokens before it."""
    attended = (chosen.to(torch.float32) @ plan["size"]).squeeze(-1) + plan["context"]
    return _plan_stats(plan, attended, selected, chosen.shape[2])


def _plan_stats(plan: dict, attended: torch.Tensor, selected, tq: int) -> GazeStats:
    """The step's stats: ``attended`` [B, Hr, Tq] and the plan's dense counts."""
    return GazeStats(
        attended=attended,
        dense=plan["dense"].expand(-1, tq),
        routed=plan["routed"].expand(-1, tq),
        selected=selected,
    )


def step_plan(layout: GazeLayout, tk: int, device, config: GazeConfig, top_k) -> dict:
    """What every layer of one decode step shares (the query, the regions it sees, its K,
    the dense counts): computed at the first layer, not at each.

    A query past the layout (each decode step after the prompt) sees every region and
    context token of its row, wherever it is: one plan serves all those steps."""
    key = ("decode_plan", "past" if tk > layout.length else tk, device, config, top_k)
    if key not in layout._derived:
        every = decode_route(layout, tk, device)
        q_pos, visible = every.q_pos, every.visible
        base = compute_stats(layout, every)
        sizes = layout.regions.size.to(device=device, dtype=torch.float32).contiguous()
        dense = base.dense  # [B, 1]: every visible region and context token
        k = budgets(config, visible.sum(-1), top_k)
        plan = {
            "k": k,
            "budget": k.reshape(-1).contiguous(),  # [B]: the kernel's (one query per row)
            "k_max": int(k.max()) if k.numel() else 0,
            "k_min": int(k.min()) if k.numel() else 0,
            # None when every region is visible: nothing to mask
            "visible_or_all": None if bool(visible.all()) else visible,
            "size": sizes[:, None, :, None],
            "sizes": sizes,
            "dense": dense,
            "routed": base.routed,
            # the context tokens before the query, attended whatever the routing picks
            "context": context_before(layout, q_pos, device)[:, None, :],
        }
        plan["context_rows"] = plan["context"].reshape(-1).to(torch.float32)  # the kernel's
        layout._keep_latest(key, plan)
    return layout._derived[key]


def _gather_rows(
    x: torch.Tensor, kv_head: torch.Tensor, positions: torch.Tensor, width: int = 1
) -> torch.Tensor:
    """x[b, kv_head[h], p : p + width] for every p = positions[b, h, m], as
    [B * Hr * M, width * D], read in place (each run of ``width`` keys lies in one head).

    ``x`` [B, Hkv, Tk, D] may be a view into a larger cache buffer (a batch that sequences
    join and leave); its rows of D are then addressed through its strides instead of
    copying all of it to make it contiguous.
    """
    table, rows = _row_table(x, kv_head, positions, width)
    return table.index_select(0, rows)


def _row_table(
    x: torch.Tensor, kv_head: torch.Tensor, positions: torch.Tensor, width: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """x's storage as a table of rows of ``width * D`` ([N, width * D], row r starting at
    element r * D: rows overlap when width > 1) and the row of each x[b, kv_head[h],
    positions[b, h, m]], flat [B * Hr * M] (see ``_gather_rows``)."""
    table, steps = _table(x, width)
    return table, _rows(steps, kv_head, positions).reshape(-1)


def _table(x: torch.Tensor, width: int = 1) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x [B, H, Tk, D]'s storage as a table of rows of ``width * D`` (``_row_table``) and the
    rows one step of its batch, head and position dimensions moves by (``_rows``)."""
    batch, _, tk, dim = x.shape
    s_b, s_h, s_t, s_d = x.stride()
    if s_d != 1 or s_t != dim or s_b % dim or s_h % dim:
        x = x.contiguous()
        s_b, s_h, s_t, _ = x.stride()
    # the last row ends at x's last element
    last = ((batch - 1) * s_b + (x.shape[1] - 1) * s_h + (tk - 1) * s_t) // dim
    table = x.as_strided((last + 2 - width, width * dim), (dim, 1))
    return table, (s_b // dim, s_h // dim, s_t // dim)


def _rows(steps: tuple[int, int, int], kv_head: torch.Tensor, positions: torch.Tensor):
    """[B, Hr, M] the table row (``_table``'s ``steps``) of x[b, kv_head[h], positions[b, h, m]]."""
    per_batch, per_head, per_position = steps
    base = torch.arange(positions.shape[0], device=positions.device)[:, None, None] * per_batch
    return base + kv_head[None, :, None] * per_head + positions * per_position
