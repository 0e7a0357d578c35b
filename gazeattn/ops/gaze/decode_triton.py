"""Split-K Triton decode: one text query per sequence against the gaze KV cache.

Routing is the lean decode path's (``gazeattn.ops.gaze.decode``): the step's plan (the
regions a query sees, its K, the dense counts: once per layout, not per layer) and the
routing scores over the cached descriptors, ranked by ``select_regions`` (the reference's
exact selection), with no host sync. Each sequence's key list is virtual: its dense
text/context positions followed by the tokens of its selected regions (slot
``j`` of the routed part is token ``j % S`` of the ``j // S``-th selected
region). The list is cut into ``num_splits`` chunks, one program per (sequence,
routing head, chunk), so batch 1 with few KV heads still fills the GPU; a second
kernel merges the chunks by log-sum-exp.

A program holds up to 16 query heads that share one selection (the KV head's
group, or one head under per-query-head routing) as the rows of ``tl.dot``s:
decode reads every key once per program and is bound by memory, so the rows a
small group pads to cost tensor-core cycles, not bytes. Block sizes and warps
come from ``gazeattn.ops.gaze.launch``; head counts, lengths and the number of
chunks are runtime arguments (one binary per dtype and padded head dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.common import LOG2E, softmax_tile
from gazeattn.ops.gaze.decode import chosen_stats, step_plan
from gazeattn.ops.gaze.launch import (
    MAX_SPLITS,
    DecodeLaunch,
    decode_launch,
    decode_splits,
    device_spec,
)
from gazeattn.ops.gaze.stats import GazeStats
from gazeattn.ops.layout import GazeLayout
from gazeattn.ops.routing import query_positions, region_descriptors, routing_scores, select_regions

# fmt: off


# sizes and counts change per call but not the compiled code: not specialised
@triton.jit(do_not_specialize=["N_DENSE", "K_MAX", "R", "SPLIT_LEN", "HQ", "HKV", "HR", "GR", "CHUNKS", "NUM_SPLITS", "S"])
def _gaze_decode_fwd_kernel(
    Q, K, V, O_PART, M_PART, L_PART, DENSE_IDX, DENSE_CNT, IDS, ID_CNT, TOKENS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    N_DENSE, K_MAX, R, SPLIT_LEN, HQ, HKV, HR, GR, CHUNKS, NUM_SPLITS, S, D, scale_log2,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Chunk ``split`` of the keys of one (sequence, routing head) for its GR query heads,
    ROWS at a time (CHUNKS programs per head when GR > ROWS; padding rows are discarded)."""
    split = tl.program_id(0)
    bhc = tl.program_id(1)
    chunk = bhc % CHUNKS
    bh = bhc // CHUNKS
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HR).to(tl.int64)
    hr = bh % HR
    kvh = hr // (HR // HKV)
    g = chunk * ROWS + tl.arange(0, ROWS)
    g_ok = g < GR
    head = hr * GR + g
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    n_dense = tl.load(DENSE_CNT + b)
    total = n_dense + tl.load(ID_CNT + b * HR + hr) * S
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, total)
    m_i = tl.full([ROWS], -1e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        is_dense = j < n_dense
        dense_pos = tl.load(DENSE_IDX + b * N_DENSE + j, mask=j_ok & is_dense, other=0)
        slot = tl.where(is_dense, 0, j - n_dense)
        routed = j_ok & (j >= n_dense)
        reg = tl.load(IDS + (b * HR + hr) * K_MAX + slot // S, mask=routed, other=0)
        region_pos = tl.load(TOKENS + (b * R + reg) * S + slot % S, mask=routed, other=-1)
        k_ok = j_ok & (is_dense | (region_pos >= 0))
        kpos = tl.where(is_dense, dense_pos, tl.maximum(region_pos, 0))
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kk = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        vv = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        # a tl.dot of ROWS (16) rows: the padding rows cost tensor-core cycles, not bytes
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kk, vv, k_ok[None, :], scale_log2, True, UPCAST, PRECISION)
    part = (b * HQ + head) * NUM_SPLITS + split
    tl.store(O_PART + part[:, None] * D_PAD + d[None, :], acc, mask=g_ok[:, None])
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)


@triton.jit(do_not_specialize=["HQ", "NUM_SPLITS"])
def _gaze_decode_merge_kernel(
    O_PART, M_PART, L_PART, OUT, stride_ob, stride_oh, HQ, NUM_SPLITS, D,
    SPLITS_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """Log-sum-exp merge of the chunks of one (sequence, query head); no key gives 0."""
    bh = tl.program_id(0)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HQ).to(tl.int64)
    head = bh % HQ
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < NUM_SPLITS
    d = tl.arange(0, D_PAD)
    part = bh * NUM_SPLITS + sp
    m = tl.load(M_PART + part, mask=sp_ok, other=-1e30)
    l_part = tl.load(L_PART + part, mask=sp_ok, other=0.0)
    acc = tl.load(O_PART + part[:, None] * D_PAD + d[None, :], mask=sp_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    den = tl.sum(l_part * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(OUT + b * stride_ob + head * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < D)


# fmt: on


def gaze_decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense_idx: torch.Tensor,
    dense_cnt: torch.Tensor,
    ids: torch.Tensor,
    tokens: torch.Tensor,
    scale: float,
    lc: DecodeLaunch,
    splits: int,
) -> torch.Tensor:
    """Host wrapper of the split-K decode.

    q [B, Hq, 1, D]; k/v [B, Hkv, Tk, D] with unit stride over D; dense_idx [B, N] int32
    and dense_cnt [B] int32 (the valid prefix); ids [B, Hr, K] int32 selected regions (-1
    after the last); tokens [B, R, S] int32 region table; ``splits`` chunks per (sequence,
    routing head), at most MAX_SPLITS. Returns out [B, Hq, 1, D].
    """
    batch, hq, _, dim = q.shape
    hkv, hr, k_max = k.shape[1], ids.shape[1], ids.shape[2]
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    region_tokens = tokens.shape[2]
    id_cnt = (ids >= 0).sum(-1).to(torch.int32).contiguous()  # [B, Hr]
    ids = (
        ids.clamp(min=0).to(torch.int32).contiguous()
        if ids.numel()
        else torch.zeros(1, dtype=torch.int32, device=q.device)
    )
    num_r = tokens.shape[1]
    tokens = (
        tokens.contiguous()
        if tokens.numel()
        else torch.full((1,), -1, dtype=torch.int32, device=q.device)
    )
    total = dense_idx.shape[1] + k_max * region_tokens
    split_len = triton.cdiv(triton.cdiv(max(total, 1), splits), lc.block_n) * lc.block_n
    o_part = torch.empty(batch, hq, splits, lc.d_pad, device=q.device, dtype=torch.float32)
    m_part = torch.empty(batch, hq, splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    chunks = triton.cdiv(hq // hr, lc.rows)
    _gaze_decode_fwd_kernel[(splits, batch * hr * chunks)](
        q, k, v, o_part, m_part, l_part, dense_idx, dense_cnt, ids, id_cnt, tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dense_idx.shape[1], max(k_max, 1), num_r, split_len, hq, hkv, hr, hq // hr, chunks,
        splits, max(region_tokens, 1), dim, scale * LOG2E,
        ROWS=lc.rows, BLOCK_N=lc.block_n, D_PAD=lc.d_pad, UPCAST=lc.upcast,
        PRECISION=lc.precision, **lc.fwd.kwargs(),
    )  # fmt: skip
    out = torch.empty(batch, hq, 1, dim, device=q.device, dtype=q.dtype)
    _gaze_decode_merge_kernel[(batch * hq,)](
        o_part, m_part, l_part, out, out.stride(0), out.stride(1), hq, splits, dim,
        SPLITS_PAD=MAX_SPLITS, D_PAD=lc.d_pad, **lc.merge.kwargs(),
    )  # fmt: skip
    return out


def decode_tables(
    layout: GazeLayout, tk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense_idx [B, N] int32 (at least one column), dense_cnt [B] int32 and the region token
    table [B, R, S] int32 the decode kernel reads for ``tk`` cached keys: made at a step's
    first layer, kept on the layout for the others (the latest ``tk`` past the layout)."""
    key = ("triton_decode_tables", tk, device)
    if key not in layout._derived:
        dense_idx, dense_ok = layout.dense_index(tk)
        dense_cnt = dense_ok.sum(-1).to(device=device, dtype=torch.int32)
        dense_idx = dense_idx.to(device=device, dtype=torch.int32).contiguous()
        if not dense_idx.numel():
            dense_idx = torch.zeros(layout.batch_size, 1, dtype=torch.int32, device=device)
        tokens = layout.regions.tokens.to(device=device, dtype=torch.int32)
        layout._keep_latest(key, (dense_idx, dense_cnt, tokens))
    return layout._derived[key]


def decode_config(
    q: torch.Tensor, ids: torch.Tensor, dense_width: int, region_tokens: int
) -> tuple[DecodeLaunch, int]:
    """The launch configuration and number of chunks of a decode call (ids [B, Hr, K])."""
    batch, hq, _, dim = q.shape
    hr = ids.shape[1]
    spec = device_spec(q.device)
    lc = decode_launch(q.dtype, dim, spec)
    keys = dense_width + ids.shape[2] * region_tokens
    programs = batch * hr * -(-(hq // hr) // lc.rows)
    return lc, decode_splits(programs, keys, lc.block_n, spec)


def gaze_decode_triton(
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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, GazeStats]:
    """Decode one text token per sequence (no autograd).

    Args:
        q: [B, Hq, 1, D] the new tokens' queries, at position Tk - 1.
        k, v: [B, Hkv, Tk, D] the cache including the new token; sequences of different
            lengths are left-padded (padding positions are PAD in the layout).
        layout: the batch layout; positions at or beyond its length are text.
        config: budget and routing mode.
        scale: softmax scale, default D ** -0.5.
        descriptors: [B, Hkv, R, D] fp32 cached region means (computed from k if not given).
        top_k: overrides the config's budget.
        return_selection: also return ids [B, Hr, 1, K] in the stats.
        num_splits: chunks per (sequence, head); chosen from the GPU size by default.

    Returns:
        out [B, Hq, 1, D] in q's dtype, and GazeStats.
    """
    tq, dim = q.shape[2], q.shape[3]
    if tq != 1:
        raise ValueError(f"the decode kernel takes one query per sequence, got {tq}")
    tk = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    layout = layout.to(q.device)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    plan = step_plan(layout, tk, q.device, config, top_k)
    if descriptors is None:
        descriptors = region_descriptors(k, layout)
    scores = routing_scores(q, descriptors, config, query_positions(1, tk, q.device))
    ids, chosen = select_regions(
        scores, plan["visible_or_all"], plan["k"], plan["k_max"], plan["k_min"]
    )
    dense_idx, dense_cnt, tokens = decode_tables(layout, tk, q.device)
    lc, splits = decode_config(q, ids[:, :, 0], dense_idx.shape[1], tokens.shape[2])
    out = gaze_decode_fwd(
        q, k, v, dense_idx, dense_cnt, ids[:, :, 0], tokens, scale, lc, num_splits or splits
    )
    return out, chosen_stats(plan, chosen, ids if return_selection else None)
