"""Host-side planning of the fused kernels: the per-call block tables they read.

Built with torch ops from the layout and the routing (no Triton here). A query
block is ``block_q`` consecutive query positions (times the group's heads in the
kernels); key tiles are ``block_n`` keys. Both come from the launch
configuration (``gazeattn.ops.gaze.launch``), which the kernels then use too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gazeattn.ops.layout import GazeLayout, TokenKind, compact

# bits of GazePlan.row_flags
ROWS_CAUSAL = 1  # the block holds visual or context rows
ROWS_TEXT = 2  # the block holds text rows
ROWS_VISUAL_ONLY = 4  # every row of the block is a visual row


@dataclass(frozen=True, kw_only=True)
class GazePlan:
    """Per-call block tables the kernels read (the largest is the per-query selection,
    ``[B, Hr, Tq, R]`` bytes).

    kinds, segment: [B, Tk] int32 metadata of every key position.
    dense_idx:      [B, N] int32 text/context key positions (compacted).
    dense_cnt:      [B, NQB] dense keys up to each block's last text query (0 without text rows).
    lo, hi:         [B, NQB] contiguous key range of each block's visual and context rows;
    full_lo/hi:     the part of it that needs no mask (see ``_causal_ranges``).
    row_flags:      [B, NQB] ROWS_* bits.
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

    @property
    def num_blocks(self) -> int:
        return self.dense_cnt.shape[1]


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


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
    nqb = -(-tq // block_q)
    q_pos = torch.arange(tk - tq, tk, device=device)
    q_kind = kinds[:, q_pos].long()
    visual, context, text = (
        q_kind == k for k in (TokenKind.VISUAL, TokenKind.CONTEXT, TokenKind.TEXT)
    )

    def per_block(rows, fill, reduce):
        # [B, Tq] -> [B, NQB]: reduce each block's rows (padding rows read as ``fill``)
        padded = F.pad(rows, (0, nqb * block_q - tq), value=fill)
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
        ROWS_CAUSAL * per_block(visual | context, False, torch.any).int()
        + ROWS_TEXT * per_block(text, False, torch.any).int()
        + ROWS_VISUAL_ONLY * per_block(visual, True, torch.all).int()
    )

    hr, num_r = chosen.shape[1], chosen.shape[3]
    padded = F.pad(chosen, (0, 0, 0, nqb * block_q - tq))
    # [B, Hkv, Hr / Hkv, NQB, BLOCK_Q, R] -> regions any row of a block selected
    union = padded.view(batch, hkv, hr // hkv, nqb, block_q, num_r).any(4).any(2)
    union_ids, union_cnt = compact(union, min_width=1)
    inverse, inverse_cnt = compact(union.transpose(-1, -2), min_width=1)
    return GazePlan(
        kinds=_int32(kinds),
        segment=_int32(segment),
        dense_idx=_nonempty(_int32(dense_idx)),
        dense_cnt=_int32(dense_cnt),
        lo=_int32(lo),
        full_lo=_int32(full_lo),
        full_hi=_int32(full_hi),
        hi=_int32(hi),
        row_flags=_int32(row_flags),
        chosen=_nonempty(chosen.to(torch.uint8)),
        union=_int32(union_ids),
        union_cnt=_int32(union_cnt),
        inverse=_int32(inverse),
        inverse_cnt=_int32(inverse_cnt),
        tokens=_nonempty(_int32(layout.regions.tokens.to(device))),
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
    pad = kinds == TokenKind.PAD
    last_pad = torch.cummax(torch.where(pad, positions, -1), dim=1).values  # [B, Tk]
    start = last_pad[:, first_q] + 1
    tiles = (first_q + 1 - start).clamp(min=0) // block_n
    whole = per_block(visual, True, torch.all) & (tiles > 0) & ~empty
    full_lo = torch.where(whole, start, hi)
    full_hi = torch.where(whole, start + tiles * block_n, hi)
    return lo, full_lo, full_hi, hi
