"""Fused Triton gaze attention for training and prefill: forward and backward.

One program owns a block of query positions and every query head of one KV
head's GQA group (rows = positions x heads, so small groups fill a tile without
padding each head to 16 rows). Keys come from three loops, each with an online
softmax and a mask computed on the fly from per-token metadata, never from a
dense ``[Tq, Tk]`` mask:

1. visual and context rows: a contiguous causal range of keys (visual rows see
   every earlier key, context rows only their own image or frame);
2. text rows: the text and context keys, through the compacted dense index;
3. text rows: the visual tokens of the regions any row of the block selected,
   through the region token table, masked per row by that row's selection.

Routing (descriptors, scores, budgets, Top-K) is the torch code of
``gazeattn.ops.routing``, so this backend selects exactly the reference's regions.
The backward recomputes the probabilities from the saved log-sum-exp: dq per
query block with the same three loops, dk/dv per key block for the first two,
and dk/dv per region for the routed keys (a region's tokens belong to one
program, so no atomics are needed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.naive import gaze_route
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout, TokenKind

LOG2E = 1.4426950408889634
_TEXT, _VISUAL, _CONTEXT, _PAD = (int(k) for k in TokenKind)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # the interpreter stores bf16 as uint16 and tl.dot on it returns garbage
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _query_rows(
    qb, b, kvh, KIND, SEG, Tq, Tk, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr
):
    """Rows of a query block: query index, query head, position, kind and segment."""
    rows = tl.arange(0, BLOCK_Q * G_PAD)
    qi = qb * BLOCK_Q + rows // G_PAD
    g = rows % G_PAD
    row_ok = (qi < Tq) & (g < G)
    qpos = Tk - Tq + qi
    head = kvh * G + g
    qkind = tl.load(KIND + b * Tk + qpos, mask=row_ok, other=3)
    qseg = tl.load(SEG + b * Tk + qpos, mask=row_ok, other=-1)
    # padding rows and padding queries attend nothing
    qkind = tl.where(row_ok, qkind, 3)
    return qi, head, row_ok, qpos, qkind, qseg


@triton.jit
def _routing_head(head, kvh, QUERY_HEAD: tl.constexpr):
    """The selection a row follows: its own query head's, or its KV head's."""
    if QUERY_HEAD:
        return head
    return head * 0 + kvh


@triton.jit
def _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg):
    """Mask of visual and context rows over a tile of keys in natural order."""
    kkind = tl.load(KIND + b * Tk + kpos, mask=k_ok, other=3)
    kseg = tl.load(SEG + b * Tk + kpos, mask=k_ok, other=-2)
    key_ok = k_ok & (kkind != 3)
    in_segment = (kkind == 1) | (kkind == 2)
    own = (kseg[None, :] == qseg[:, None]) & in_segment[None, :]
    rule = (qkind == 1)[:, None] | ((qkind == 2)[:, None] & own)
    return rule & key_ok[None, :] & (kpos[None, :] <= qpos[:, None])


@triton.jit
def _text_dense_tile(j, n_dense, DENSE_IDX, b, N_DENSE, qpos, qkind):
    """Keys j of the compacted text/context index and the text rows' mask over them."""
    j_ok = j < n_dense
    kpos = tl.load(DENSE_IDX + b * N_DENSE + j, mask=j_ok, other=0)
    allowed = (qkind == 0)[:, None] & j_ok[None, :] & (kpos[None, :] <= qpos[:, None])
    return kpos, j_ok, allowed


@triton.jit
def _region_tile(
    j, n_slots, UNION, TOKENS, CHOSEN, b, R, Tq, hr, qi, qkind, S: tl.constexpr, HR_TOTAL
):
    """Tokens of the block's selected regions (slot j = region j // S, token j % S) and the mask
    of each text row: the token's region is one that row selected."""
    j_ok = j < n_slots
    reg = tl.load(UNION + j // S, mask=j_ok, other=0)
    kpos = tl.load(TOKENS + (b * R + reg) * S + j % S, mask=j_ok, other=-1)
    k_ok = j_ok & (kpos >= 0)
    kpos = tl.where(k_ok, kpos, 0)
    row_t = qkind == 0
    chosen_ptr = CHOSEN + ((b * HR_TOTAL + hr[:, None]) * Tq + qi[:, None]) * R + reg[None, :]
    picked = tl.load(chosen_ptr, mask=row_t[:, None] & k_ok[None, :], other=0)
    return kpos, k_ok, (picked != 0) & row_t[:, None] & k_ok[None, :]


@triton.jit
def _softmax_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    kpos,
    k_ok,
    allowed,
    stride_kt,
    stride_vt,
    d,
    d_ok,
    scale_log2,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over a tile of keys at positions ``kpos``."""
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
    vv = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, UPCAST, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    kpos,
    k_ok,
    allowed,
    stride_kt,
    stride_vt,
    d,
    d_ok,
    scale_log2,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq contribution of a tile of keys (before the final multiplication by the scale)."""
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
    vv = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2
    p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(vv), UPCAST, PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(kk.dtype), kk, UPCAST, PRECISION)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    kk,
    vv,
    q,
    do,
    lse,
    delta,
    allowed,
    scale_log2,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk (before the scale) and dv contributions of a block of query rows to a tile of keys."""
    s = _dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2
    p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
    dv = dv + _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
    dp = _dot(do, tl.trans(vv), UPCAST, PRECISION)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _gaze_fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    KIND,
    SEG,
    DENSE_IDX,
    DENSE_CNT,
    LO,
    HI,
    CHOSEN,
    UNION,
    UNION_CNT,
    TOKENS,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    Tq,
    Tk,
    N_DENSE,
    R,
    U_MAX,
    NQB,
    scale_log2,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    QUERY_HEAD: tl.constexpr,
    HR_TOTAL: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    qi, head, row_ok, qpos, qkind, qseg = _query_rows(
        qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q
    )
    hr = _routing_head(head, kvh, QUERY_HEAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q_ptr = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_Q * G_PAD], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)

    lo = tl.load(LO + b * NQB + qb)
    hi = tl.load(HI + b * NQB + qb)
    for start in range(lo, hi, BLOCK_N):
        kpos = start + offs
        k_ok = kpos < hi
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        acc, m_i, l_i = _softmax_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            kpos,
            k_ok,
            allowed,
            stride_kt,
            stride_vt,
            d,
            d_ok,
            scale_log2,
            UPCAST,
            PRECISION,
        )

    n_dense = tl.load(DENSE_CNT + b * NQB + qb)
    for start in range(0, n_dense, BLOCK_N):
        kpos, k_ok, allowed = _text_dense_tile(
            start + offs, n_dense, DENSE_IDX, b, N_DENSE, qpos, qkind
        )
        acc, m_i, l_i = _softmax_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            kpos,
            k_ok,
            allowed,
            stride_kt,
            stride_vt,
            d,
            d_ok,
            scale_log2,
            UPCAST,
            PRECISION,
        )

    block = (b * HKV + kvh) * NQB + qb
    n_slots = tl.load(UNION_CNT + block) * S
    for start in range(0, n_slots, BLOCK_N):
        kpos, k_ok, allowed = _region_tile(
            start + offs,
            n_slots,
            UNION + block * U_MAX,
            TOKENS,
            CHOSEN,
            b,
            R,
            Tq,
            hr,
            qi,
            qkind,
            S,
            HR_TOTAL,
        )
        acc, m_i, l_i = _softmax_tile(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            kpos,
            k_ok,
            allowed,
            stride_kt,
            stride_vt,
            d,
            d_ok,
            scale_log2,
            UPCAST,
            PRECISION,
        )

    # rows with no key (padding queries) output 0
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_ptr = OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot + d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), 0.0)
    tl.store(LSE + (b * HKV * G + head) * Tq + qi, lse, mask=row_ok)


@triton.jit
def _gaze_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    KIND,
    SEG,
    DENSE_IDX,
    DENSE_CNT,
    LO,
    HI,
    CHOSEN,
    UNION,
    UNION_CNT,
    TOKENS,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    Tq,
    Tk,
    N_DENSE,
    R,
    U_MAX,
    NQB,
    scale,
    scale_log2,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    QUERY_HEAD: tl.constexpr,
    HR_TOTAL: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    qi, head, row_ok, qpos, qkind, qseg = _query_rows(
        qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q
    )
    hr = _routing_head(head, kvh, QUERY_HEAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :],
        mask=row_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot + d[None, :],
        mask=row_mask,
        other=0.0,
    )
    row_index = (b * HKV * G + head) * Tq + qi
    lse = tl.load(LSE + row_index, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_index, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs = tl.arange(0, BLOCK_N)
    dq = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)

    lo = tl.load(LO + b * NQB + qb)
    hi = tl.load(HI + b * NQB + qb)
    for start in range(lo, hi, BLOCK_N):
        kpos = start + offs
        k_ok = kpos < hi
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            kpos,
            k_ok,
            allowed,
            stride_kt,
            stride_vt,
            d,
            d_ok,
            scale_log2,
            UPCAST,
            PRECISION,
        )

    n_dense = tl.load(DENSE_CNT + b * NQB + qb)
    for start in range(0, n_dense, BLOCK_N):
        kpos, k_ok, allowed = _text_dense_tile(
            start + offs, n_dense, DENSE_IDX, b, N_DENSE, qpos, qkind
        )
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            kpos,
            k_ok,
            allowed,
            stride_kt,
            stride_vt,
            d,
            d_ok,
            scale_log2,
            UPCAST,
            PRECISION,
        )

    block = (b * HKV + kvh) * NQB + qb
    n_slots = tl.load(UNION_CNT + block) * S
    for start in range(0, n_slots, BLOCK_N):
        kpos, k_ok, allowed = _region_tile(
            start + offs,
            n_slots,
            UNION + block * U_MAX,
            TOKENS,
            CHOSEN,
            b,
            R,
            Tq,
            hr,
            qi,
            qkind,
            S,
            HR_TOTAL,
        )
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            kpos,
            k_ok,
            allowed,
            stride_kt,
            stride_vt,
            d,
            d_ok,
            scale_log2,
            UPCAST,
            PRECISION,
        )

    dq_ptr = DQ + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :]
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _gaze_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    KIND,
    SEG,
    ROW_FLAGS,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    Tq,
    Tk,
    NQB,
    scale,
    scale_log2,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of a block of keys in natural order from every non-routed rule (loops 1 and 2)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kpos < Tk
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(
        K + b * stride_kb + kvh * stride_kh + kpos[:, None] * stride_kt + d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    vv = tl.load(
        V + b * stride_vb + kvh * stride_vh + kpos[:, None] * stride_vt + d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    kkind = tl.load(KIND + b * Tk + kpos, mask=k_ok, other=3)
    # text rows reach this block only through its text and context keys
    dense_key = k_ok & ((kkind == 0) | (kkind == 2))
    any_dense = tl.max(dense_key.to(tl.int32), 0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    first = tl.maximum(kb * BLOCK_N - (Tk - Tq), 0) // BLOCK_Q
    for qb in range(first, NQB):
        flags = tl.load(ROW_FLAGS + b * NQB + qb)
        # bit 0: the block has visual or context rows; bit 1: text rows
        if ((flags & 1) != 0) | (((flags & 2) != 0) & (any_dense != 0)):
            qi, head, row_ok, qpos, qkind, qseg = _query_rows(
                qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q
            )
            allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
            text_rule = (
                (qkind == 0)[:, None] & dense_key[None, :] & (kpos[None, :] <= qpos[:, None])
            )
            allowed = allowed | text_rule
            row_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(
                Q
                + b * stride_qb
                + head[:, None] * stride_qh
                + qi[:, None] * stride_qt
                + d[None, :],
                mask=row_mask,
                other=0.0,
            )
            do = tl.load(
                DO
                + b * stride_ob
                + head[:, None] * stride_oh
                + qi[:, None] * stride_ot
                + d[None, :],
                mask=row_mask,
                other=0.0,
            )
            row_index = (b * HKV * G + head) * Tq + qi
            lse = tl.load(LSE + row_index, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_index, mask=row_ok, other=0.0)
            dk, dv = _dkdv_tile(
                dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, UPCAST, PRECISION
            )
    out = (b * HKV + kvh) * Tk + kpos
    tl.store(DK + out[:, None] * D + d[None, :], dk * scale, mask=kv_mask)
    tl.store(DV + out[:, None] * D + d[None, :], dv, mask=kv_mask)


@triton.jit
def _gaze_bwd_region_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    KIND,
    SEG,
    CHOSEN,
    INV,
    INV_CNT,
    TOKENS,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    Tq,
    Tk,
    R,
    INV_MAX,
    scale,
    scale_log2,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    QUERY_HEAD: tl.constexpr,
    HR_TOTAL: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S: tl.constexpr,
    S_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of one region's tokens from the text rows that selected it (loop 3), added to
    the non-routed part already in DK/DV."""
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    n_blocks = tl.load(INV_CNT + (b * HKV + kvh) * R + r)
    if n_blocks > 0:
        s = tl.arange(0, S_PAD)
        kpos = tl.load(TOKENS + (b * R + r) * S + s, mask=s < S, other=-1)
        k_ok = kpos >= 0
        kpos = tl.where(k_ok, kpos, 0)
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kk = tl.load(
            K + b * stride_kb + kvh * stride_kh + kpos[:, None] * stride_kt + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        vv = tl.load(
            V + b * stride_vb + kvh * stride_vh + kpos[:, None] * stride_vt + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        dk = tl.zeros([S_PAD, D_PAD], tl.float32)
        dv = tl.zeros([S_PAD, D_PAD], tl.float32)
        inv = INV + ((b * HKV + kvh) * R + r) * INV_MAX
        for i in range(0, n_blocks):
            qb = tl.load(inv + i)
            qi, head, row_ok, qpos, qkind, qseg = _query_rows(
                qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q
            )
            hr = _routing_head(head, kvh, QUERY_HEAD)
            row_t = qkind == 0
            picked = tl.load(CHOSEN + ((b * HR_TOTAL + hr) * Tq + qi) * R + r, mask=row_t, other=0)
            allowed = ((picked != 0) & row_t)[:, None] & k_ok[None, :]
            row_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(
                Q
                + b * stride_qb
                + head[:, None] * stride_qh
                + qi[:, None] * stride_qt
                + d[None, :],
                mask=row_mask,
                other=0.0,
            )
            do = tl.load(
                DO
                + b * stride_ob
                + head[:, None] * stride_oh
                + qi[:, None] * stride_ot
                + d[None, :],
                mask=row_mask,
                other=0.0,
            )
            row_index = (b * HKV * G + head) * Tq + qi
            lse = tl.load(LSE + row_index, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_index, mask=row_ok, other=0.0)
            dk, dv = _dkdv_tile(
                dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, UPCAST, PRECISION
            )
        out = (b * HKV + kvh) * Tk + kpos
        dk_ptr = DK + out[:, None] * D + d[None, :]
        dv_ptr = DV + out[:, None] * D + d[None, :]
        tl.store(dk_ptr, tl.load(dk_ptr, mask=kv_mask, other=0.0) + dk * scale, mask=kv_mask)
        tl.store(dv_ptr, tl.load(dv_ptr, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


@dataclass(frozen=True, kw_only=True)
class GazePlan:
    """Per-call block tables the kernels read (built with torch ops from the layout and
    the routing; the largest is the per-query selection, ``[B, Hr, Tq, R]`` bits).

    kinds, segment: [B, Tk] int32 metadata of every key position.
    dense_idx:      [B, N] int32 text/context key positions (compacted).
    dense_cnt:      [B, NQB] dense keys up to each block's last text query (0 without text rows).
    lo, hi:         [B, NQB] contiguous key range of each block's visual and context rows.
    row_flags:      [B, NQB] bit 0: visual/context rows, bit 1: text rows.
    chosen:         [B, Hr, Tq, R] uint8, 1 where a query (head) selected a region.
    union:          [B, Hkv, NQB, U] region ids selected by any row of a block; union_cnt.
    inverse:        [B, Hkv, R, W] query blocks that selected a region; inverse_cnt.
    tokens:         [B, R, S] int32 region token table, -1 padded.
    """

    kinds: torch.Tensor
    segment: torch.Tensor
    dense_idx: torch.Tensor
    dense_cnt: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    row_flags: torch.Tensor
    chosen: torch.Tensor
    union: torch.Tensor
    union_cnt: torch.Tensor
    inverse: torch.Tensor
    inverse_cnt: torch.Tensor
    tokens: torch.Tensor
    num_regions: int
    region_tokens: int
    heads: int

    @property
    def query_head(self) -> bool:
        # with one query head per KV head both routing modes are the same selection
        return self.heads != self.kv_heads

    @property
    def kv_heads(self) -> int:
        return self.union.shape[1]


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries along the last dim, left-aligned: [..., W] int32 and counts.

    W is at least 1, so a kernel never receives an empty tensor."""
    count = mask.sum(-1)
    width = max(int(count.max()) if count.numel() else 0, 1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    if order.shape[-1] < width:
        order = torch.nn.functional.pad(order, (0, width - order.shape[-1]))
    return order.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def build_plan(
    layout: GazeLayout,
    chosen: torch.Tensor,
    tq: int,
    tk: int,
    hkv: int,
    block_q: int,
) -> GazePlan:
    """Block tables for queries that are the last ``tq`` of ``tk`` keys; chosen [B, Hr, Tq, R]."""
    device = chosen.device
    kinds, segment, _ = (t.to(device) for t in layout.padded(tk))
    batch = kinds.shape[0]
    nqb = triton.cdiv(tq, block_q)
    pad_q = nqb * block_q - tq
    q_pos = torch.arange(tk - tq, tk, device=device)
    q_kind, q_seg = kinds[:, q_pos].long(), segment[:, q_pos]
    visual, context, text = (q_kind == k for k in (_VISUAL, _CONTEXT, _TEXT))

    # first position of every segment: context rows start their keys there
    n_seg = int(segment.max()) + 2 if segment.numel() else 1
    seg_start = torch.full((batch, n_seg), tk, device=device, dtype=torch.int64)
    seg_start = seg_start.scatter_reduce(
        1, segment + 1, torch.arange(tk, device=device).expand(batch, tk), "amin"
    )
    row_lo = torch.where(visual, 0, torch.where(context, seg_start.gather(1, q_seg + 1), tk))
    row_hi = torch.where(visual | context, q_pos + 1, 0)
    lo = torch.nn.functional.pad(row_lo, (0, pad_q), value=tk).view(batch, nqb, block_q).amin(-1)
    hi = torch.nn.functional.pad(row_hi, (0, pad_q), value=0).view(batch, nqb, block_q).amax(-1)
    lo = torch.where(hi > lo, lo, 0)
    hi = torch.where(hi > lo, hi, 0)

    dense_idx, dense_ok = layout.dense_index(tk)
    dense_idx, dense_ok = dense_idx.to(device), dense_ok.to(device)
    text_last = torch.where(text, q_pos, -1)
    text_last = (
        torch.nn.functional.pad(text_last, (0, pad_q), value=-1).view(batch, nqb, block_q).amax(-1)
    )
    sorted_pos = torch.where(dense_ok, dense_idx, tk + 1).contiguous()
    dense_cnt = torch.searchsorted(sorted_pos, text_last.contiguous(), right=True)
    dense_cnt = torch.where(text_last >= 0, dense_cnt, 0)

    def per_block(flag):
        return torch.nn.functional.pad(flag, (0, pad_q)).view(batch, nqb, block_q).any(-1)

    row_flags = per_block(visual | context).int() + 2 * per_block(text).int()

    hr, num_r = chosen.shape[1], chosen.shape[3]
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, pad_q))
    # [B, Hkv, Hr / Hkv, NQB, BLOCK_Q, R] -> regions any row of a block selected
    union = padded.view(batch, hkv, hr // hkv, nqb, block_q, num_r).any(4).any(2)
    union_ids, union_cnt = _compact(union)
    inverse, inverse_cnt = _compact(union.transpose(-1, -2))
    return GazePlan(
        kinds=kinds.to(torch.int32).contiguous(),
        segment=segment.to(torch.int32).contiguous(),
        dense_idx=_nonempty(dense_idx.to(torch.int32)),
        dense_cnt=dense_cnt.to(torch.int32).contiguous(),
        lo=lo.to(torch.int32).contiguous(),
        hi=hi.to(torch.int32).contiguous(),
        row_flags=row_flags.to(torch.int32).contiguous(),
        chosen=_nonempty(chosen.to(torch.uint8)),
        union=union_ids,
        union_cnt=union_cnt,
        inverse=inverse,
        inverse_cnt=inverse_cnt,
        tokens=_nonempty(layout.regions.tokens.to(device=device, dtype=torch.int32)),
        num_regions=num_r,
        region_tokens=layout.max_region_tokens,
        heads=hr,
    )


@dataclass(frozen=True)
class _Launch:
    """Compile-time sizes shared by the kernels of one call."""

    g: int
    g_pad: int
    block_q: int
    block_n: int
    d_pad: int
    s: int
    upcast: bool
    precision: str
    num_warps: int

    def consts(self, hkv: int, dim: int) -> dict:
        return dict(
            HKV=hkv,
            G=self.g,
            G_PAD=self.g_pad,
            BLOCK_Q=self.block_q,
            D=dim,
            D_PAD=self.d_pad,
            UPCAST=self.upcast,
            PRECISION=self.precision,
            num_warps=self.num_warps,
        )


def _launch_config(q: torch.Tensor, hkv: int, region_tokens: int) -> _Launch:
    g = q.shape[1] // hkv
    g_pad = triton.next_power_of_2(g)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # rows = query positions x the group's heads; 64 rows keep every tl.dot at least 16 wide
    rows = max(64 if interpret or q.element_size() == 4 else 128, g_pad)
    return _Launch(
        g=g,
        g_pad=g_pad,
        block_q=max(rows // g_pad, 1),
        block_n=64,
        d_pad=max(triton.next_power_of_2(q.shape[-1]), 16),
        s=max(region_tokens, 1),
        upcast=interpret and q.dtype == torch.bfloat16,
        precision="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if rows <= 64 else 8,
    )


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def gaze_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: GazePlan, lc: _Launch, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Hq, Tq, D] and lse [B, Hq, Tq] (log2)."""
    batch, hq, tq, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, tq, device=q.device, dtype=torch.float32)
    nqb = plan.dense_cnt.shape[1]
    _gaze_fwd_kernel[(nqb, batch * hkv)](
        q,
        k,
        v,
        out,
        lse,
        plan.kinds,
        plan.segment,
        plan.dense_idx,
        plan.dense_cnt,
        plan.lo,
        plan.hi,
        plan.chosen,
        plan.union,
        plan.union_cnt,
        plan.tokens,
        *_strides(q, k, v, out),
        tq,
        tk,
        plan.dense_idx.shape[-1],
        plan.num_regions,
        plan.union.shape[-1],
        nqb,
        scale * LOG2E,
        QUERY_HEAD=plan.query_head,
        HR_TOTAL=plan.heads,
        BLOCK_N=lc.block_n,
        S=lc.s,
        **lc.consts(hkv, dim),
    )
    return out, lse


def gaze_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    plan: GazePlan,
    lc: _Launch,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq [B, Hq, Tq, D], dk/dv [B, Hkv, Tk, D] from the output gradient do."""
    batch, hq, tq, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nqb = plan.dense_cnt.shape[1]
    num_r = plan.num_regions
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, Hq, Tq]
    consts = lc.consts(hkv, dim)
    dq = torch.empty_like(q)
    _gaze_bwd_dq_kernel[(nqb, batch * hkv)](
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        plan.kinds,
        plan.segment,
        plan.dense_idx,
        plan.dense_cnt,
        plan.lo,
        plan.hi,
        plan.chosen,
        plan.union,
        plan.union_cnt,
        plan.tokens,
        *_strides(q, k, v, do),
        tq,
        tk,
        plan.dense_idx.shape[-1],
        num_r,
        plan.union.shape[-1],
        nqb,
        scale,
        scale * LOG2E,
        QUERY_HEAD=plan.query_head,
        HR_TOTAL=plan.heads,
        BLOCK_N=lc.block_n,
        S=lc.s,
        **consts,
    )
    dk = torch.empty(batch, hkv, tk, dim, device=k.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    _gaze_bwd_dkdv_kernel[(triton.cdiv(tk, lc.block_n), batch * hkv)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        plan.kinds,
        plan.segment,
        plan.row_flags,
        *_strides(q, k, v, do),
        tq,
        tk,
        nqb,
        scale,
        scale * LOG2E,
        BLOCK_N=lc.block_n,
        **consts,
    )
    if num_r:
        _gaze_bwd_region_kernel[(num_r, batch * hkv)](
            q,
            k,
            v,
            do,
            dk,
            dv,
            lse,
            delta,
            plan.kinds,
            plan.segment,
            plan.chosen,
            plan.inverse,
            plan.inverse_cnt,
            plan.tokens,
            *_strides(q, k, v, do),
            tq,
            tk,
            num_r,
            plan.inverse.shape[-1],
            scale,
            scale * LOG2E,
            QUERY_HEAD=plan.query_head,
            HR_TOTAL=plan.heads,
            S=lc.s,
            S_PAD=max(triton.next_power_of_2(lc.s), 16),
            **consts,
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class GazeAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, lc, scale):
        out, lse = gaze_fwd(q, k, v, plan, lc, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.lc, ctx.scale = plan, lc, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = gaze_bwd(q, k, v, out, lse, do, ctx.plan, ctx.lc, ctx.scale)
        return dq, dk, dv, None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gaze_attention_triton(
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
    """Fused gaze attention (differentiable in q, k and v).

    Args:
        q: [B, Hq, Tq, D] queries, the last Tq of the Tk key positions.
        k, v: [B, Hkv, Tk, D] keys and values (GQA: Hq a multiple of Hkv, not repeated).
        layout: token kinds, segments and region tables of the batch.
        config: budget and routing mode.
        scale: softmax scale, default D ** -0.5.
        descriptors: [B, Hkv, R, D] fp32 region mean keys; computed from k when not given.
        top_k: overrides the config's budget.
        return_selection: also return the selected ids [B, Hr, Tq, K] in the stats.

    Returns:
        out [B, Hq, Tq, D] in q's dtype, and GazeStats.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    layout = layout.to(q.device)
    # out and dq share q's strides; k and v are read through theirs
    q = q.contiguous()
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    hkv, tq, tk = k.shape[1], q.shape[2], k.shape[2]
    q_pos, q_kind, visible, ids, chosen = gaze_route(
        q.detach(), k.detach(), layout, config, descriptors=descriptors, top_k=top_k
    )
    lc = _launch_config(q, hkv, layout.max_region_tokens)
    plan = build_plan(layout, chosen, tq, tk, hkv, lc.block_q)
    out = GazeAttentionFunction.apply(q, k, v, plan, lc, scale)
    stats = compute_stats(layout, q_pos, q_kind, chosen, visible, ids if return_selection else None)
    return out, stats
