"""Split-K Triton decode: one text query per sequence against the gaze KV cache.

Routing is the torch GEMV of ``gazeattn.ops.routing`` over the cached
descriptors, then Top-K (the reference's exact selection). Each sequence's key
list is virtual: its dense text/context positions followed by the tokens of its
selected regions (slot ``j`` of the routed part is token ``j % S`` of the
``j // S``-th selected region). The list is cut into ``num_splits`` chunks, one
program per (sequence, routing head, chunk), so batch 1 with few KV heads still
fills the GPU; a second kernel merges the chunks by log-sum-exp.

A program holds the query heads that share one selection (the KV head's group,
or one head under per-query-head routing) as rows of plain broadcast products,
so a group of 2 is not padded to 16 rows as a ``tl.dot`` would need.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.ops.routing import (
    budgets,
    query_positions,
    region_descriptors,
    region_scores,
    select_regions,
    visible_regions,
)

LOG2E = 1.4426950408889634


@triton.jit
def _gaze_decode_fwd_kernel(
    Q,
    K,
    V,
    O_PART,
    M_PART,
    L_PART,
    DENSE_IDX,
    DENSE_CNT,
    IDS,
    ID_CNT,
    TOKENS,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    N_DENSE,
    K_MAX,
    R,
    SPLIT_LEN,
    scale_log2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HR: tl.constexpr,
    GR: tl.constexpr,
    GR_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HR).to(tl.int64)
    hr = bh % HR
    kvh = hr // (HR // HKV)
    g = tl.arange(0, GR_PAD)
    g_ok = g < GR
    head = hr * GR + g
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q = q.to(tl.float32) * scale_log2
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    n_dense = tl.load(DENSE_CNT + b)
    total = n_dense + tl.load(ID_CNT + b * HR + hr) * S
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, total)
    m_i = tl.full([GR_PAD], -1e30, tl.float32)
    l_i = tl.zeros([GR_PAD], tl.float32)
    acc = tl.zeros([GR_PAD, D_PAD], tl.float32)
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
        # [GR_PAD, BLOCK_N]: a few rows, so broadcast products instead of a padded tl.dot
        s = tl.sum(q[:, None, :] * kk.to(tl.float32)[None, :, :], 2)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv.to(tl.float32)[None, :, :], 1)
        m_i = m_new
    part = (b * HQ + head) * NUM_SPLITS + split
    tl.store(O_PART + part[:, None] * D_PAD + d[None, :], acc, mask=g_ok[:, None])
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)


@triton.jit
def _gaze_decode_merge_kernel(
    O_PART,
    M_PART,
    L_PART,
    OUT,
    stride_ob,
    stride_oh,
    HQ: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
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


@functools.cache
def _target_programs(device_index: int | None) -> int:
    if device_index is None or os.environ.get("TRITON_INTERPRET") == "1":
        return 4
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(batch_heads: int, total: int, block_n: int, device: torch.device) -> int:
    """Chunks per (sequence, head): enough programs to fill the GPU, at least a block each."""
    index = None
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
    target = _target_programs(index)
    wanted = triton.cdiv(target, max(batch_heads, 1))
    return max(1, min(wanted, triton.cdiv(total, block_n), 64))


def gaze_decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense_idx: torch.Tensor,
    dense_cnt: torch.Tensor,
    ids: torch.Tensor,
    tokens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Host wrapper of the split-K decode.

    q [B, Hq, 1, D]; k/v [B, Hkv, Tk, D] with unit stride over D; dense_idx [B, N] int32
    and dense_cnt [B] int32 (the valid prefix); ids [B, Hr, K] int32 selected regions (-1
    after the last); tokens [B, R, S] int32 region table. Returns out [B, Hq, 1, D].
    """
    batch, hq, _, dim = q.shape
    hkv, hr, k_max = k.shape[1], ids.shape[1], ids.shape[2]
    region_tokens = tokens.shape[2]
    id_cnt = (ids >= 0).sum(-1).to(torch.int32).contiguous()  # [B, Hr]
    ids = (
        ids.clamp(min=0).to(torch.int32).contiguous()
        if ids.numel()
        else torch.zeros(1, dtype=torch.int32, device=q.device)
    )
    tokens = (
        tokens.contiguous()
        if tokens.numel()
        else torch.full((1,), -1, dtype=torch.int32, device=q.device)
    )
    total = dense_idx.shape[1] + k_max * region_tokens
    if block_n is None:
        # the interpreter pays per loop step; on a GPU the [rows, block, D] broadcast
        # product lives in registers (untuned: no GPU has run this yet)
        block_n = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 32
    splits = num_splits or _num_splits(batch * hr, total, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max(total, 1), splits), block_n) * block_n
    d_pad = triton.next_power_of_2(dim)
    o_part = torch.empty(batch, hq, splits, d_pad, device=q.device, dtype=torch.float32)
    m_part = torch.empty(batch, hq, splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    gr = hq // hr
    _gaze_decode_fwd_kernel[(splits, batch * hr)](
        q,
        k,
        v,
        o_part,
        m_part,
        l_part,
        dense_idx,
        dense_cnt,
        ids,
        id_cnt,
        tokens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        dense_idx.shape[1],
        max(k_max, 1),
        tokens.shape[1] if tokens.dim() == 3 else 0,
        split_len,
        scale * LOG2E,
        HQ=hq,
        HKV=hkv,
        HR=hr,
        GR=gr,
        GR_PAD=triton.next_power_of_2(gr),
        NUM_SPLITS=splits,
        S=max(region_tokens, 1),
        BLOCK_N=block_n,
        D=dim,
        D_PAD=d_pad,
    )
    out = torch.empty(batch, hq, 1, dim, device=q.device, dtype=q.dtype)
    _gaze_decode_merge_kernel[(batch * hq,)](
        o_part,
        m_part,
        l_part,
        out,
        out.stride(0),
        out.stride(1),
        HQ=hq,
        NUM_SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits),
        D=dim,
        D_PAD=d_pad,
    )
    return out


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
    batch, _, tq, dim = q.shape
    if tq != 1:
        raise ValueError(f"the decode kernel takes one query per sequence, got {tq}")
    tk = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    layout = layout.to(q.device)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    q_pos = query_positions(1, tk, q.device)
    q_kind = torch.full((batch, 1), int(TokenKind.TEXT), device=q.device)
    visible = visible_regions(layout, q_pos, q_kind)
    if descriptors is None:
        descriptors = region_descriptors(k, layout)
    scores = region_scores(q, descriptors, config.routing)
    ids, chosen = select_regions(scores, visible, budgets(config, visible.sum(-1), top_k))
    dense_idx, dense_ok = layout.dense_index(tk)
    dense_cnt = dense_ok.sum(-1).to(torch.int32)
    dense_idx = dense_idx.to(torch.int32).contiguous()
    if not dense_idx.numel():
        dense_idx = torch.zeros(batch, 1, dtype=torch.int32, device=q.device)
    tokens = layout.regions.tokens.to(torch.int32)
    out = gaze_decode_fwd(
        q, k, v, dense_idx, dense_cnt, ids[:, :, 0], tokens, scale, num_splits=num_splits
    )
    stats = compute_stats(layout, q_pos, q_kind, chosen, visible, ids if return_selection else None)
    return out, stats
