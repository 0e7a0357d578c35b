"""Fused Triton gaze attention for training and prefill: forward and backward.

One program owns a block of query positions and every query head of one KV
head's GQA group (rows = positions x heads, so small groups fill a tile without
padding each head to 16 rows). Keys come from three loops, each with an online
softmax and a mask computed on the fly from per-token metadata, never from a
dense ``[Tq, Tk]`` mask:

1. visual and context rows, masked: the parts of a contiguous causal range of
   keys that need a mask (visual rows see every earlier key, context rows only
   their own image or frame);
2. the same rows, unmasked: whole tiles every row of a block of visual rows sees;
3. text rows: a virtual key list, the text and context keys (through the
   compacted dense index) followed by the visual tokens of the regions any row
   of the block selected (through the region token table), masked per row by
   that row's selection.

Routing (descriptors, scores, budgets, Top-K) is ``gazeattn.ops.routing.route``,
so this backend selects exactly the reference's regions; the block tables come
from ``gazeattn.ops.gaze.plan`` and the block sizes, warps and stages from
``gazeattn.ops.gaze.launch``. The backward recomputes the probabilities from
the saved log-sum-exp: dq per query block with the same loops, dk/dv per key
block for the first two, and dk/dv per region for the routed keys (a region's
tokens belong to one program, so no atomics are needed).

Only the tile sizes are compile-time constants: group, region and head sizes
and lengths are runtime arguments (not specialised), so one binary serves every
model shape of a dtype and padded head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.common import (
    CONTEXT,
    FLAG_CAUSAL,
    FLAG_TEXT,
    FLAG_VISUAL_ONLY,
    LOG2E,
    PAD,
    TEXT,
    VISUAL,
    dot,
    softmax_tile,
)
from gazeattn.ops.gaze.launch import FusedLaunch, device_spec, fused_launch
from gazeattn.ops.gaze.plan import GazePlan, build_plan
from gazeattn.ops.gaze.stats import GazeStats, compute_stats
from gazeattn.ops.layout import GazeLayout
from gazeattn.ops.routing import route

# The kernels keep their argument lists compact (as Triton code usually does).
# fmt: off


@triton.jit
def _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, ROWS: tl.constexpr):
    """Rows of a query block (positions x the group's heads padded to G_PAD): query index,
    query head, validity, position, kind (padding rows read as PAD) and segment."""
    rows = tl.arange(0, ROWS)
    qi = qb * (ROWS // G_PAD) + rows // G_PAD
    g = rows % G_PAD
    row_ok = (qi < Tq) & (g < G)
    qpos = Tk - Tq + qi
    head = kvh * G + g
    qkind = tl.load(KIND + b * Tk + qpos, mask=row_ok, other=PAD)
    qseg = tl.load(SEG + b * Tk + qpos, mask=row_ok, other=-1)
    return qi, head, row_ok, qpos, qkind, qseg


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, HQ, stride_qb, stride_qh,
               stride_qt, stride_ob, stride_oh, stride_ot):
    """q, do, lse and delta of a block's rows (for the backward kernels)."""
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot + d[None, :], mask=mask, other=0.0)
    row = (b * HQ + head) * Tq + qi
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _routing_head(head, kvh, QUERY_HEAD):
    """The selection a row follows: its own query head's, or its KV head's."""
    return tl.where(QUERY_HEAD != 0, head, head * 0 + kvh)


@triton.jit
def _masked_range(i, n_before, lo, full_lo, full_hi, hi, BLOCK_N: tl.constexpr):
    """Tile i of the keys [lo, full_lo) then [full_hi, hi): its first key and the end."""
    before = i < n_before
    start = tl.where(before, lo + i * BLOCK_N, full_hi + (i - n_before) * BLOCK_N)
    end = tl.where(before, full_lo, hi)
    return start, end


@triton.jit
def _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg):
    """Mask of the visual and context rows over keys in natural order: visual rows see every
    earlier non-padding key, context rows the earlier keys of their own image or frame."""
    kkind = tl.load(KIND + b * Tk + kpos, mask=k_ok, other=PAD)
    kseg = tl.load(SEG + b * Tk + kpos, mask=k_ok, other=-2)
    key_ok = k_ok & (kkind != PAD)
    own = (kseg[None, :] == qseg[:, None]) & ((kkind == VISUAL) | (kkind == CONTEXT))[None, :]
    rule = (qkind == VISUAL)[:, None] | ((qkind == CONTEXT)[:, None] & own)
    return rule & key_ok[None, :] & (kpos[None, :] <= qpos[:, None])


@triton.jit
def _gather_tile(j, n_dense, n_total, DENSE_IDX, UNION, TOKENS, CHOSEN, b, N_DENSE, R, Tq, S,
                 HR_TOTAL, hr, qi, qpos, qkind):
    """Keys j of a text block's virtual list: first the compacted text/context index (causal
    per row), then slot j - n_dense = token (j - n_dense) % S of region UNION[(j - n_dense) // S]
    (allowed where that row, or its KV head, selected the region)."""
    row_t = qkind == TEXT
    is_dense = j < n_dense
    dense_pos = tl.load(DENSE_IDX + b * N_DENSE + j, mask=is_dense, other=0)
    slot = tl.where(is_dense, 0, j - n_dense)
    routed = (j >= n_dense) & (j < n_total)
    reg = tl.load(UNION + slot // S, mask=routed, other=0)
    region_pos = tl.load(TOKENS + (b * R + reg) * S + slot % S, mask=routed, other=-1)
    routed = routed & (region_pos >= 0)
    chosen = CHOSEN + ((b * HR_TOTAL + hr[:, None]) * Tq + qi[:, None]) * R + reg[None, :]
    picked = tl.load(chosen, mask=row_t[:, None] & routed[None, :], other=0)
    kpos = tl.where(is_dense, dense_pos, tl.maximum(region_pos, 0))
    dense_ok = is_dense[None, :] & (kpos[None, :] <= qpos[:, None])
    allowed = row_t[:, None] & (dense_ok | ((picked != 0) & routed[None, :]))
    return kpos, is_dense | routed, allowed


@triton.jit
def _block_ranges(LO, FULL_LO, FULL_HI, HI, b, NQB, qb, BLOCK_N: tl.constexpr):
    """A query block's causal key range: [lo, hi) with the unmasked part [full_lo, full_hi),
    and the number of masked tiles (n_masked, of which n_before lie before full_lo)."""
    lo = tl.load(LO + b * NQB + qb)
    full_lo = tl.load(FULL_LO + b * NQB + qb)
    full_hi = tl.load(FULL_HI + b * NQB + qb)
    hi = tl.load(HI + b * NQB + qb)
    n_before = tl.cdiv(full_lo - lo, BLOCK_N)
    return lo, full_lo, full_hi, hi, n_before, n_before + tl.cdiv(hi - full_hi, BLOCK_N)


@triton.jit
def _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok):
    mask = k_ok[:, None] & d_ok[None, :]
    kk = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :], mask=mask, other=0.0)
    vv = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :], mask=mask, other=0.0)
    return kk, vv


@triton.jit
def _probs(q, kk, lse, allowed, scale_log2, MASKED: tl.constexpr, UPCAST: tl.constexpr,
           PRECISION: tl.constexpr):
    """Recomputed probabilities of a tile from the saved log-sum-exp (log2 domain)."""
    p = tl.exp2(dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    return p


@triton.jit
def _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, MASKED: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq contribution of a tile of keys (before the final multiplication by the scale)."""
    p = _probs(q, kk, lse, allowed, scale_log2, MASKED, UPCAST, PRECISION)
    ds = p * (dot(do, tl.trans(vv), UPCAST, PRECISION) - delta[:, None])
    return dq + dot(ds.to(kk.dtype), kk, UPCAST, PRECISION)


@triton.jit
def _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, MASKED: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dk (before the scale) and dv contributions of a block of rows to a tile of keys."""
    p = _probs(q, kk, lse, allowed, scale_log2, MASKED, UPCAST, PRECISION)
    dv = dv + dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
    ds = p * (dot(do, tl.trans(vv), UPCAST, PRECISION) - delta[:, None])
    dk = dk + dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    return dk, dv


# sizes and counts change per call but not the compiled code: not specialised
@triton.jit(do_not_specialize=["Tq", "Tk", "N_DENSE", "R", "U_MAX", "NQB", "HKV", "G", "G_PAD", "HR_TOTAL", "QUERY_HEAD", "S"])
def _gaze_fwd_kernel(
    Q, K, V, OUT, LSE,
    KIND, SEG, DENSE_IDX, DENSE_CNT, LO, FULL_LO, FULL_HI, HI, CHOSEN, UNION, UNION_CNT, TOKENS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, N_DENSE, R, U_MAX, NQB, HKV, G, G_PAD, HR_TOTAL, QUERY_HEAD, S, D, scale_log2,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, ROWS)
    hr = _routing_head(head, kvh, QUERY_HEAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :], mask=row_mask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], -1e30, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)

    # 1. visual and context rows over the masked parts of their causal range
    lo, full_lo, full_hi, hi, n_before, n_masked = _block_ranges(LO, FULL_LO, FULL_HI, HI, b, NQB, qb, BLOCK_N)
    for i in range(0, n_masked):
        start, end = _masked_range(i, n_before, lo, full_lo, full_hi, hi, BLOCK_N)
        kpos = start + offs
        k_ok = kpos < end
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)
    # 2. the stretch every row sees in full (blocks of visual rows only, below their first query)
    for start in range(full_lo, full_hi, BLOCK_N):
        kpos = start + offs
        kk, vv = _load_keys(k_base, v_base, kpos, kpos < full_hi, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kk, vv, None, scale_log2, False, UPCAST, PRECISION)

    # 3. text rows over the earlier text and context keys, then their selected regions' tokens
    n_dense = tl.load(DENSE_CNT + b * NQB + qb)
    block = (b * HKV + kvh) * NQB + qb
    n_total = n_dense + tl.load(UNION_CNT + block) * S
    for start in range(0, n_total, BLOCK_N):
        kpos, k_ok, allowed = _gather_tile(start + offs, n_dense, n_total, DENSE_IDX, UNION + block * U_MAX, TOKENS, CHOSEN, b, N_DENSE, R, Tq, S, HR_TOTAL, hr, qi, qpos, qkind)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        acc, m_i, l_i = softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    # rows with no key (padding queries) output 0
    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_ot + d[None, :], out.to(OUT.dtype.element_ty), mask=row_mask)
    tl.store(LSE + (b * HKV * G + head) * Tq + qi, tl.where(has_key, m_i + tl.log2(l_safe), 0.0), mask=row_ok)


# sizes and counts change per call but not the compiled code: not specialised
@triton.jit(do_not_specialize=["Tq", "Tk", "N_DENSE", "R", "U_MAX", "NQB", "HKV", "G", "G_PAD", "HR_TOTAL", "QUERY_HEAD", "S"])
def _gaze_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    KIND, SEG, DENSE_IDX, DENSE_CNT, LO, FULL_LO, FULL_HI, HI, CHOSEN, UNION, UNION_CNT, TOKENS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, N_DENSE, R, U_MAX, NQB, HKV, G, G_PAD, HR_TOTAL, QUERY_HEAD, S, D, scale, scale_log2,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq of a query block: the forward's three loops, recomputing p from the log-sum-exp."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, ROWS)
    hr = _routing_head(head, kvh, QUERY_HEAD)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, HKV * G, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    offs = tl.arange(0, BLOCK_N)
    dq = tl.zeros([ROWS, D_PAD], tl.float32)

    lo, full_lo, full_hi, hi, n_before, n_masked = _block_ranges(LO, FULL_LO, FULL_HI, HI, b, NQB, qb, BLOCK_N)
    for i in range(0, n_masked):
        start, end = _masked_range(i, n_before, lo, full_lo, full_hi, hi, BLOCK_N)
        kpos = start + offs
        k_ok = kpos < end
        allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)
    for start in range(full_lo, full_hi, BLOCK_N):
        kpos = start + offs
        kk, vv = _load_keys(k_base, v_base, kpos, kpos < full_hi, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, None, scale_log2, False, UPCAST, PRECISION)

    n_dense = tl.load(DENSE_CNT + b * NQB + qb)
    block = (b * HKV + kvh) * NQB + qb
    n_total = n_dense + tl.load(UNION_CNT + block) * S
    for start in range(0, n_total, BLOCK_N):
        kpos, k_ok, allowed = _gather_tile(start + offs, n_dense, n_total, DENSE_IDX, UNION + block * U_MAX, TOKENS, CHOSEN, b, N_DENSE, R, Tq, S, HR_TOTAL, hr, qi, qpos, qkind)
        kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
        dq = _dq_tile(dq, q, do, lse, delta, kk, vv, allowed, scale_log2, True, UPCAST, PRECISION)

    dq_ptr = DQ + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :]
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["Tq", "Tk", "NQB", "HKV", "G", "G_PAD"])
def _gaze_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KIND, SEG, ROW_FLAGS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, NQB, HKV, G, G_PAD, D, scale, scale_log2,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of a block of keys in natural order from the non-routed rules (loops 1 to 3,
    the text rows through their text and context keys)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    block_q = ROWS // G_PAD
    kpos = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kpos < Tk
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    kk, vv = _load_keys(K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
    kkind = tl.load(KIND + b * Tk + kpos, mask=k_ok, other=PAD)
    # text rows reach this block only through its text and context keys
    dense_key = k_ok & ((kkind == TEXT) | (kkind == CONTEXT))
    any_dense = tl.max(dense_key.to(tl.int32), 0)
    # a full block without padding keys is seen whole by a block of visual rows after it
    clean_keys = tl.min((k_ok & (kkind != PAD)).to(tl.int32), 0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    first = tl.maximum(kb * BLOCK_N - (Tk - Tq), 0) // block_q
    for qb in range(first, NQB):
        flags = tl.load(ROW_FLAGS + b * NQB + qb)
        if ((flags & FLAG_CAUSAL) != 0) | (((flags & FLAG_TEXT) != 0) & (any_dense != 0)):
            qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, ROWS)
            q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, HKV * G, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot)
            whole = ((flags & FLAG_VISUAL_ONLY) != 0) & (clean_keys != 0) & (kb * BLOCK_N + BLOCK_N - 1 <= Tk - Tq + qb * block_q)
            if whole:
                dk, dv = _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, None, scale_log2, False, UPCAST, PRECISION)
            else:
                allowed = _causal_tile(kpos, k_ok, KIND, SEG, b, Tk, qpos, qkind, qseg)
                allowed = allowed | ((qkind == TEXT)[:, None] & dense_key[None, :] & (kpos[None, :] <= qpos[:, None]))
                dk, dv = _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, True, UPCAST, PRECISION)
    out = ((b * HKV + kvh) * Tk + kpos)[:, None] * D + d[None, :]
    mask = k_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, dk * scale, mask=mask)
    tl.store(DV + out, dv, mask=mask)


@triton.jit(do_not_specialize=["Tq", "Tk", "R", "INV_MAX", "HKV", "G", "G_PAD", "HR_TOTAL", "QUERY_HEAD", "S"])
def _gaze_bwd_region_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KIND, SEG, CHOSEN, INV, INV_CNT, TOKENS,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    Tq, Tk, R, INV_MAX, HKV, G, G_PAD, HR_TOTAL, QUERY_HEAD, S, D, scale, scale_log2,
    ROWS: tl.constexpr, BLOCK_S: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv of one region's tokens (BLOCK_S at a time) from the text rows that selected it
    (loop 3), added to the non-routed part already in DK/DV (a token belongs to one region:
    no atomics)."""
    r = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: batch offsets (b * stride) pass 2**31 on long multi-frame batches
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    n_blocks = tl.load(INV_CNT + (b * HKV + kvh) * R + r)
    if n_blocks > 0:
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        inv = INV + ((b * HKV + kvh) * R + r) * INV_MAX
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            kpos = tl.load(TOKENS + (b * R + r) * S + s, mask=s < S, other=-1)
            k_ok = kpos >= 0
            kpos = tl.where(k_ok, kpos, 0)
            kk, vv = _load_keys(k_base, v_base, kpos, k_ok, stride_kt, stride_vt, d, d_ok)
            dk = tl.zeros([BLOCK_S, D_PAD], tl.float32)
            dv = tl.zeros([BLOCK_S, D_PAD], tl.float32)
            for i in range(0, n_blocks):
                qb = tl.load(inv + i)
                qi, head, row_ok, qpos, qkind, qseg = _query_rows(qb, b, kvh, KIND, SEG, Tq, Tk, G, G_PAD, ROWS)
                hr = _routing_head(head, kvh, QUERY_HEAD)
                row_t = qkind == TEXT
                picked = tl.load(CHOSEN + ((b * HR_TOTAL + hr) * Tq + qi) * R + r, mask=row_t, other=0)
                allowed = ((picked != 0) & row_t)[:, None] & k_ok[None, :]
                q, do, lse, delta = _load_rows(Q, DO, LSE, DELTA, b, head, qi, row_ok, d, d_ok, Tq, HKV * G, stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot)
                dk, dv = _dkdv_tile(dk, dv, kk, vv, q, do, lse, delta, allowed, scale_log2, True, UPCAST, PRECISION)
            out = ((b * HKV + kvh) * Tk + kpos)[:, None] * D + d[None, :]
            mask = k_ok[:, None] & d_ok[None, :]
            tl.store(DK + out, tl.load(DK + out, mask=mask, other=0.0) + dk * scale, mask=mask)
            tl.store(DV + out, tl.load(DV + out, mask=mask, other=0.0) + dv, mask=mask)


# fmt: on


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _routing_args(plan: GazePlan) -> tuple:
    """The block tables the forward and dq kernels read, in their argument order."""
    return (
        plan.kinds, plan.segment, plan.dense_idx, plan.dense_cnt, plan.lo, plan.full_lo,
        plan.full_hi, plan.hi, plan.chosen, plan.union, plan.union_cnt, plan.tokens,
    )  # fmt: skip


def _consts(lc: FusedLaunch) -> dict:
    return dict(ROWS=lc.rows, D_PAD=lc.d_pad, UPCAST=lc.upcast, PRECISION=lc.precision)


def _heads(plan: GazePlan, lc: FusedLaunch) -> tuple[int, int, int]:
    """G, G_PAD and QUERY_HEAD (as 0/1) of the kernels' runtime arguments."""
    return lc.group, lc.group_pad, int(plan.query_head)


def gaze_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: GazePlan, lc: FusedLaunch, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Hq, Tq, D] and lse [B, Hq, Tq] (log2)."""
    batch, hq, tq, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, tq, device=q.device, dtype=torch.float32)
    nqb = plan.num_blocks
    group, group_pad, query_head = _heads(plan, lc)
    _gaze_fwd_kernel[(nqb, batch * hkv)](
        q, k, v, out, lse, *_routing_args(plan), *_strides(q, k, v, out),
        tq, tk, plan.dense_idx.shape[-1], plan.num_regions, plan.union.shape[-1], nqb, hkv,
        group, group_pad, plan.heads, query_head, max(plan.region_tokens, 1), dim,
        scale * LOG2E, BLOCK_N=lc.block_n, **_consts(lc), **lc.fwd.kwargs(),
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
    lc: FusedLaunch,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq [B, Hq, Tq, D], dk/dv [B, Hkv, Tk, D] from the output gradient do."""
    batch, _, tq, dim = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    nqb = plan.num_blocks
    num_r = plan.num_regions
    group, group_pad, query_head = _heads(plan, lc)
    s = max(plan.region_tokens, 1)
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, Hq, Tq]
    strides = _strides(q, k, v, do)
    dq = torch.empty_like(q)
    _gaze_bwd_dq_kernel[(nqb, batch * hkv)](
        q, k, v, do, dq, lse, delta, *_routing_args(plan), *strides,
        tq, tk, plan.dense_idx.shape[-1], num_r, plan.union.shape[-1], nqb, hkv, group,
        group_pad, plan.heads, query_head, s, dim, scale, scale * LOG2E,
        BLOCK_N=lc.block_n, **_consts(lc), **lc.dq.kwargs(),
    )  # fmt: skip
    # [B, Hkv, Tk, D] fp32: the key-block kernel stores, the region kernel adds
    dk = torch.empty(batch, hkv, tk, dim, device=k.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    _gaze_bwd_dkdv_kernel[(triton.cdiv(tk, lc.block_n), batch * hkv)](
        q, k, v, do, dk, dv, lse, delta, plan.kinds, plan.segment, plan.row_flags, *strides,
        tq, tk, nqb, hkv, group, group_pad, dim, scale, scale * LOG2E,
        BLOCK_N=lc.block_n, **_consts(lc), **lc.dkdv.kwargs(),
    )  # fmt: skip
    if num_r:
        _gaze_bwd_region_kernel[(num_r, batch * hkv)](
            q, k, v, do, dk, dv, lse, delta, plan.kinds, plan.segment, plan.chosen,
            plan.inverse, plan.inverse_cnt, plan.tokens, *strides,
            tq, tk, num_r, plan.inverse.shape[-1], hkv, group, group_pad, plan.heads,
            query_head, s, dim, scale, scale * LOG2E,
            BLOCK_S=lc.block_s, **_consts(lc), **lc.region.kwargs(),
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
    routed = route(q.detach(), k.detach(), layout, config, descriptors=descriptors, top_k=top_k)
    lc = fused_launch(
        q.dtype, q.shape[-1], q.shape[1] // hkv, layout.max_region_tokens, device_spec(q.device)
    )
    plan = build_plan(layout, routed.chosen, tq, tk, hkv, lc.block_q, lc.block_n)
    out = GazeAttentionFunction.apply(q, k, v, plan, lc, scale)
    return out, compute_stats(layout, routed, return_selection)
