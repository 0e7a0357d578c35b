"""The KV cache of a batch that sequences join and leave (continuous batching).

``BatchCache`` keeps every running sequence in one buffer per layer,
``[row capacity, Hkv, column capacity, D]``, and hands the model the view
``[rows, Hkv, start:end, D]``. Rows are left padded so that every row ends at
column ``end``:

- a decode step writes one column for every row in place (``DynamicCache``
  concatenates, copying the whole cache at every step);
- a sequence joins by writing its prefilled keys/values into the next free row,
  right-aligned; when its prompt is longer than the batch, every row gets more
  padding on the left (columns that exist already in the buffer's headroom);
- a sequence leaves by moving the last row into its place (one row copied);
- columns no row uses any more are dropped from the left (``trim_left``).

Padding columns hold zeros: attention masks them out, and a masked zero is never NaN.
The buffer grows geometrically (a copy of the active part) when it runs out of room (on CPU
it holds every row the batch may have from the start: ``_first_rows``). A new
buffer is not cleared (a join that grows the rows of a long batch cleared hundreds of MB):
every column a view shows is written first, by a join (its keys and its padding zeros), a
batch that grows to the left (zeros) or a step.

A hybrid decoder's linear-attention layers (Qwen3.5) hold no keys and values but a
recurrent state per row (``BatchLinearLayer``): it does not grow with the sequence, so a
row joins by concatenation and leaves by selection, and padding never reaches it (each
prompt was prefilled alone, and a decode step feeds one real token per row).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

MIN_SLACK = 256


class BatchLayer(CacheLayerMixin):
    """One decoder layer's keys and values of the batch (see the module doc)."""

    is_sliding = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None
        self.rows = 0
        self.start = self.end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    # ---- what the model calls

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the step's keys/values [rows, Hkv, q, D] at the end of every row."""
        if self.kbuf is None or key_states.shape[0] != self.rows:
            raise ValueError(
                f"the batch cache holds {self.rows} rows; the model ran {key_states.shape[0]}"
            )
        q = key_states.shape[2]
        self._reserve(left=0, right=q)
        cols = slice(self.end, self.end + q)
        self.kbuf[: self.rows, :, cols] = key_states
        self.vbuf[: self.rows, :, cols] = value_states
        self.end += q
        self._sync_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_max_length(self) -> int:
        return -1

    # ---- what the engine calls

    def insert(self, keys: torch.Tensor, values: torch.Tensor, max_rows: int) -> int:
        """Add one row from its prefill keys/values [1, Hkv, P, D], right-aligned at ``end``.

        Returns how many padding columns every existing row got on the left (0 unless the
        new prompt is longer than the batch).
        """
        length = keys.shape[2]
        if self.kbuf is None:
            self._allocate(keys, max_rows=max_rows, length=length)
        if self.rows == 0:
            # an idle buffer: start over in its middle, with room on both sides
            self.start = self.end = length + max(self.kbuf.shape[2] - length, 0) // 2
        grow = max(length - self.get_seq_length(), 0)
        if grow:
            self._reserve(left=grow, right=0)
            self.start -= grow
            self.kbuf[: self.rows, :, self.start : self.start + grow] = 0
            self.vbuf[: self.rows, :, self.start : self.start + grow] = 0
        if self.rows == self.kbuf.shape[0]:
            self._grow_rows(min(max(2 * self.rows, self.rows + 1), max(max_rows, self.rows + 1)))
        row, pad_end = self.rows, self.end - length
        self.kbuf[row, :, self.start : pad_end] = 0
        self.vbuf[row, :, self.start : pad_end] = 0
        self.kbuf[row, :, pad_end : self.end] = keys[0]
        self.vbuf[row, :, pad_end : self.end] = values[0]
        self.rows += 1
        self._sync_views()
        return grow

    def keep(self, index: list[int]) -> None:
        """Keep rows ``index`` in that order (row j becomes ``index[j]``)."""
        cols = slice(self.start, self.end)
        if any(src < j for j, src in enumerate(index)) or len(set(index)) != len(index):
            # not a swap-remove order: move through a copy
            picked = torch.tensor(index, device=self.kbuf.device)
            self.kbuf[: len(index), :, cols] = self.kbuf[picked, :, cols]
            self.vbuf[: len(index), :, cols] = self.vbuf[picked, :, cols]
        else:
            for j, src in enumerate(index):
                if src != j:
                    self.kbuf[j, :, cols] = self.kbuf[src, :, cols]
                    self.vbuf[j, :, cols] = self.vbuf[src, :, cols]
        self.rows = len(index)
        self._sync_views()

    def trim_left(self, columns: int) -> None:
        self.start += columns
        self._sync_views()

    def snapshot(self) -> tuple:
        """What ``restore`` needs to undo an ``insert``: the buffers (an insert that moves
        them copies into new ones) and the bounds (it writes only outside them)."""
        return self.kbuf, self.vbuf, self.rows, self.start, self.end

    def restore(self, state: tuple) -> None:
        self.kbuf, self.vbuf, self.rows, self.start, self.end = state
        if self.kbuf is not None:
            self._sync_views()

    # ---- storage

    def _allocate(self, like: torch.Tensor, *, max_rows: int, length: int) -> None:
        _, heads, _, dim = like.shape
        columns = length + 2 * max(MIN_SLACK, length // 2)
        row_bytes = heads * columns * dim * like.element_size()
        size = (_first_rows(like.device, max_rows, row_bytes), heads, columns, dim)
        self.kbuf, self.vbuf = _buffer(size, like), _buffer(size, like)
        self.device = like.device
        self.is_initialized = True

    def _reserve(self, *, left: int, right: int) -> None:
        """Make sure ``left`` columns fit before ``start`` and ``right`` after ``end``."""
        capacity = self.kbuf.shape[2]
        if self.start >= left and capacity - self.end >= right:
            return
        used = self.get_seq_length()
        slack = max(MIN_SLACK, used // 2)
        new_start = left + slack
        size = (self.kbuf.shape[0], self.kbuf.shape[1], new_start + used + right + slack)
        self._move(size + (self.kbuf.shape[3],), new_start)

    def _grow_rows(self, rows: int) -> None:
        self._move((rows, *self.kbuf.shape[1:]), self.start)

    def _move(self, size: tuple[int, ...], new_start: int) -> None:
        used = self.get_seq_length()
        kbuf, vbuf = _buffer(size, self.kbuf), _buffer(size, self.vbuf)
        old, new = slice(self.start, self.end), slice(new_start, new_start + used)
        kbuf[: self.rows, :, new] = self.kbuf[: self.rows, :, old]
        vbuf[: self.rows, :, new] = self.vbuf[: self.rows, :, old]
        self.kbuf, self.vbuf = kbuf, vbuf
        self.start, self.end = new_start, new_start + used

    def _sync_views(self) -> None:
        # [rows, Hkv, T, D] views: what transformers and the attention functions read
        self.keys = self.kbuf[: self.rows, :, self.start : self.end]
        self.values = self.vbuf[: self.rows, :, self.start : self.end]


# the most a CPU buffer reserves for rows no sequence uses yet (see ``_first_rows``)
CPU_RESERVE_BYTES = 4 << 30


def _first_rows(device: torch.device, max_rows: int, row_bytes: int) -> int:
    """Rows of a layer's first key (or value) buffer. On CPU every row the batch may hold,
    up to ``CPU_RESERVE_BYTES``: memory never written costs nothing there (an unwritten page
    is not backed), while growing the rows copies the batch into a new buffer whose pages are
    each faulted in again (about 0.1 s per layer from 4 to 8 rows of 9301 tokens on our
    2-core machine). On an accelerator memory is committed when allocated: the rows grow
    with the batch."""
    if device.type == "cpu":
        return max(min(max_rows, CPU_RESERVE_BYTES // max(row_bytes, 1)), min(4, max_rows))
    return min(4, max_rows)


def _buffer(size: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A new key or value buffer, not cleared (see the module doc)."""
    return torch.empty(size, dtype=like.dtype, device=like.device)


class BatchLinearLayer(LinearAttentionLayer):
    """One linear-attention layer's conv and recurrent states of the batch, [rows, ...] each."""

    def __init__(self, number_of_states: int = 1):
        super().__init__(number_of_states=number_of_states)
        self.rows = 0

    def insert(self, prefill: LinearAttentionLayer, max_rows: int) -> int:
        """Add one row from its prefill's states; returns 0 (nothing to pad)."""
        for name in ("conv_states", "recurrent_states"):
            states, new = getattr(self, name), getattr(prefill, name)
            for i in range(self.number_of_states):
                if new[i] is None:
                    raise ValueError(f"the prefill has no {name}[{i}] to add to the batch")
                old = states[i] if self.rows else None
                states[i] = new[i].clone() if old is None else torch.cat([old, new[i]])
        for i in range(self.number_of_states):
            self.conv_kernel_size[i] = prefill.conv_kernel_size[i]
            self.is_conv_states_initialized[i] = self.is_recurrent_states_initialized[i] = True
            self.has_previous_state[i] = True
        self.device, self.dtype = prefill.device, prefill.dtype
        self.rows += 1
        return 0

    def keep(self, index: list[int]) -> None:
        picked = None
        for states in (self.conv_states, self.recurrent_states):
            for i, state in states.items():
                if state is not None:
                    picked = torch.tensor(index, dtype=torch.long, device=state.device)
                    states[i] = state.index_select(0, picked)
        self.rows = len(index)

    def trim_left(self, columns: int) -> None:
        """Nothing to trim: the states have no sequence dimension."""

    def snapshot(self) -> tuple:
        return dict(self.conv_states), dict(self.recurrent_states), self.rows

    def restore(self, state: tuple) -> None:
        conv, recurrent, self.rows = state
        self.conv_states, self.recurrent_states = dict(conv), dict(recurrent)


class BatchCache(Cache):
    """A transformers ``Cache`` over ``BatchLayer`` s, with the gaze state of the batch.

    ``gaze_state`` is the ``GazeState`` every decode step of a gaze model routes with;
    the engine keeps it in step with the rows (layout, descriptors, rotary deltas).
    """

    gaze_state = None

    def __init__(self, num_layers: int, layer_types: list[str] | None = None):
        kinds = layer_types or ["full_attention"] * num_layers
        if len(kinds) != num_layers:
            raise ValueError(f"{len(kinds)} layer types for {num_layers} layers")
        super().__init__(
            layers=[BatchLinearLayer() if k == "linear_attention" else BatchLayer() for k in kinds]
        )

    @property
    def rows(self) -> int:
        return self.layers[0].rows

    def insert(self, per_layer: list, max_rows: int) -> int:
        """Add a row from its prefill: per layer its cache layer (or its (keys, values));
        returns the new left padding of the rows already there."""
        if len(per_layer) != len(self.layers):
            raise ValueError(f"{len(per_layer)} prefilled layers for a cache of {len(self.layers)}")
        # all layers or none: a failure at any layer (out of memory) restores every layer,
        # so the batch goes on with its rows as they were
        saved = [layer.snapshot() for layer in self.layers]
        try:
            grows = set()
            for layer, prefill in zip(self.layers, per_layer, strict=True):
                if isinstance(layer, BatchLinearLayer):
                    layer.insert(prefill, max_rows)
                    continue
                keys, values = (
                    prefill if isinstance(prefill, tuple) else (prefill.keys, prefill.values)
                )
                grows.add(layer.insert(keys, values, max_rows))
        except BaseException:
            for layer, state in zip(self.layers, saved, strict=True):
                layer.restore(state)
            raise
        return grows.pop()

    def keep(self, index: list[int]) -> None:
        for layer in self.layers:
            layer.keep(index)

    def trim_left(self, columns: int) -> None:
        if columns:
            for layer in self.layers:
                layer.trim_left(columns)
