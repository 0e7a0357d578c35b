"""Constants shared by the Triton kernels and their host wrappers.

Token kinds reach the kernels as ``tl.constexpr`` globals built from
``gazeattn.ops.layout.TokenKind``, so a kernel reads ``kind == TEXT`` and the
values live in one place. The softmax runs in base 2: scores are multiplied by
``scale * LOG2E`` and exponentiated with ``exp2``.
"""

from __future__ import annotations

import math

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
