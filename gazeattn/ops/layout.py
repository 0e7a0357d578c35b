"""Where the images, frames, context tokens and regions sit in a batch of sequences.

A *span* is one image or one video in a sequence. Its grid is ``t x h x w``
tokens; frame ``f`` occupies ``h * w`` consecutive positions in raster order
starting at ``frame_offsets[f]``, and is followed (anywhere later) by its own
context tokens. A *segment* is one image or one frame: the unit that context
tokens summarise. A *region* is a ``r_t x r_h x r_w`` block of one span's grid
(smaller at the edges); regions are numbered per sequence in span order, then
row-major over (t-block, h-block, w-block).

Positions at or beyond ``layout.length`` are text: a decode step appends text
tokens without rebuilding the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch


class TokenKind(IntEnum):
    TEXT = 0
    VISUAL = 1
    CONTEXT = 2
    PAD = 3


@dataclass(frozen=True)
class Image:
    """A part of a sequence spec: one image of ``h x w`` visual tokens.

    ``lead`` tokens precede the grid (a vision tower's CLS token); they are laid out as
    text, which every later query attends to.
    """

    h: int
    w: int
    lead: int = 0


@dataclass(frozen=True)
class Video:
    """A part of a sequence spec: ``t`` frames of ``h x w`` visual tokens each (``lead`` as Image)."""

    t: int
    h: int
    w: int
    lead: int = 0


# A sequence spec is a list of parts: an int is that many text tokens.
Part = int | Image | Video


@dataclass(frozen=True, kw_only=True)
class VisualSpan:
    """One image (t = 1) or video in one sequence, in token positions."""

    grid: tuple[int, int, int]
    frame_offsets: tuple[int, ...]
    context_offsets: tuple[tuple[int, ...], ...]
    is_video: bool = False

    def __post_init__(self) -> None:
        t, h, w = self.grid
        if min(t, h, w) < 1:
            raise ValueError(f"grid sides must be >= 1, got {self.grid}")
        if len(self.frame_offsets) != t:
            raise ValueError(f"{t} frames in the grid but {len(self.frame_offsets)} frame offsets")
        if len(self.context_offsets) != t:
            raise ValueError(
                f"{t} frames in the grid but {len(self.context_offsets)} context lists"
            )
        for f in range(t):
            frame_end = self.frame_offsets[f] + h * w
            if f + 1 < t and self.frame_offsets[f + 1] < frame_end:
                raise ValueError(f"frame {f + 1} starts inside frame {f}")
            if any(c < frame_end for c in self.context_offsets[f]):
                raise ValueError(f"a context token of frame {f} precedes the end of that frame")

    @property
    def num_visual(self) -> int:
        return math.prod(self.grid)

    def region_grid(self, region_size: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(-(-g // r) for g, r in zip(self.grid, region_size, strict=True))


@dataclass(frozen=True, kw_only=True)
class RegionTable:
    """Per-sequence region tables, padded to the batch's largest.

    tokens: [B, R, S] token positions of each region, -1 padded.
    size:   [B, R] tokens in each region (0 for padding regions).
    last:   [B, R] last token position; a text query at p sees the region iff last < p
            (padding regions hold a value no query reaches).
    box:    [B, R, 7] (span, t0, t1, h0, h1, w0, w1) in grid coordinates, end exclusive.
    count:  [B] regions in each sequence.
    """

    tokens: torch.Tensor
    size: torch.Tensor
    last: torch.Tensor
    box: torch.Tensor
    count: torch.Tensor

    def to(self, device: torch.device | str) -> RegionTable:
        return RegionTable(**{k: getattr(self, k).to(device) for k in _TABLE_FIELDS})


_TABLE_FIELDS = ("tokens", "size", "last", "box", "count")
_UNREACHABLE = torch.iinfo(torch.int64).max


@dataclass(frozen=True, kw_only=True)
class GazeLayout:
    """Token kinds, segments and regions of a batch of ``B`` sequences of ``length`` tokens.

    kinds:   [B, T] int8 TokenKind per position.
    segment: [B, T] int64 segment (image or frame) id of visual and context tokens, else -1.
    region:  [B, T] int64 region id of visual tokens, else -1.
    spans:   per sequence, its VisualSpans in order.
    """

    kinds: torch.Tensor
    segment: torch.Tensor
    region: torch.Tensor
    regions: RegionTable
    spans: tuple[tuple[VisualSpan, ...], ...]
    region_size: tuple[int, int, int]
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.kinds.shape[0]

    @property
    def length(self) -> int:
        return self.kinds.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kinds.device

    @property
    def max_regions(self) -> int:
        return self.regions.tokens.shape[1]

    @property
    def max_region_tokens(self) -> int:
        return self.regions.tokens.shape[2]

    def to(self, device: torch.device | str) -> GazeLayout:
        if self.device == torch.device(device):
            return self
        return GazeLayout(
            kinds=self.kinds.to(device),
            segment=self.segment.to(device),
            region=self.region.to(device),
            regions=self.regions.to(device),
            spans=self.spans,
            region_size=self.region_size,
        )

    def select_rows(self, index: torch.Tensor) -> GazeLayout:
        """The layout of batch rows ``index`` (in that order, repeats allowed): beams, expanded
        inputs, a batch that sequences join and leave."""
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.to(self.device)
        return GazeLayout(
            kinds=self.kinds.index_select(0, rows),
            segment=self.segment.index_select(0, rows),
            region=self.region.index_select(0, rows),
            regions=RegionTable(
                **{k: getattr(self.regions, k).index_select(0, rows) for k in _TABLE_FIELDS}
            ),
            spans=tuple(self.spans[i] for i in index.tolist()),
            region_size=self.region_size,
        )

    def head(self, length: int) -> GazeLayout:
        """The layout of the first ``length`` positions (a chunk of a prefill that ends there).

        A region with a token at or past ``length`` ends there or later, so no query before
        ``length`` sees it (``last`` is kept): it stays in the table (region ids keep their
        meaning) without those tokens, which the keys of the head do not hold. ``spans``
        are the whole layout's.
        """
        if not 0 < length <= self.length:
            raise ValueError(f"a head of {length} positions of a layout of {self.length}")
        if length == self.length:
            return self
        table = self.regions
        return GazeLayout(
            kinds=self.kinds[:, :length],
            segment=self.segment[:, :length],
            region=self.region[:, :length],
            regions=RegionTable(
                tokens=torch.where(table.tokens >= length, -1, table.tokens),
                size=table.size,
                last=table.last,
                box=table.box,
                count=table.count,
            ),
            spans=self.spans,
            region_size=self.region_size,
        )

    def padded(self, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """kinds, segment and region extended to ``total`` positions (the extra ones text)."""
        extra = total - self.length
        if extra < 0:
            raise ValueError(f"the layout has {self.length} positions but the keys only {total}")
        key = ("padded", total)
        if key not in self._derived:
            if extra == 0:
                value = (self.kinds, self.segment, self.region)
            else:
                pad = (0, extra)
                value = (
                    torch.nn.functional.pad(self.kinds, pad, value=int(TokenKind.TEXT)),
                    torch.nn.functional.pad(self.segment, pad, value=-1),
                    torch.nn.functional.pad(self.region, pad, value=-1),
                )
            self._keep_latest(key, value)
        return self._derived[key]

    def dense_index(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the non-visual, non-padding keys among ``total``: [B, N] and its validity."""
        key = ("dense_index", total)
        if key not in self._derived:
            if total > self.length:
                # positions past the layout are all text (decoded tokens): the layout's own
                # index once, then the tail, instead of a sort over every key at every step
                # (the same left-aligned, sorted result as compacting the padded kinds)
                index, valid = self.dense_index(self.length)
                width, tail = index.shape[1], total - self.length
                count = valid.sum(-1, keepdim=True)  # [B, 1]
                j = torch.arange(width + tail, device=index.device)[None, :]
                base = index[:, j[0].clamp(max=max(width - 1, 0))] if width else 0 * j
                in_tail = (j >= count) & (j < count + tail)
                value = (
                    torch.where(j < count, base, torch.where(in_tail, self.length + j - count, 0)),
                    j < count + tail,
                )
                self._keep_latest(key, value)
            else:
                kinds, _, _ = self.padded(total)
                keep = (kinds == TokenKind.TEXT) | (kinds == TokenKind.CONTEXT)
                index, count = compact(keep)
                valid = torch.arange(index.shape[-1], device=keep.device) < count[:, None]
                self._derived[key] = (index, valid)
        return self._derived[key]

    def _keep_latest(self, key: tuple, value) -> None:
        """Cache ``value`` under ``key`` = (name, total), dropping the entries of other totals
        past the layout: a decode step asks for one more key each time, and a long generation
        must not keep one copy per step."""
        stale = [
            k
            for k in self._derived
            if k[0] == key[0] and len(k) > 1 and isinstance(k[1], int) and k[1] > self.length
        ]
        for k in stale:
            del self._derived[k]
        self._derived[key] = value

    @classmethod
    def from_spans(
        cls,
        length: int,
        spans: list[list[VisualSpan]],
        *,
        region_size: tuple[int, int, int],
        pad_mask: torch.Tensor | None = None,
    ) -> GazeLayout:
        """Build from per-sequence spans; ``pad_mask`` [B, T] is True at padding positions."""
        region_size = tuple(region_size)
        batch = len(spans)
        kinds = np.zeros((batch, length), np.int8)
        segment = np.full((batch, length), -1, np.int64)
        region = np.full((batch, length), -1, np.int64)
        per_seq = []
        for b, seq_spans in enumerate(spans):
            per_seq.append(_fill_sequence(kinds[b], segment[b], region[b], seq_spans, region_size))
        if pad_mask is not None:
            pad = np.asarray(pad_mask.cpu() if torch.is_tensor(pad_mask) else pad_mask, bool)
            if pad.shape != (batch, length):
                raise ValueError(f"pad_mask has shape {pad.shape}, expected {(batch, length)}")
            if (pad & (kinds != TokenKind.TEXT)).any():
                raise ValueError("a padding position holds a visual or context token")
            kinds[pad] = TokenKind.PAD
        return cls(
            kinds=torch.from_numpy(kinds),
            segment=torch.from_numpy(segment),
            region=torch.from_numpy(region),
            regions=_stack_tables(per_seq, math.prod(region_size)),
            spans=tuple(tuple(s) for s in spans),
            region_size=region_size,
        )


def compact(mask: torch.Tensor, *, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries along the last dim, in order, left-aligned and 0-padded.

    mask [..., L] bool -> indices [..., W] int64 and counts [...] int64, where W is the
    largest count (at least ``min_width``: kernels are never given an empty tensor).
    """
    count = mask.sum(-1)
    width = max(int(count.max()) if count.numel() else 0, min_width)
    # a stable sort puts the kept positions first, in order
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    if order.shape[-1] < width:
        order = torch.nn.functional.pad(order, (0, width - order.shape[-1]))
    valid = torch.arange(width, device=mask.device) < count[..., None]
    return torch.where(valid, order, 0), count


def _fill_sequence(kinds, segment, region, spans, region_size):
    """Write one sequence's kinds, segment and region ids; return its region rows."""
    rt, rh, rw = region_size
    rows = []  # (token positions, box)
    seg_id = 0
    for span_id, span in enumerate(spans):
        t, h, w = span.grid
        for f in range(t):
            start = span.frame_offsets[f]
            if start < 0 or start + h * w > len(kinds):
                raise ValueError(
                    f"span {span_id} frame {f} lies outside the sequence of {len(kinds)}"
                )
            frame = slice(start, start + h * w)
            if (kinds[frame] != TokenKind.TEXT).any():
                raise ValueError(
                    f"span {span_id} frame {f} overlaps another visual or context token"
                )
            kinds[frame] = TokenKind.VISUAL
            segment[frame] = seg_id
            ctx = np.asarray(span.context_offsets[f], np.int64)
            if ctx.size:
                if ctx.min() < 0 or ctx.max() >= len(kinds) or (kinds[ctx] != TokenKind.TEXT).any():
                    raise ValueError(
                        f"span {span_id} frame {f}: bad or overlapping context positions"
                    )
                kinds[ctx] = TokenKind.CONTEXT
                segment[ctx] = seg_id
            seg_id += 1
        offsets = np.asarray(span.frame_offsets, np.int64)
        # positions[f, y, x] of every visual token of the span
        positions = (
            offsets[:, None, None] + np.arange(h)[None, :, None] * w + np.arange(w)[None, None, :]
        )
        for t0 in range(0, t, rt):
            for h0 in range(0, h, rh):
                for w0 in range(0, w, rw):
                    tok = positions[t0 : t0 + rt, h0 : h0 + rh, w0 : w0 + rw].reshape(-1)
                    region[tok] = len(rows)
                    box = (span_id, t0, min(t0 + rt, t), h0, min(h0 + rh, h), w0, min(w0 + rw, w))
                    rows.append((np.sort(tok), box))
    return rows


def _stack_tables(per_seq, full_region: int) -> RegionTable:
    batch = len(per_seq)
    max_r = max((len(rows) for rows in per_seq), default=0)
    tokens = np.full((batch, max_r, full_region), -1, np.int64)
    size = np.zeros((batch, max_r), np.int64)
    last = np.full((batch, max_r), _UNREACHABLE, np.int64)
    box = np.zeros((batch, max_r, 7), np.int64)
    for b, rows in enumerate(per_seq):
        for r, (tok, bx) in enumerate(rows):
            tokens[b, r, : len(tok)] = tok
            size[b, r] = len(tok)
            last[b, r] = tok[-1]
            box[b, r] = bx
    return RegionTable(
        tokens=torch.from_numpy(tokens),
        size=torch.from_numpy(size),
        last=torch.from_numpy(last),
        box=torch.from_numpy(box),
        count=torch.tensor([len(rows) for rows in per_seq], dtype=torch.int64),
    )


def build_layout(
    sequences: list[list[Part]],
    *,
    region_size: tuple[int, int, int] = (1, 6, 6),
    num_context_tokens: int = 4,
    padding_side: str = "right",
    length: int | None = None,
) -> GazeLayout:
    """Lay out sequences given as parts, e.g. ``[5, Image(24, 24), 3, Video(8, 24, 24), 7]``.

    Each image or frame is followed by its ``num_context_tokens`` context tokens.
    Sequences are padded to ``length`` (default: the longest) on ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    laid = [_lay_parts(parts, num_context_tokens) for parts in sequences]
    longest = max((n for n, _ in laid), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest})")
    pad_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    spans = []
    for b, (n, seq_spans) in enumerate(laid):
        shift = length - n if padding_side == "left" else 0
        if padding_side == "left":
            pad_mask[b, :shift] = True
        else:
            pad_mask[b, n:] = True
        spans.append([_shift_span(s, shift) for s in seq_spans])
    return GazeLayout.from_spans(length, spans, region_size=region_size, pad_mask=pad_mask)


def _lay_parts(parts: list[Part], n_ctx: int) -> tuple[int, list[VisualSpan]]:
    pos = 0
    spans = []
    for part in parts:
        if isinstance(part, int):
            if part < 0:
                raise ValueError(f"a text part must be >= 0 tokens, got {part}")
            pos += part
            continue
        if not isinstance(part, Image | Video):
            raise TypeError(f"a part is an int, Image or Video, got {type(part).__name__}")
        t = part.t if isinstance(part, Video) else 1
        if part.lead < 0:
            raise ValueError(f"lead tokens must be >= 0, got {part.lead}")
        frames, contexts = [], []
        for _ in range(t):
            pos += part.lead
            frames.append(pos)
            pos += part.h * part.w
            contexts.append(tuple(range(pos, pos + n_ctx)))
            pos += n_ctx
        spans.append(
            VisualSpan(
                grid=(t, part.h, part.w),
                frame_offsets=tuple(frames),
                context_offsets=tuple(contexts),
                is_video=isinstance(part, Video),
            )
        )
    return pos, spans


def _shift_span(span: VisualSpan, shift: int) -> VisualSpan:
    if shift == 0:
        return span
    return VisualSpan(
        grid=span.grid,
        frame_offsets=tuple(o + shift for o in span.frame_offsets),
        context_offsets=tuple(tuple(c + shift for c in ctx) for ctx in span.context_offsets),
        is_video=span.is_video,
    )


def stack_rows(
    rows: list[GazeLayout],
    offsets: list[int],
    length: int,
    *,
    device: torch.device | str | None = None,
) -> GazeLayout:
    """One batch of ``length`` positions from single-sequence layouts, each moved right.

    Row ``i`` is ``rows[i]`` (a layout of one sequence) starting at ``offsets[i]``: the
    positions before it are padding, those after it text (tokens decoded since its prompt).
    This is how a batch that sequences join and leave is laid out: every row ends at the
    batch's last position (left padding), and a row's regions and descriptors keep their ids.
    """
    if len(rows) != len(offsets):
        raise ValueError(f"{len(rows)} layouts but {len(offsets)} offsets")
    if any(r.batch_size != 1 for r in rows):
        raise ValueError("stack_rows takes layouts of one sequence each")
    sizes = {r.region_size for r in rows}
    if len(sizes) > 1:
        raise ValueError(f"rows with different region sizes: {sorted(sizes)}")
    region_size = sizes.pop() if sizes else (1, 1, 1)
    device = torch.device(device) if device is not None else torch.device("cpu")
    batch = len(rows)
    num_r = max((r.max_regions for r in rows), default=0)
    width = max((r.max_region_tokens for r in rows), default=math.prod(region_size))
    kinds = torch.full((batch, length), int(TokenKind.TEXT), dtype=torch.int8)
    segment = torch.full((batch, length), -1, dtype=torch.int64)
    region = torch.full((batch, length), -1, dtype=torch.int64)
    tokens = torch.full((batch, num_r, width), -1, dtype=torch.int64)
    size = torch.zeros((batch, num_r), dtype=torch.int64)
    last = torch.full((batch, num_r), _UNREACHABLE, dtype=torch.int64)
    box = torch.zeros((batch, num_r, 7), dtype=torch.int64)
    count = torch.zeros(batch, dtype=torch.int64)
    spans = []
    for i, (row, offset) in enumerate(zip(rows, offsets, strict=True)):
        n = row.length
        if offset < 0 or offset + n > length:
            raise ValueError(f"row {i} of {n} positions at offset {offset} exceeds {length}")
        row = row.to("cpu")
        kinds[i, :offset] = int(TokenKind.PAD)
        kinds[i, offset : offset + n] = row.kinds[0]
        segment[i, offset : offset + n] = row.segment[0]
        region[i, offset : offset + n] = row.region[0]
        r, s = row.max_regions, row.max_region_tokens
        table = row.regions
        tokens[i, :r, :s] = torch.where(table.tokens[0] >= 0, table.tokens[0] + offset, -1)
        size[i, :r] = table.size[0]
        last[i, :r] = torch.where(table.size[0] > 0, table.last[0] + offset, _UNREACHABLE)
        box[i, :r] = table.box[0]
        count[i] = table.count[0]
        spans.append(tuple(_shift_span(span, offset) for span in row.spans[0]))
    layout = GazeLayout(
        kinds=kinds,
        segment=segment,
        region=region,
        regions=RegionTable(tokens=tokens, size=size, last=last, box=box, count=count),
        spans=tuple(spans),
        region_size=region_size,
    )
    return layout.to(device)
