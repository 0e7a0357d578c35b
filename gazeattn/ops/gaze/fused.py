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


# The kernels keep their argument lists compact (as Triton code usually does).
# fmt: off


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # the interpreter stores bf16 as uint16 and tl.dot on it returns garbage
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G: tl.constexpr, G_PAD: tl.constexpr,
                BLOCK_Q: tl.constexpr):
    """Rows of a query block (positions x the group's heads): query index, query head,
    validity, position, kind (padding rows read as PAD) and segment."""
    rows = tl.arange(0, BLOCK_Q * G_PAD)
    qi = qb * BLOCK_Q + rows // G_PAD
    g = rows % G_PAD
    row_ok = (qi < Tq) & (g < G)
    qpos = Tk - Tq + qi
    head = kvh * G + g
    qkind = tl.load(KIND + b * Tk + qpos, mask=row_ok, other=3)
    qseg = tl.load(SEG + b * Tk + qpos, mask=row_ok, other=-1)
    return qi, head, row_ok, qpos, qkind, qseg


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, stride_qb, stride_qh,
               stride_qt, stride_ob, stride_oh, stride_ot, HQ: tl.constexpr):
    """q, do, lse and delta of a block's rows (for the backward kernels)."""
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot + d[None, :], mask=mask, other=0.0)
    row = (b * HQ + head) * Tq + qi
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _routing_head(head, kvh, QUERY_HEAD: tl.constexpr):
    """The selection a row follows: its own query head's, or its KV head's."""
    if QUERY_HEAD:
        return head
    return head * 0 + kvh


@triton.jit
def _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg):
    """Mask of the visual and context rows over keys in natural order: visual rows see every
    earlier non-padding key, context rows the earlier keys of their own image or frame."""
    kkind = tl.load(KIND + b * Tk + kpos, mask=k_ok, other=3)
    kseg = tl.load(SEG + b * Tk + kpos, mask=k_ok, other=-2)
    key_ok = k_ok & (kkind != 3)
    own = (kseg[None, :] == qseg[:, None]) & ((kkind == 1) | (kkind == 2))[None, :]
    rule = (qkind == 1)[:, None] | ((qkind == 2)[:, None] & own)
    return rule & key_ok[None, :] & (kpos[None, :] <= qpos[:, None])


@triton.jit
def _text_dense_tile(j, n_dense, DENSE_IDX, b, N_DENSE, qpos, qkind):
    """Keys j of the compacted text/context index and the text rows' causal mask over them."""
    j_ok = j < n_dense
    kpos = tl.load(DENSE_IDX + b * N_DENSE + j, mask=j_ok, other=0)
    allowed = (qkind == 0)[:, None] & j_ok[None, :] & (kpos[None, :] <= qpos[:, None])
    return kpos, j_ok, allowed


@triton.jit
def _region_tile(j, n_slots, UNION, TOKENS, CHOSEN, b, R, Tq, hr, qi, qkind, S: tl.constexpr,
                 HR_TOTAL: tl.constexpr):
    """Tokens of the block's selected regions (slot j = token j % S of region UNION[j // S])
    and the text rows' mask: the token's region is one that row (head) selected."""
    j_ok = j < n_slots
    reg = tl.load(UNION + j // S, mask=j_ok, other=0)
    kpos = tl.load(TOKENS + (b * R + reg) * S + j % S, mask=j_ok, other=-1)
    k_ok = j_ok & (kpos >= 0)
    kpos = tl.where(k_ok, kpos, 0)
    row_t = qkind == 0
    chosen = CHOSEN + ((b * HR_TOTAL + hr[:, None]) * Tq + qi[:, None]) * R + reg[None, :]
    picked = tl.load(chosen, mask=row_t[:, None] & k_ok[None, :], other=0)
    return kpos, k_ok, (picked != 0) & row_t[:, None] & k_ok[None, :]


@triton.jit
def _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok):
    mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=mask, other=0.0)
    vv = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :], mask=mask, other=0.0)
    return kk, vv


@triton.jit
def _softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over a tile of keys (unmasked tiles skip the select)."""
    s = _dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, UPCAST, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _probs(q, kk, lse, allowed, scale_log2, MASKED: tl.constexpr, UPCAST: tl.constexpr,
           PRECISION: tl.constexpr):
    """Recomputed probabilities of a tile from the saved log-sum-exp (log2 domain)."""
    p = tl.exp2(_dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    return p


@triton.jit
def _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, MASKED: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq contribution of a tile of keys (before the final multiplication by the scale)."""
    p = _probs(q, kk, lse, allowed, scale_log2, MASKED, UPCAST, PRECISION)
    ds = p * (_dot(do, tl.trans(vv), UPCAST, PRECISION) - delta[:, None])
    return dq + _dot(ds.to(kk.dtype), kk, UPCAST, PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, MASKED: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dk (before the scale) and dv contributions of a block of rows to a tile of keys."""
    p = _probs(q, kk, lse, allowed, scale_log2, MASKED, UPCAST, PRECISION)
    dv = dv + _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
    ds = p * (_dot(do, tl.trans(vv), UPCAST, PRECISION) - delta[:, None])
    dk = dk + _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _gaze_fwd_kernel(
    Q, K, V, OUT, LSE,
    KIND, SEG, DENSE_IDX, DENSE_CNT, LO, FULL_LO, FULL_HI, HI, CHOSEN, UNION, UNION_CNT, TOKENS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, N_DENSE, R, U_MAX, NQB, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, QUERY_HEAD: tl.constexpr,
    HR_TOTAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, S: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q)
    hr = _routing_head(head, kvh, QUERY_HEAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :], mask=row_mask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_Q * G_PAD], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)

    # 1. visual and context rows over [lo, hi): masked, then a stretch every row sees
    #    in full (blocks of visual rows only, below their first query), then masked again
    lo = tl.load(LO + b * NQB + qb)
    full_lo = tl.load(FULL_LO + b * NQB + qb)
    full_hi = tl.load(FULL_HI + b * NQB + qb)
    hi = tl.load(HI + b * NQB + qb)
    for start in range(lo, full_lo, BLOCK_N):
        kpos = start + offs
        k_ok = kpos < full_lo
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)
    for start in range(full_lo, full_hi, BLOCK_N):
        kpos = start + offs
        kk, vv = _load_keys(k_base, v_base, kpos, kpos < full_hi, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, q, kk, vv, None, scale_log2, False, UPCAST, PRECISION)
    for start in range(full_hi, hi, BLOCK_N):
        kpos = start + offs
        k_ok = kpos < hi
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    # 2. text rows over the earlier text and context keys
    n_dense = tl.load(DENSE_CNT + b * NQB + qb)
    for start in range(0, n_dense, BLOCK_N):
        kpos, k_ok, allowed = _text_dense_tile(start + offs, n_dense, DENSE_IDX, b, N_DENSE, qpos, qkind)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    # 3. text rows over the visual tokens of their selected regions
    block = (b * HKV + kvh) * NQB + qb
    n_slots = tl.load(UNION_CNT + block) * S
    for start in range(0, n_slots, BLOCK_N):
        kpos, k_ok, allowed = _region_tile(start + offs, n_slots, UNION + block * U_MAX, TOKENS, CHOSEN, b, R, Tq, hr, qi, qkind, S, HR_TOTAL)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = _softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    # rows with no key (padding queries) output 0
    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot + d[None, :], out.to(OUT.dtype.element_ty), mask=row_mask)
    tl.store(LSE + (b * HKV * G + head) * Tq + qi, tl.where(has_key, m_i + tl.log2(l_safe), 0.0), mask=row_ok)


@triton.jit
def _gaze_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    KIND, SEG, DENSE_IDX, DENSE_CNT, LO, FULL_LO, FULL_HI, HI, CHOSEN, UNION, UNION_CNT, TOKENS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, N_DENSE, R, U_MAX, NQB, scale, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, QUERY_HEAD: tl.constexpr,
    HR_TOTAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, S: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of a query block: the forward's three loops, recomputing p from the log-sum-exp."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q)
    hr = _routing_head(head, kvh, QUERY_HEAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot, HKV * G)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs = tl.arange(0, BLOCK_N)
    dq = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)

    lo = tl.load(LO + b * NQB + qb)
    full_lo = tl.load(FULL_LO + b * NQB + qb)
    full_hi = tl.load(FULL_HI + b * NQB + qb)
    hi = tl.load(HI + b * NQB + qb)
    for start in range(lo, full_lo, BLOCK_N):
        kpos = start + offs
        k_ok = kpos < full_lo
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)
    for start in range(full_lo, full_hi, BLOCK_N):
        kpos = start + offs
        kk, vv = _load_keys(k_base, v_base, kpos, kpos < full_hi, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, None, scale_log2, False, UPCAST, PRECISION)
    for start in range(full_hi, hi, BLOCK_N):
        kpos = start + offs
        k_ok = kpos < hi
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    n_dense = tl.load(DENSE_CNT + b * NQB + qb)
    for start in range(0, n_dense, BLOCK_N):
        kpos, k_ok, allowed = _text_dense_tile(start + offs, n_dense, DENSE_IDX, b, N_DENSE, qpos, qkind)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    block = (b * HKV + kvh) * NQB + qb
    n_slots = tl.load(UNION_CNT + block) * S
    for start in range(0, n_slots, BLOCK_N):
        kpos, k_ok, allowed = _region_tile(start + offs, n_slots, UNION + block * U_MAX, TOKENS, CHOSEN, b, R, Tq, hr, qi, qkind, S, HR_TOTAL)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    dq_ptr = DQ + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :]
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _gaze_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KIND, SEG, ROW_FLAGS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, NQB, scale, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of a block of keys in natural order from the non-routed rules (loops 1 and 2)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kpos < Tk
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    kk, vv = _load_keys(K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
    kkind = tl.load(KIND + b * Tk + kpos, mask=k_ok, other=3)
    # text rows reach this block only through its text and context keys
    dense_key = k_ok & ((kkind == 0) | (kkind == 2))
    any_dense = tl.max(dense_key.to(tl.int32), 0)
    # a full block without padding keys is seen whole by a block of visual rows after it
    clean_keys = tl.min((k_ok & (kkind != 3)).to(tl.int32), 0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    first = tl.maximum(kb * BLOCK_N - (Tk - Tq), 0) // BLOCK_Q
    for qb in range(first, NQB):
        # bit 0: visual or context rows; bit 1: text rows; bit 2: visual rows only
        flags = tl.load(ROW_FLAGS + b * NQB + qb)
        if ((flags & 1) != 0) | (((flags & 2) != 0) & (any_dense != 0)):
            qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q)
            q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot, HKV * G)
            whole = ((flags & 4) != 0) & (clean_keys != 0) & (kb * BLOCK_N + BLOCK_N - 1 <= Tk - Tq + qb * BLOCK_Q)
            if whole:
                dk, dv = _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, None, scale_log2, False, UPCAST, PRECISION)
            else:
                allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
                allowed = allowed | ((qkind == 0)[:, None] & dense_key[None, :] & (kpos[None, :] <= qpos[:, None]))
                dk, dv = _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, True, UPCAST, PRECISION)
    out = ((b * HKV + kvh) * Tk + kpos)[:, None] * D + d[None, :]
    mask = k_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, dk * scale, mask=mask)
    tl.store(DV + out, dv, mask=mask)


@triton.jit
def _gaze_bwd_region_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KIND, SEG, CHOSEN, INV, INV_CNT, TOKENS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, R, INV_MAX, scale, scale_log2,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, QUERY_HEAD: tl.constexpr,
    HR_TOTAL: tl.constexpr, BLOCK_Q: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    S: tl.constexpr, S_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of one region's tokens from the text rows that selected it (loop 3), added to
    the non-routed part already in DK/DV (a token belongs to one region: no atomics)."""
    r = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    n_blocks = tl.load(INV_CNT + (b * HKV + kvh) * R + r)
    if n_blocks > 0:
        s = tl.arange(0, S_PAD)
        kpos = tl.load(TOKENS + (b * R + r) * S + s, mask=s < S, other=-1)
        k_ok = kpos >= 0
        kpos = tl.where(k_ok, kpos, 0)
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        kk, vv = _load_keys(K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dk = tl.zeros([S_PAD, D_PAD], tl.float32)
        dv = tl.zeros([S_PAD, D_PAD], tl.float32)
        inv = INV + ((b * HKV + kvh) * R + r) * INV_MAX
        for i in range(0, n_blocks):
            qb = tl.load(inv + i)
            qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, BLOCK_Q)
            hr = _routing_head(head, kvh, QUERY_HEAD)
            row_t = qkind == 0
            picked = tl.load(CHOSEN + ((b * HR_TOTAL + hr) * Tq + qi) * R + r, mask=row_t, other=0)
            allowed = ((picked != 0) & row_t)[:, None] & k_ok[None, :]
            q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot, HKV * G)
            dk, dv = _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, True, UPCAST, PRECISION)
        out = ((b * HKV + kvh) * Tk + kpos)[:, None] * D + d[None, :]
        mask = k_ok[:, None] & d_ok[None, :]
        tl.store(DK + out, tl.load(DK + out, mask=mask, other=0.0) + dk * scale, mask=mask)
        tl.store(DV + out, tl.load(DV + out, mask=mask, other=0.0) + dv, mask=mask)


# fmt: on


@dataclass(frozen=True, kw_only=True)
class GazePlan:
    """Per-call block tables the kernels read (built with torch ops from the layout and
    the routing; the largest is the per-query selection, ``[B, Hr, Tq, R]`` bits).

    kinds, segment: [B, Tk] int32 metadata of every key position.
    dense_idx:      [B, N] int32 text/context key positions (compacted).
    dense_cnt:      [B, NQB] dense keys up to each block's last text query (0 without text rows).
    lo, hi:         [B, NQB] contiguous key range of each block's visual and context rows;
    full_lo/hi:     the part of it that needs no mask (see ``_causal_ranges``).
    row_flags:      [B, NQB] bit 0: visual/context rows, bit 1: text rows, 2: visual only.
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
    full_lo: torch.Tensor
    full_hi: torch.Tensor
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
    block_n: int,
) -> GazePlan:
    """Block tables for queries that are the last ``tq`` of ``tk`` keys; chosen [B, Hr, Tq, R]."""
    device = chosen.device
    kinds, segment, _ = (t.to(device) for t in layout.padded(tk))
    batch = kinds.shape[0]
    nqb = triton.cdiv(tq, block_q)
    q_pos = torch.arange(tk - tq, tk, device=device)
    q_kind = kinds[:, q_pos].long()
    visual, context, text = (q_kind == k for k in (_VISUAL, _CONTEXT, _TEXT))

    def per_block(rows, fill, reduce):
        # [B, Tq] -> [B, NQB]: reduce each block's rows (padding rows read as ``fill``)
        padded = torch.nn.functional.pad(rows, (0, nqb * block_q - tq), value=fill)
        return reduce(padded.view(batch, nqb, block_q), -1)

    lo, full_lo, full_hi, hi = _causal_ranges(
        kinds, segment, q_pos, visual, context, per_block, block_q, block_n
    )
    dense_idx, dense_ok = (t.to(device) for t in layout.dense_index(tk))
    text_last = per_block(torch.where(text, q_pos, -1), -1, torch.amax)
    sorted_pos = torch.where(dense_ok, dense_idx, tk + 1).contiguous()
    dense_cnt = torch.searchsorted(sorted_pos, text_last.contiguous(), right=True)
    dense_cnt = torch.where(text_last >= 0, dense_cnt, 0)
    row_flags = (
        per_block(visual | context, False, torch.any).int()
        + 2 * per_block(text, False, torch.any).int()
        + 4 * per_block(visual, True, torch.all).int()
    )

    hr, num_r = chosen.shape[1], chosen.shape[3]
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, nqb * block_q - tq))
    # [B, Hkv, Hr / Hkv, NQB, BLOCK_Q, R] -> regions any row of a block selected
    union = padded.view(batch, hkv, hr // hkv, nqb, block_q, num_r).any(4).any(2)
    union_ids, union_cnt = _compact(union)
    inverse, inverse_cnt = _compact(union.transpose(-1, -2))

    def int32(t):
        return t.to(torch.int32).contiguous()

    return GazePlan(
        kinds=int32(kinds),
        segment=int32(segment),
        dense_idx=_nonempty(int32(dense_idx)),
        dense_cnt=int32(dense_cnt),
        lo=int32(lo),
        full_lo=int32(full_lo),
        full_hi=int32(full_hi),
        hi=int32(hi),
        row_flags=int32(row_flags),
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


def _causal_ranges(kinds, segment, q_pos, visual, context, per_block, block_q, block_n):
    """[B, NQB] key ranges of the visual and context rows: all of [lo, hi) may be seen, and
    [full_lo, full_hi) (whole tiles, no padding key, below the block's first query) is seen
    by every row of a block of visual rows only, so those tiles need no mask."""
    batch, tk = kinds.shape
    device = kinds.device
    positions = torch.arange(tk, device=device)
    # first position of every segment: context rows start their keys there
    n_seg = int(segment.max()) + 2
    seg_start = torch.full((batch, n_seg), tk, device=device, dtype=torch.int64)
    seg_start = seg_start.scatter_reduce(1, segment + 1, positions.expand(batch, tk), "amin")
    q_seg = segment[:, q_pos]
    row_lo = torch.where(visual, 0, torch.where(context, seg_start.gather(1, q_seg + 1), tk))
    row_hi = torch.where(visual | context, q_pos + 1, 0)
    lo = per_block(row_lo, tk, torch.amin)
    hi = per_block(row_hi, 0, torch.amax)
    empty = hi <= lo
    lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)

    nqb = lo.shape[1]
    first_q = q_pos[0] + torch.arange(nqb, device=device) * block_q  # [NQB]
    pad = kinds == _PAD
    last_pad = torch.cummax(torch.where(pad, positions, -1), dim=1).values  # [B, Tk]
    start = last_pad[:, first_q] + 1
    tiles = (first_q + 1 - start).clamp(min=0) // block_n
    whole = per_block(visual, True, torch.all) & (tiles > 0) & ~empty
    full_lo = torch.where(whole, start, hi)
    full_hi = torch.where(whole, start + tiles * block_n, hi)
    return lo, full_lo, full_hi, hi


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


def _routing_args(plan: GazePlan) -> tuple:
    """The block tables the forward and dq kernels read, in their argument order."""
    return (
        plan.kinds, plan.segment, plan.dense_idx, plan.dense_cnt, plan.lo, plan.full_lo,
        plan.full_hi, plan.hi, plan.chosen, plan.union, plan.union_cnt, plan.tokens,
    )  # fmt: skip


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
        q, k, v, out, lse, *_routing_args(plan), *_strides(q, k, v, out),
        tq, tk, plan.dense_idx.shape[-1], plan.num_regions, plan.union.shape[-1], nqb,
        scale * LOG2E, QUERY_HEAD=plan.query_head, HR_TOTAL=plan.heads, BLOCK_N=lc.block_n,
        S=lc.s, **lc.consts(hkv, dim),
    )  # fmt: skip
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
    batch, _, tq, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nqb = plan.dense_cnt.shape[1]
    num_r = plan.num_regions
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, Hq, Tq]
    consts = lc.consts(hkv, dim)
    strides = _strides(q, k, v, do)
    dq = torch.empty_like(q)
    _gaze_bwd_dq_kernel[(nqb, batch * hkv)](
        q, k, v, do, dq, lse, delta, *_routing_args(plan), *strides,
        tq, tk, plan.dense_idx.shape[-1], num_r, plan.union.shape[-1], nqb, scale,
        scale * LOG2E, QUERY_HEAD=plan.query_head, HR_TOTAL=plan.heads, BLOCK_N=lc.block_n,
        S=lc.s, **consts,
    )  # fmt: skip
    # [B, Hkv, Tk, D] fp32: the key-block kernel stores, the region kernel adds
    dk = torch.empty(batch, hkv, tk, dim, device=k.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    _gaze_bwd_dkdv_kernel[(triton.cdiv(tk, lc.block_n), batch * hkv)](
        q, k, v, do, dk, dv, lse, delta, plan.kinds, plan.segment, plan.row_flags, *strides,
        tq, tk, nqb, scale, scale * LOG2E, BLOCK_N=lc.block_n, **consts,
    )  # fmt: skip
    if num_r:
        _gaze_bwd_region_kernel[(num_r, batch * hkv)](
            q, k, v, do, dk, dv, lse, delta, plan.kinds, plan.segment, plan.chosen,
            plan.inverse, plan.inverse_cnt, plan.tokens, *strides,
            tq, tk, num_r, plan.inverse.shape[-1], scale, scale * LOG2E,
            QUERY_HEAD=plan.query_head, HR_TOTAL=plan.heads, S=lc.s,
            S_PAD=max(triton.next_power_of_2(lc.s), 16), **consts,
        )  # fmt: skip
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
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
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
    plan = build_plan(layout, chosen, tq, tk, hkv, lc.block_q, lc.block_n)
    out = GazeAttentionFunction.apply(q, k, v, plan, lc, scale)
    stats = compute_stats(layout, q_pos, q_kind, chosen, visible, ids if return_selection else None)
    return out, stats
