"""Constants shared by the Triton kernels and their host wrappers.

Token kinds reach the kernels as ``tl.constexpr`` globals built from
``gazeattn.ops.layout.TokenKind``, so a kernel reads ``kind == TEXT`` and the
values live in one place. The softmax runs in base 2: scores are multiplied by
``scale * LOG2E`` and exponentiated with ``exp2``.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from gazeattn.ops.gaze.plan import ROWS_CAUSAL, ROWS_TEXT, ROWS_VISUAL_ONLY
from gazeattn.ops.layout import TokenKind

LOG2E = math.log2(math.e)

TEXT = tl.constexpr(int(TokenKind.TEXT))
VISUAL = tl.constexpr(int(TokenKind.VISUAL))
CONTEXT = tl.constexpr(int(TokenKind.CONTEXT))
PAD = tl.constexpr(int(TokenKind.PAD))

# bits of GazePlan.row_flags: what kinds of rows a query block holds
FLAG_CAUSAL = tl.constexpr(ROWS_CAUSAL)
FLAG_TEXT = tl.constexpr(ROWS_TEXT)
FLAG_VISUAL_ONLY = tl.constexpr(ROWS_VISUAL_ONLY)


# fmt: off


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # the interpreter stores bf16 as uint16 and tl.dot on it returns garbage
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def softmax_tile(acc, m_i, l_i, q, kk, vv, allowed, scale_log2, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over a tile of keys (unmasked tiles skip the select)."""
    s = dot(q, tl.trans(kk), UPCAST, PRECISION) * scale_log2
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(vv.dtype), vv, UPCAST, PRECISION)
    return acc, m_new, l_i


# fmt: on
