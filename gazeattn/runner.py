"""The engine's model runner: every forward of the model, over prompts and over the batch.

A ``ModelRunner`` owns a model (gaze or stock), the running batch's decode cache
(``gazeattn.cache.BatchCache``: one row per running sequence, left padded, with each row's
offset and rotary delta) and the prefix cache. It

- prefills a prompt alone, several together in one left-padded forward, or one in chunks
  (``prefill``, ``prefill_together``, ``start_chunks`` / ``chunk``); a prompt with images or
  video prefills its visual prefix through the prefix cache (``gazeattn.prefix_cache``);
- adds a prefilled prompt to the batch as a row (``join``), runs the decode forward of every
  row (``decode``) and removes the rows whose sequences ended (``retire``);
- records what a gaze model's queries attended and routed (the gaze report).

It decides nothing and samples nothing: the engine's scheduler (``gazeattn.engine``) says
what runs in a step, its sampler picks the tokens. The gaze cache follows the rows: a
sequence's region descriptors are computed at its own prefill and move with its row, its
layout is stacked into the batch's (``gazeattn.ops.layout.stack_rows``) at its left padding,
and M-RoPE families keep its rotary delta.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from gazeattn.cache import BatchCache
from gazeattn.generation import GazeCache
from gazeattn.modeling import GazeState, deepstack_chunk, gaze_module, is_gaze_model
from gazeattn.ops.gaze.cpu_kernel import cpu_kernel
from gazeattn.ops.layout import GazeLayout, stack_rows
from gazeattn.prefix_cache import PrefixCache, PrefixHold, prefix_key, visual_prefix
from gazeattn.processing import GazeProcessor
from gazeattn.sample import EncodedSample

if TYPE_CHECKING:
    from gazeattn.engine import EngineSequence


@dataclass(kw_only=True)
class Prefilled:
    """A prompt in a cache of its own, ready to join the batch."""

    logits: torch.Tensor  # [1, V] float: its last position's
    layers: list  # the prefill cache's layers (or one row's keys and values per layer)
    state: GazeState | None  # its gaze state (descriptors of its regions); None for stock
    delta: torch.Tensor  # [1, 1] its rotary delta (M-RoPE positions minus text positions)


class _DecoderReached(Exception):
    """Stops a stock model's forward where its decoder would start (``StockChunks``)."""


@dataclass(kw_only=True)
class StockChunks:
    """A stock model's prompt prefilled a chunk at a time, as ``ChunkedPrefill`` is a gaze
    model's: the decoder's inputs of the whole prompt are transformers' own, computed once;
    the decoder then runs on a chunk of them at a time. Chunk boundaries may fall anywhere:
    each position's embedding, position and DeepStack input are those of the whole prompt."""

    model: Any
    embeds: torch.Tensor  # [1, T, hidden] with the visual features in place
    positions: torch.Tensor | None  # [..., 1, T]; None: the decoder counts from the cache
    mask: torch.Tensor  # [1, T]
    deepstack: dict  # Qwen3-VL's visual_pos_masks and deepstack_visual_embeds, else empty
    cache: Any  # a DynamicCache with the row's rotary delta as ``rope_deltas``
    done: int = 0  # positions prefilled so far

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def remaining(self) -> int:
        return self.length - self.done

    def run(self, tokens: int) -> torch.Tensor | None:
        """Prefill the next ``tokens`` positions (at least 1); the last position's logits
        [1, 1, V] once the whole prompt is in the cache, else None."""
        start, end = self.done, min(self.length, self.done + max(1, tokens))
        positions = None if self.positions is None else self.positions[..., start:end]
        out = self.model.model.language_model(
            inputs_embeds=self.embeds[:, start:end],
            attention_mask=self.mask[:, :end],
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            **deepstack_chunk(self.deepstack, start, end),
        )
        self.done = end
        if end < self.length:
            return None
        return self.model.lm_head(out.last_hidden_state[:, -1:, :])


class ModelRunner:
    """The model's forwards for the engine (see the module doc).

    Args:
        model: a gaze model (any family) or a stock model of a supported family, in eval mode.
        processor: its GazeProcessor (for a stock model, one without a gaze config).
        max_rows: most sequences decoding together (the batch cache's row capacity).
        prefix_cache_bytes: memory for prefilled visual prefixes; 0 turns prefix caching off.
    """

    def __init__(
        self, model, processor: GazeProcessor, *, max_rows: int, prefix_cache_bytes: int = 0
    ):
        self.model, self.processor = model, processor
        self.max_rows = max_rows
        self.gaze = is_gaze_model(model)
        self.device = next(model.parameters()).device
        text = model.config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        self._layer_types = getattr(text, "layer_types", None)
        # a hybrid decoder's recurrent states: a padded or a cut prefill would change them
        self.recurrent = "linear_attention" in (self._layer_types or ())
        self._stock_types = (
            not self.gaze and "mm_token_type_ids" in inspect.signature(model.forward).parameters
        )
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        # what besides its content a prefix's hidden states depend on (``prefix_key``)
        self.prefix_settings = "stock"
        if self.gaze:
            inner = gaze_module(model)
            self.prefix_settings = repr((inner.gaze_config, inner.gaze_top_k, inner.gaze_layers))
        self.rows: list[EngineSequence] = []
        self._offsets: list[int] = []  # each row's left padding in the batch cache
        self._deltas: list[torch.Tensor] = []  # [1, 1] rotary delta per row (M-RoPE)
        self.cache = self._new_cache()
        if self.gaze and self.device.type == "cpu":
            cpu_kernel()  # built (or found built) now, not at the first decode step

    def reset(self) -> None:
        """An empty batch (after a step that leaves the batch unknown)."""
        self.rows, self._offsets, self._deltas = [], [], []
        self.cache = self._new_cache()

    # ---- prefill

    def prefill(self, seq: EngineSequence) -> Prefilled:
        """The sequence's prompt alone (its visual prefix from the prefix cache or into it)."""
        ids, mask, vision, layout = self._inputs([seq.sample])
        if self.gaze:
            seq.layout = layout
        prefix = self._cached_prefix(seq, ids, mask, vision)
        if prefix is not None:
            cache, length = prefix
            out = self._suffix_forward(seq, ids, mask, vision, cache, length)
        elif self.gaze:
            cache = GazeCache()
            out = self._gaze_prefill(ids, mask, vision, cache, layout, [seq])
        else:
            cache = self._empty_cache()
            out = self._stock_prefill(ids, mask, vision, cache)
        return self._prefilled(seq, cache, out.logits[:, -1].float())

    def _gaze_prefill(self, ids, mask, vision, cache, layout: GazeLayout, rows: list):
        """A gaze model over whole prompts of ``rows`` (reporting, routing when one asks)."""
        return self._forward_prompt(
            ids,
            mask,
            vision,
            cache,
            gaze_layout=layout.to(self.device),
            gaze_report=True,
            gaze_selection=any(s.return_routing for s in rows),
        )

    def _suffix_forward(self, seq: EngineSequence, ids, mask, vision: dict, cache, length: int):
        """The prompt's text after its visual prefix (``length`` tokens) on the prefix's
        cache: a gaze model's past the prefix's layout, where every position is text; a stock
        model's at the whole prompt's positions (``_stock_rope``), which also give the row's
        rotary delta."""
        if self.gaze:
            return self._forward_prompt(
                ids[:, length:],
                mask,
                {},
                cache,
                gaze_layout=cache.gaze_state.layout,
                gaze_report=True,
                gaze_selection=seq.return_routing,
            )
        positions, cache.rope_deltas = self._stock_rope(ids, mask, vision)
        positions = positions[..., length:]
        return self._forward_prompt(ids[:, length:], mask, {}, cache, position_ids=positions)

    def _stock_rope(self, ids, mask, vision: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A stock model's position ids of a whole one-sequence prompt and its rotary delta,
        as transformers computes them (no vision tower: the grids are enough). The suffix
        after a cached prefix takes these: Qwen2.5-VL's text after a video does not start
        after the video's largest position, so they are not the prefix's delta plus text
        positions, and the prompt's delta depends on its suffix's length."""
        if not self._stock_types:
            positions = torch.arange(ids.shape[1], device=self.device)[None]
            return positions, torch.zeros(1, 1, dtype=torch.long, device=self.device)
        rope_index = self.model.model.get_rope_index
        names = inspect.signature(rope_index).parameters
        grids = {k: v for k, v in vision.items() if k in names}
        positions, deltas = rope_index(
            ids, mm_token_type_ids=self.token_types(ids), attention_mask=mask, **grids
        )
        return positions, torch.as_tensor(deltas).reshape(1, 1).to(self.device)

    @property
    def batched_prefill(self) -> bool:
        """Whether prompts admitted together prefill in one left-padded forward: a gaze model
        without prefix caching and without recurrent layers (whose states a padded batch
        would change)."""
        return self.gaze and self.prefix_cache is None and not self.recurrent

    def prefill_together(self, group: list[EngineSequence]) -> list[Prefilled]:
        """``group``'s prompts in one left-padded forward (``batched_prefill`` models), each
        row's cache cut out as if prefilled alone. Raises when the forward fails (nothing
        has changed then)."""
        ids, mask, vision, layout = self._inputs([s.sample for s in group])
        cache = GazeCache()
        out = self._gaze_prefill(ids, mask, vision, cache, layout, group)
        state = cache.gaze_state
        for seq in group:
            seq.layout = self.processor.layout_of([seq.sample.parts])
        self._record(group, state, [layout] * len(group), batch=True)
        logits, total = out.logits[:, -1].float(), ids.shape[1]
        prefilled = []
        for i, seq in enumerate(group):
            start = total - seq.prompt_tokens  # its left padding
            row = [(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:])
                   for layer in cache.layers]  # fmt: skip
            own = GazeState(
                layout=seq.layout,
                config=state.config,
                descriptors={k: v[i : i + 1] for k, v in state.descriptors.items()},
            )
            delta = (
                state.rope_deltas[i : i + 1].reshape(1, 1).to(self.device)
                if state.rope_deltas is not None
                else torch.zeros(1, 1, dtype=torch.long, device=self.device)
            )
            prefilled.append(
                Prefilled(logits=logits[i : i + 1], layers=row, state=own, delta=delta)
            )
        return prefilled

    def prefix_held(self, seq: EngineSequence) -> bool:
        """Whether the sequence's visual prefix is in the prefix cache now, or held for it
        (``Engine.submit``'s ``prefix_hold``)."""
        plan = self._prefix_plan(seq)
        return plan is not None and (
            seq.held_prefix is not None or self.prefix_cache.holds(plan[0])
        )

    def start_chunks(self, seq: EngineSequence) -> None:
        """Begin the sequence's prefill in chunks (a model without recurrent layers): the
        whole prompt, or its cacheable prefix, which ``chunk`` stores when it is in."""
        ids, mask, vision, layout = self._inputs([seq.sample])
        plan = self._prefix_plan(seq)
        if plan is not None:
            # the prefix in chunks, stored, then its text suffix, as a miss prefills it
            self.prefix_cache.get(plan[0])  # None: counted as the miss it is
            ids_c, mask_c = ids[:, : plan[1]], mask[:, : plan[1]]
        else:
            ids_c, mask_c = ids, mask
        seq.prompt_ids = (ids, mask, vision)
        if not self.gaze:
            seq.chunks = self._stock_chunks(ids_c, mask_c, vision)
            return
        seq.layout = layout
        report = plan is None
        seq.chunks = gaze_module(self.model).start_prefill(
            ids_c,
            vision,
            attention_mask=mask_c,
            cache=GazeCache(),
            gaze_layout=(layout if report else self._prefix_layout(seq)).to(self.device),
            gaze_report=report,
            gaze_selection=report and seq.return_routing,
        )

    def chunk(self, seq: EngineSequence, tokens: int) -> Prefilled | None:
        """The next chunk (at most ``tokens`` positions) of the sequence's chunked prefill;
        the prompt prefilled after the last chunk, else None."""
        chunks = seq.chunks
        logits = chunks.run(tokens)
        if logits is None:
            return None
        seq.chunks = None
        cache = chunks.cache
        ids, mask, vision = seq.prompt_ids
        seq.prompt_ids = None
        if chunks.length < ids.shape[1]:
            # the chunks were the cacheable prefix: store it, then prefill the suffix
            key, length = seq.prefix
            self.prefix_cache.put(key, cache, length)
            logits = self._suffix_forward(seq, ids, mask, vision, cache, length).logits
        return self._prefilled(seq, cache, logits[:, -1].float())

    def _stock_chunks(self, ids, mask, vision) -> StockChunks:
        """A stock model's prefill of one prompt, to be run in chunks: transformers' own
        forward computes its decoder's inputs (embeddings with the visual features in place,
        positions, DeepStack inputs) and the row's rotary delta, caught where the decoder
        would start."""
        decoder = self.model.model.language_model
        caught: dict = {}

        def catch(module, args, kwargs):
            caught.update(kwargs)
            raise _DecoderReached

        handle = decoder.register_forward_pre_hook(catch, with_kwargs=True)
        cache = self._empty_cache()
        try:
            self._stock_prefill(ids, mask, vision, cache)
        except _DecoderReached:
            pass
        finally:
            handle.remove()
        cache.rope_deltas = self._delta_after_prefill(None)
        names = ("visual_pos_masks", "deepstack_visual_embeds")
        return StockChunks(
            model=self.model,
            embeds=caught["inputs_embeds"],
            positions=caught.get("position_ids"),
            mask=mask,
            deepstack={k: caught[k] for k in names if caught.get(k) is not None},
            cache=cache,
        )

    def token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """Stock Qwen-VL's mm_token_type_ids (text 0, image 1, video 2) from the placeholders."""
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[ids == self.processor.image_token_id] = 1
        if self.processor.video_token_id is not None:
            types[ids == self.processor.video_token_id] = 2
        return types

    def _prefilled(self, seq: EngineSequence, cache, logits: torch.Tensor) -> Prefilled:
        """A sequence whose prompt is in ``cache`` (a stock model's carries its rotary delta)."""
        if not self.gaze:
            return Prefilled(
                logits=logits, layers=cache.layers, state=None, delta=cache.rope_deltas
            )
        state = cache.gaze_state
        self._record([seq], state, [seq.layout])
        delta = self._delta_after_prefill(state)
        return Prefilled(logits=logits, layers=cache.layers, state=state, delta=delta)

    def _empty_cache(self):
        """A one-sequence prefill's cache: the gaze model's, or the stock model's from its
        config (a hybrid decoder's linear-attention layers keep recurrent states; the gaze
        model fills in its GazeCache the same way)."""
        return GazeCache() if self.gaze else DynamicCache(config=self.model.config)

    def _stock_prefill(self, ids, mask, vision, cache):
        """The stock model over a whole prompt (or its visual prefix) into ``cache``; the
        cache keeps the row's rotary delta as ``rope_deltas`` (transformers computes M-RoPE
        positions itself and leaves the delta on the model)."""
        extra: dict[str, Any] = {}
        if self._stock_types:
            extra["mm_token_type_ids"] = self.token_types(ids)
        inner = getattr(self.model, "model", None)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None
        out = self._forward_prompt(ids, mask, vision, cache, **extra)
        cache.rope_deltas = self._delta_after_prefill(None)
        return out

    def _stock_positions(self, text: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """A stock model's position ids of text tokens at text positions ``text`` [n, q]: the
        M-RoPE families' three axes (text position plus the row's delta), else ``text``."""
        if self._stock_types:
            return (text + deltas).unsqueeze(0).expand(3, -1, -1)
        return text

    def _forward_prompt(self, ids, mask, vision: dict, cache, **extra):
        """The model over prompt tokens into ``cache`` (the last position's logits only)."""
        return self.model(
            input_ids=ids,
            **vision,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )

    def _inputs(self, samples: list[EncodedSample]) -> tuple:
        """``samples`` as one left-padded batch: ids, attention mask and pixel inputs on the
        device, and the gaze layout."""
        batch = self.processor.collate(samples, padding_side="left")
        names = self.processor.rules.input_names
        vision = {k: v.to(self.device) for k, v in batch.items() if k in names}
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        return ids, mask, vision, batch["gaze_layout"]

    def _cached_prefix(self, seq: EngineSequence, ids, mask, vision) -> tuple | None:
        """(the decode cache after the sequence's visual prefix, its length): from the prefix
        cache (or the entry the sequence holds, when it was evicted since), or prefilled now
        and stored there. None when prefixes are not cached or the prompt has no image or
        video with text after it. Raises for a prompt without its pixel inputs whose prefix
        is neither cached nor held."""
        plan = self._prefix_plan(seq)
        held, seq.held_prefix = seq.held_prefix, None
        cache = None if plan is None else self.prefix_cache.get(plan[0], held)
        if cache is not None:
            seq.cached_tokens = plan[1]
            return cache, plan[1]
        if seq.sample.pixels_dropped:
            raise RuntimeError(
                "the prompt came without its pixel inputs, and its visual prefix is neither "
                "cached nor held (Engine.submit's prefix_hold)"
            )
        if plan is None:
            return None
        key, length = plan
        cache = self._empty_cache()
        ids, mask = ids[:, :length], mask[:, :length]
        if self.gaze:
            layout = self._prefix_layout(seq).to(self.device)
            self._forward_prompt(ids, mask, vision, cache, gaze_layout=layout)
        else:
            self._stock_prefill(ids, mask, vision, cache)
        self.prefix_cache.put(key, cache, length)
        return cache, length

    def _prefix_plan(self, seq: EngineSequence) -> tuple[str, int] | None:
        """(cache key, length) of the sequence's cacheable visual prefix (computed once; its
        content digest may come computed with the sample); None when prefixes are not cached
        or the prompt has no image or video with text after it."""
        if self.prefix_cache is None:
            return None
        if seq.prefix is None:
            seq.prefix = self._prefix_of(seq.sample)
        return seq.prefix if seq.prefix[0] else None

    def _prefix_of(self, sample: EncodedSample) -> tuple[str, int]:
        """(cache key, length) of the sample's visual prefix; the key is "" without one."""
        length, digest = visual_prefix(sample, self.processor)
        return (prefix_key(digest, self.prefix_settings) if digest else "", length)

    def hold_prefix(self, sample: EncodedSample) -> PrefixHold | None:
        """A hold on the entry of the sample's visual prefix (``PrefixCache.hold``), None
        when it is not cached (or prefixes are not)."""
        if self.prefix_cache is None:
            return None
        key, _ = self._prefix_of(sample)
        return self.prefix_cache.hold(key) if key else None

    def _prefix_layout(self, seq: EngineSequence) -> GazeLayout:
        """The layout of the sequence's prefix alone (its parts up to its last medium)."""
        media = max(i for i, p in enumerate(seq.sample.parts) if not isinstance(p, int))
        return self.processor.layout_of([seq.sample.parts[: media + 1]])

    def _delta_after_prefill(self, state: GazeState | None) -> torch.Tensor:
        """The row's rotary delta (M-RoPE positions minus text positions), 0 for 1-D RoPE."""
        if state is not None and state.rope_deltas is not None:
            return state.rope_deltas.reshape(1, 1).to(self.device)
        inner = getattr(self.model, "model", None)
        deltas = getattr(inner, "rope_deltas", None)
        if deltas is not None:
            return torch.as_tensor(deltas).reshape(1, 1).to(self.device)
        return torch.zeros(1, 1, dtype=torch.long, device=self.device)

    # ---- the batch

    def _new_cache(self) -> BatchCache:
        cache = BatchCache(self.num_layers, layer_types=self._layer_types)
        if self.gaze:
            inner = gaze_module(self.model)
            cache.gaze_state = GazeState(
                layout=stack_rows([], [], 0, device=self.device),
                config=inner.gaze_config,
                layers=inner.gaze_layers,
                summarize=False,
            )
        return cache

    def join(self, seq: EngineSequence, prefilled: Prefilled) -> None:
        """Add a prefilled sequence to the batch as its last row."""
        grow = self.cache.insert(prefilled.layers, self.max_rows)
        self._offsets = [o + grow for o in self._offsets]
        self._offsets.append(self.cache.get_seq_length() - seq.prompt_tokens)
        self.rows.append(seq)
        self._deltas.append(prefilled.delta)
        if self.gaze:
            batch_state, state = self.cache.gaze_state, prefilled.state
            merged = {}
            for layer in set(batch_state.descriptors) | set(state.descriptors):
                old = batch_state.descriptors.get(layer)
                new = state.descriptors[layer]
                merged[layer] = new if old is None else _cat_regions(old, new)
            batch_state.descriptors = merged
        self._relayout()

    def retire(self) -> None:
        """Remove the rows of ended sequences: the last rows move into the freed slots; unused
        columns go."""
        gone = {i for i, seq in enumerate(self.rows) if seq.done or seq.cancelled}
        if not gone:
            return
        survivors = len(self.rows) - len(gone)
        tail = [i for i in range(survivors, len(self.rows)) if i not in gone]
        index = [i if i not in gone else tail.pop(0) for i in range(survivors)]
        self.cache.keep(index)
        self.rows = [self.rows[i] for i in index]
        self._offsets = [self._offsets[i] for i in index]
        self._deltas = [self._deltas[i] for i in index]
        if self.gaze:
            state = self.cache.gaze_state
            picked = torch.tensor(index, dtype=torch.long, device=self.device)
            state.descriptors = {k: v.index_select(0, picked) for k, v in state.descriptors.items()}
        trim = min(self._offsets, default=0)
        self.cache.trim_left(trim)
        self._offsets = [o - trim for o in self._offsets]
        self._relayout()

    def _relayout(self) -> None:
        """The batch layout from every row's own layout at its offset; descriptors fitted."""
        if not self.gaze:
            return
        state = self.cache.gaze_state
        length = max(
            (o + s.prompt_tokens for o, s in zip(self._offsets, self.rows, strict=True)),
            default=0,
        )
        rows = [s.layout for s in self.rows]
        state.layout = stack_rows(rows, self._offsets, length, device=self.device)
        regions = state.layout.max_regions
        state.descriptors = {k: _fit_regions(v, regions) for k, v in state.descriptors.items()}
        state.rope_deltas = torch.cat(self._deltas) if self._deltas else None

    # ---- decoding

    def decode(self) -> torch.Tensor:
        """One decode forward of every row on its last token: the logits [rows, V] (float)."""
        rows = self.rows
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        total = self.cache.get_seq_length() + 1
        offsets = torch.tensor(self._offsets, device=self.device)
        mask = (torch.arange(total, device=self.device)[None, :] >= offsets[:, None]).long()
        extra: dict[str, Any] = {}
        if self.gaze:
            state = self.cache.gaze_state
            extra = dict(
                gaze_layout=state.layout,
                gaze_report=True,
                gaze_selection=any(s.return_routing for s in rows),
            )
        else:
            text = total - 1 - offsets[:, None]  # [n, 1] text position of the new token
            extra["position_ids"] = self._stock_positions(text, torch.cat(self._deltas))
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        if self.gaze:
            layout = self.cache.gaze_state.layout
            self._record(rows, self.cache.gaze_state, [layout] * len(rows), batch=True)
        return out.logits[:, -1].float()

    def _record(self, rows, state: GazeState, layouts, batch: bool = False) -> None:
        """Visual entries the step's last query attended (mean over layers and heads), and the
        routed regions at the sequence's layer when it asked."""
        layers = sorted(state.stats)
        if not layers:
            return
        attended = torch.stack([state.stats[i].attended[:, :, -1].float().mean(1) for i in layers])
        dense = torch.stack([state.stats[i].dense[:, -1].float() for i in layers])
        attended, dense = attended.mean(0).tolist(), dense.mean(0).tolist()
        for i, seq in enumerate(rows):
            seq.attended.append(attended[i])
            seq.dense.append(dense[i])
            if seq.return_routing:
                chosen = state.stats[seq.routing_layer].selected
                row = i if batch else 0
                seq.routing.append(
                    []
                    if chosen is None
                    else _boxes(chosen[row, :, -1], layouts[i].regions.box[row])
                )


def _cat_regions(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Descriptors [B, Hkv, R, D] of the batch and of a joining row, padded to the larger R."""
    regions = max(old.shape[2], new.shape[2])
    return torch.cat([_fit_regions(old, regions), _fit_regions(new, regions)])


def _fit_regions(desc: torch.Tensor, regions: int) -> torch.Tensor:
    """Descriptors cut or zero-padded to ``regions`` (padding regions are never visible)."""
    if desc.shape[2] >= regions:
        return desc[:, :, :regions]
    return F.pad(desc, (0, 0, 0, regions - desc.shape[2]))


def _boxes(selected: torch.Tensor, boxes: torch.Tensor) -> list[dict]:
    """selected [Hr, K] region ids -> regions with the number of heads that chose each."""
    ids, counts = torch.unique(selected[selected >= 0], return_counts=True)
    rows = [
        {"box": boxes[r].tolist(), "heads": int(c)}
        for r, c in zip(ids.tolist(), counts.tolist(), strict=True)
    ]
    return sorted(rows, key=lambda row: -row["heads"])
