"""Continuous (iteration-level) batching: sequences join and leave a running batch of one model.

An ``Engine`` owns a model (gaze or stock) and its processor. Each ``step()``:

1. drops cancelled sequences (their rows are freed at once);
2. prefills waiting sequences while the batch has room and at most ``max_prefill_tokens``
   prompt tokens are prefilled in this step: prefill is bounded, so running sequences keep
   streaming. A prompt larger than what is left of the step's budget is prefilled in
   chunks, one per step (chunked prefill: a gaze model without recurrent layers; other
   models prefill it alone in a step of its own). A prefix-cache hit counts its whole
   prompt (measured: counting only its suffix let 16 hits join in one step, whose first
   tokens then all waited for the step's end; bench/RESULTS.md). Those admitted together prefill in one left-padded forward where
   that is exact (a gaze model without prefix caching or recurrent layers), else each
   alone. A prefilled sequence's first token is sampled from its prefill, and it joins the
   batch;
3. runs one decode step over every running sequence together, each with its own sampling
   settings (temperature, top_p, seed), stop tokens and strings, and token budget;
4. removes the sequences that finished, at once.

The gaze cache follows the rows (``gazeattn.cache.BatchCache``): a sequence's region
descriptors are computed at its own prefill and move with its row, its layout is stacked
into the batch's (``gazeattn.ops.layout.stack_rows``) at its left padding, and M-RoPE
families keep its rotary delta. Prompts with images or video prefill their visual prefix
through the prefix cache (``gazeattn.prefix_cache``), a gaze model's and a stock model's. Greedy output of a
sequence is the same alone, in a busy batch and with or without a prefix-cache hit;
``generate_batch`` and ``stream_generate`` are this engine.

Its parts: the scheduling (admission, bounded prefill, retirement) and the model runner
(prefill, the batch's decode forward, the gaze report) are here; the sampler
(``gazeattn.sampler``: penalties, logit bias, greedy or sampled tokens, logprobs) and the
detokenizer (``gazeattn.detokenizer``: text as it is decoded, except what could still
become a stop string; stop strings never reach the output, streamed or not) are their own.

The engine is not thread-safe except for ``submit`` and ``cancel``, which a server calls
from other threads than the one running ``step``. No Ray here (``serving/`` drives it).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from gazeattn.cache import BatchCache
from gazeattn.detokenizer import Detokenizer
from gazeattn.generation import (
    GazeCache,
    GenerationRequest,
    GenerationResult,
)
from gazeattn.modeling import (
    ChunkedPrefill,
    GazeState,
    gaze_module,
    is_gaze_model,
    routing_layer_of,
)
from gazeattn.ops.layout import GazeLayout, stack_rows
from gazeattn.prefix_cache import PrefixCache, prefix_key, visual_prefix
from gazeattn.processing import GazeProcessor
from gazeattn.sample import EncodedSample
from gazeattn.sampler import Sampler, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StepOutput:
    """What one step produced for one sequence: new text, and the result when it finished."""

    sequence: EngineSequence
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenerationResult | None = None
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class EngineSequence:
    """One request inside the engine (created by ``Engine.submit``)."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, sample: EncodedSample, options: dict):
        self.id = next(self._ids)
        self.request = request
        self.sample = sample
        self.return_routing: bool = options["return_routing"]
        self.routing_layer: int = options["routing_layer"]
        self.top_logprobs: int | None = request.top_logprobs
        self.presence_penalty: float = request.presence_penalty
        self.frequency_penalty: float = request.frequency_penalty
        self.logit_bias: dict[int, float] = dict(request.logit_bias)
        self.peak_batch = 0  # the most sequences it decoded together with (itself included)
        self.cached_tokens = 0  # prompt tokens its prefill took from the prefix cache
        self.tag: Any = None
        self.prompt_tokens = len(sample)
        self.tokens: list[int] = []
        self.sent = ""  # text emitted so far
        self.final: str | None = None  # the whole text, once done
        self.done = False
        self.cancelled = False
        self.finish_reason = "length"
        self.attended: list[float] = []
        self.dense: list[float] = []
        self.routing: list[list[dict]] = []
        self.logprobs: list[TokenLogprob] = []
        self.generator = (
            torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        )
        self.layout: GazeLayout | None = None  # its own layout (one row, no padding)
        self.prefix: tuple[str, int] | None = None  # (key, length) of its cacheable prefix
        self.chunks: ChunkedPrefill | None = None  # its prefill, while it runs in chunks
        self.chunk_tokens = 0  # prompt tokens of its last chunk
        self.prompt_ids: tuple | None = None  # (ids, mask) of a chunked prefill's prompt

    @property
    def grids(self) -> list[list[int]]:
        return self.sample.grids


class Engine:
    """Continuous batching over one model (see the module doc).

    Args:
        model: a gaze model (any family) or a stock model of a supported family, in eval mode.
        processor: its GazeProcessor (for a stock model, one without a gaze config).
        max_batch_size: most sequences decoding together.
        max_prefill_tokens: prompt tokens prefilled in one step before the batch decodes
            again (a longer prompt is prefilled in chunks of at most this many, or alone
            where chunks are off or the model cannot run them).
        chunked_prefill: whether a prompt larger than the step's budget is prefilled in
            chunks (a gaze model without recurrent layers).
        routing_layer: the layer whose routing is reported when a sequence asks for it.
        prefix_cache_bytes: memory for prefilled visual prefixes (``gazeattn.prefix_cache``)
            the model reuses across requests; 0 turns prefix caching off.
    """

    def __init__(
        self,
        model,
        processor: GazeProcessor,
        *,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 8192,
        routing_layer: int = -1,
        prefix_cache_bytes: int = 0,
        chunked_prefill: bool = True,
    ):
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be >= 1")
        self.model, self.processor = model, processor
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.routing_layer = routing_layer
        self.gaze = is_gaze_model(model)
        self.device = next(model.parameters()).device
        self._text_config = model.config.get_text_config(decoder=True)
        self.num_layers = self._text_config.num_hidden_layers
        self.stops = set(processor.stop_token_ids)
        banned = set(processor.placeholder_ids) | {processor.tokenizer.pad_token_id}
        self.sampler = Sampler(sorted(banned - {None} - self.stops))
        self.detokenizer = Detokenizer(processor)
        self._stock_types = (
            not self.gaze and "mm_token_type_ids" in inspect.signature(model.forward).parameters
        )
        self._waiting: deque[EngineSequence] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.running: list[EngineSequence] = []
        self._offsets: list[int] = []
        self._deltas: list[torch.Tensor] = []  # [1, 1] rotary delta per row (M-RoPE)
        self.cache = self._new_cache()
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        # a hybrid decoder's recurrent states: a padded or a cut prefill would change them
        types = getattr(self._text_config, "layer_types", None) or ()
        self._recurrent = "linear_attention" in types
        self.chunked_prefill = chunked_prefill and self.gaze and not self._recurrent
        self._partial: EngineSequence | None = None  # the sequence prefilling in chunks
        self.chunks_run = 0  # prefill chunks run so far (a chunked prompt's every chunk)

    # ---- from any thread

    def submit(
        self,
        request: GenerationRequest,
        *,
        sample: EncodedSample | None = None,
        return_routing: bool = False,
        routing_layer: int | None = None,
        tag: Any = None,
    ) -> EngineSequence:
        """Queue a request (it samples as its ``SamplingParams`` say); ``sample`` is its
        ``processor.encode_sample`` (encoded here when not given). Raises InvalidRequest /
        ProcessorInputError for a request that cannot run. ``return_routing`` reports the
        regions routed at ``routing_layer``; ``tag``: anything the caller wants back on the
        sequence (``seq.tag``)."""
        request.check(self.model.get_output_embeddings().weight.shape[0])
        if sample is None:
            sample = self.processor.encode_sample(
                request.messages,
                images=request.images,
                videos=request.videos,
                add_generation_prompt=True,
            )
        layer = self.routing_layer if routing_layer is None else routing_layer
        if return_routing and self.gaze:
            layer = routing_layer_of(self.model, layer)
        options = dict(return_routing=return_routing, routing_layer=layer)
        seq = EngineSequence(request, sample, options)
        seq.tag = tag
        with self._work:
            self._waiting.append(seq)
            self._work.notify_all()
        return seq

    def cancel(self, seq: EngineSequence) -> None:
        """Stop a sequence (its client went away): its slot is freed at the next step."""
        with self._work:
            seq.cancelled = True
            self._work.notify_all()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to do (or ``timeout``); True when there is."""
        with self._work:
            if not self.has_work:
                self._work.wait(timeout)
            return self.has_work

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self.running) or self._partial is not None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + (self._partial is not None)

    @property
    def prefilling(self) -> EngineSequence | None:
        """The sequence whose prompt is being prefilled in chunks, if any."""
        return self._partial

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the scheduler thread

    def step(self, emit: Callable[[list[StepOutput]], None] | None = None) -> list[StepOutput]:
        """One iteration: cancellations, bounded prefill of newcomers, one decode step.

        ``emit`` (optional) receives each phase's outputs as soon as they exist, so first
        tokens go out before the batch's decode step runs.
        """
        outputs: list[StepOutput] = []

        def publish(items: list[StepOutput]) -> None:
            outputs.extend(items)
            if emit is not None and items:
                emit(items)

        with torch.no_grad():
            self._drop_cancelled()
            publish(self._admit())
            if self.running:
                publish(self._decode())
            self._retire()
        return outputs

    def abort(self, error: Exception) -> list[StepOutput]:
        """End every running and waiting sequence with ``error`` and start an empty batch
        (after a step failed in a way that leaves the batch unknown)."""
        with self._lock:
            seqs = [*self.running, *self._waiting]
            self._waiting.clear()
        if self._partial is not None:
            seqs.append(self._partial)
            self._partial = None
        for seq in seqs:
            seq.done = True
        self.running, self._offsets, self._deltas = [], [], []
        self.cache = self._new_cache()
        return [StepOutput(sequence=s, error=error) for s in seqs if not s.cancelled]

    def run(self, requests: Sequence[GenerationRequest], **options) -> list[GenerationResult]:
        """Submit ``requests`` and step until all are done; results in order."""
        seqs = [self.submit(r, **options) for r in requests]
        results: dict[int, GenerationResult] = {}
        while len(results) < len(seqs):
            for out in self.step():
                if out.error is not None:
                    raise out.error
                if out.result is not None:
                    results[out.sequence.id] = out.result
        return [results[s.id] for s in seqs]

    # ---- admission and prefill

    def _admit(self) -> list[StepOutput]:
        outputs, budget = [], self.max_prefill_tokens
        if self._partial is not None:
            # the prompt prefilling in chunks goes first; while it lasts, nothing else joins
            seq = self._partial
            done = self._chunk(seq, budget)
            if done is not None:
                outputs.append(done)
            if self._partial is not None:
                return outputs
            budget -= seq.chunk_tokens
        group = []
        while len(self.running) + len(group) < self.max_batch_size and budget > 0:
            # only this thread takes from the queue: its head stays the head until taken
            with self._lock:
                seq = self._waiting[0] if self._waiting else None
            if seq is None:
                break
            if seq.cancelled:
                self._take()
                continue
            cost = seq.prompt_tokens
            if cost > budget and (self.chunked_prefill or budget < self.max_prefill_tokens):
                if not self.chunked_prefill or group:
                    break
                # larger than what is left of this step: its prefill starts in chunks
                self._take()
                done = self._start_chunks(seq, budget)
                if done is not None:
                    outputs.append(done)
                break
            self._take()
            budget -= cost
            group.append(seq)
        if len(group) > 1 and self._batched_prefill:
            together = self._prefill_together(group)
            if together is not None:
                return outputs + together
        for seq in group:
            try:
                outputs.append(self._prefill(seq))
            except Exception as err:  # noqa: BLE001 - one request's failure ends only it
                seq.done = True
                outputs.append(StepOutput(sequence=seq, error=err))
        return outputs

    def _take(self) -> EngineSequence:
        with self._lock:
            return self._waiting.popleft()

    def _start_chunks(self, seq: EngineSequence, budget: int) -> StepOutput | None:
        """Begin the sequence's prefill in chunks and run the first (``budget`` tokens); a
        prompt whose prefix is cached prefills its short suffix now, at once. Returns the
        sequence's output when its prefill ended (or failed) in this call."""
        try:
            plan = self._prefix_plan(seq)
            if plan is not None and self.prefix_cache.holds(plan[0]):
                return self._prefill(seq)
            ids, mask, vision, layout = self._inputs([seq.sample])
            seq.layout = layout
            if plan is not None:
                # the prefix in chunks, stored, then its text suffix, as a miss prefills it
                self.prefix_cache.get(plan[0])  # None: counted as the miss it is
                length = plan[1]
                ids_c, mask_c = ids[:, :length], mask[:, :length]
                layout_c, report = self._prefix_layout(seq), False
            else:
                ids_c, mask_c, layout_c, report = ids, mask, layout, True
            seq.prompt_ids = (ids, mask)
            seq.chunks = gaze_module(self.model).start_prefill(
                ids_c,
                vision,
                attention_mask=mask_c,
                cache=GazeCache(),
                gaze_layout=layout_c.to(self.device),
                gaze_report=report,
                gaze_selection=report and seq.return_routing,
            )
        except Exception as err:  # noqa: BLE001 - one request's failure ends only it
            seq.done = True
            return StepOutput(sequence=seq, error=err)
        self._partial = seq
        return self._chunk(seq, budget)

    def _chunk(self, seq: EngineSequence, budget: int) -> StepOutput | None:
        """Run the next chunk (at most ``budget`` tokens) of the sequence's chunked prefill;
        after the last, it samples its first token and joins the batch (its output)."""
        chunks = seq.chunks
        seq.chunk_tokens = min(budget, chunks.remaining)
        try:
            logits = chunks.run(seq.chunk_tokens)
            self.chunks_run += 1
            if logits is None:
                return None
            self._partial, seq.chunks = None, None
            cache = chunks.cache
            ids, mask = seq.prompt_ids
            seq.prompt_ids = None
            if chunks.length < ids.shape[1]:
                # the chunks were the cacheable prefix: store it, then prefill the suffix
                key, length = seq.prefix
                self.prefix_cache.put(key, cache, length)
                out = self._prefill_forward(
                    ids[:, length:],
                    mask,
                    {},
                    cache,
                    gaze_layout=cache.gaze_state.layout,
                    gaze_report=True,
                    gaze_selection=seq.return_routing,
                )
                logits = out.logits
            return self._prefilled(seq, cache, logits[:, -1].float())
        except Exception as err:  # noqa: BLE001 - one request's failure ends only it
            self._partial, seq.chunks, seq.prompt_ids = None, None, None
            seq.done = True
            return StepOutput(sequence=seq, error=err)

    @property
    def _batched_prefill(self) -> bool:
        """Whether sequences admitted together prefill in one left-padded forward: a gaze
        model without prefix caching and without recurrent layers (whose states a padded
        batch would change)."""
        return self.gaze and self.prefix_cache is None and not self._recurrent

    def _prefill_together(self, group: list[EngineSequence]) -> list[StepOutput] | None:
        """Prefill ``group`` in one left-padded forward (what ``generate_batch`` asks: many
        prompts at once), then each row joins the batch as if prefilled alone. None when the
        forward failed (nothing has changed then: the caller prefills each alone, so a bad
        request ends alone)."""
        try:
            ids, mask, vision, layout = self._inputs([s.sample for s in group])
            cache = GazeCache()
            out = self._prefill_forward(
                ids,
                mask,
                vision,
                cache,
                gaze_layout=layout.to(self.device),
                gaze_report=True,
                gaze_selection=any(s.return_routing for s in group),
            )
        except Exception:  # noqa: BLE001 - each is prefilled alone instead
            logger.warning("a batched prefill failed; prefilling its sequences alone")
            return None
        state = cache.gaze_state
        for seq in group:
            seq.layout = self.processor.layout_of([seq.sample.parts])
        self._record(group, state, [layout] * len(group), batch=True)
        outputs = self._advance(group, out.logits[:, -1].float())
        total = ids.shape[1]
        for i, seq in enumerate(group):
            if seq.done:
                continue
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
            try:
                self._join(seq, SimpleNamespace(layers=row), own, delta)
            except Exception as err:  # noqa: BLE001 - as a prefill alone: it ends only this one
                seq.done = True
                outputs[i] = StepOutput(sequence=seq, error=err)
        return outputs

    def _prefill(self, seq: EngineSequence) -> StepOutput:
        ids, mask, vision, layout = self._inputs([seq.sample])
        prefix = self._cached_prefix(seq, ids, mask, vision)
        if not self.gaze:
            if prefix is None:
                cache = self._empty_cache()
                out, delta = self._stock_prefill(ids, mask, vision, cache)
            else:
                # the suffix (text only) on the prefix's cache, at the positions after it
                cache, length = prefix
                delta = cache.rope_deltas
                text = torch.arange(length, ids.shape[1], device=self.device)[None]
                out = self._prefill_forward(
                    ids[:, length:],
                    mask,
                    {},
                    cache,
                    position_ids=self._stock_positions(text, delta),
                )
            return self._prefilled(seq, cache, out.logits[:, -1].float(), delta)
        seq.layout = layout
        extra = dict(
            gaze_layout=seq.layout.to(self.device),
            gaze_report=True,
            gaze_selection=seq.return_routing,
        )
        cache = self._empty_cache()
        if prefix is not None:
            # the suffix (text only) on the prefix's cache; past the prefix's layout every
            # position is text
            cache, length = prefix
            ids, vision = ids[:, length:], {}
            extra["gaze_layout"] = cache.gaze_state.layout
        out = self._prefill_forward(ids, mask, vision, cache, **extra)
        return self._prefilled(seq, cache, out.logits[:, -1].float())

    def _empty_cache(self):
        """A one-sequence prefill's cache: the gaze model's, or the stock model's from its
        config (a hybrid decoder's linear-attention layers keep recurrent states; the gaze
        model fills in its GazeCache the same way)."""
        return GazeCache() if self.gaze else DynamicCache(config=self.model.config)

    def _stock_prefill(self, ids, mask, vision, cache) -> tuple[Any, torch.Tensor]:
        """The stock model over a whole prompt (or its visual prefix) into ``cache``: its
        output and the row's rotary delta (transformers computes M-RoPE positions itself)."""
        extra: dict[str, Any] = {}
        if self._stock_types:
            extra["mm_token_type_ids"] = self._token_types(ids)
        inner = getattr(self.model, "model", None)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None
        out = self._prefill_forward(ids, mask, vision, cache, **extra)
        return out, self._delta_after_prefill(None)

    def _stock_positions(self, text: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """A stock model's position ids of text tokens at text positions ``text`` [n, q]: the
        M-RoPE families' three axes (text position plus the row's delta), else ``text``."""
        if self._stock_types:
            return (text + deltas).unsqueeze(0).expand(3, -1, -1)
        return text

    def _prefilled(
        self, seq: EngineSequence, cache, logits: torch.Tensor, delta: torch.Tensor | None = None
    ) -> StepOutput:
        """A sequence whose prompt is in ``cache``: its first token from the prompt's last
        ``logits``, and it joins the batch (``delta``: a stock model's rotary delta)."""
        state = cache.gaze_state if self.gaze else None
        if state is not None:
            self._record([seq], state, [seq.layout])
        if delta is None:
            delta = self._delta_after_prefill(state)
        (output,) = self._advance([seq], logits)
        if not seq.done:
            self._join(seq, cache, state, delta)
        return output

    def _prefill_forward(self, ids, mask, vision: dict, cache, **extra):
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
        cache, or prefilled now and stored there. None when prefixes are not cached or the
        prompt has no image or video with text after it."""
        plan = self._prefix_plan(seq)
        if plan is None:
            return None
        key, length = plan
        cache = self.prefix_cache.get(key)
        if cache is not None:
            seq.cached_tokens = length
            return cache, length
        cache = self._empty_cache()
        ids, mask = ids[:, :length], mask[:, :length]
        if self.gaze:
            layout = self._prefix_layout(seq).to(self.device)
            self._prefill_forward(ids, mask, vision, cache, gaze_layout=layout)
        else:
            # the entry keeps the prefix's rotary delta: a hit's suffix continues from it
            _, cache.rope_deltas = self._stock_prefill(ids, mask, vision, cache)
        self.prefix_cache.put(key, cache, length)
        return cache, length

    def _prefix_plan(self, seq: EngineSequence) -> tuple[str, int] | None:
        """(cache key, length) of the sequence's cacheable visual prefix (computed once; its
        content digest may come computed with the sample); None when prefixes are not cached
        or the prompt has no image or video with text after it."""
        if self.prefix_cache is None:
            return None
        if seq.prefix is None:
            length, digest = visual_prefix(seq.sample, self.processor)
            settings = "stock"
            if self.gaze:
                inner = gaze_module(self.model)
                settings = repr((inner.gaze_config, inner.gaze_top_k, inner.gaze_layers))
            seq.prefix = (prefix_key(digest, settings) if digest else "", length)
        return seq.prefix if seq.prefix[0] else None

    def _prefix_layout(self, seq: EngineSequence) -> GazeLayout:
        """The layout of the sequence's prefix alone (its parts up to its last medium)."""
        media = max(i for i, p in enumerate(seq.sample.parts) if not isinstance(p, int))
        return self.processor.layout_of([seq.sample.parts[: media + 1]])

    def _token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """Stock Qwen-VL's mm_token_type_ids (text 0, image 1, video 2) from the placeholders."""
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[ids == self.processor.image_token_id] = 1
        if self.processor.video_token_id is not None:
            types[ids == self.processor.video_token_id] = 2
        return types

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
        text = self.model.config.get_text_config(decoder=True)
        cache = BatchCache(self.num_layers, layer_types=getattr(text, "layer_types", None))
        if self.gaze:
            inner = gaze_module(self.model)
            cache.gaze_state = GazeState(
                layout=stack_rows([], [], 0, device=self.device),
                config=inner.gaze_config,
                layers=inner.gaze_layers,
                summarize=False,
            )
        return cache

    def _join(self, seq: EngineSequence, prefill, state: GazeState | None, delta) -> None:
        grow = self.cache.insert(prefill.layers, self.max_batch_size)
        self._offsets = [o + grow for o in self._offsets]
        self._offsets.append(self.cache.get_seq_length() - seq.prompt_tokens)
        self.running.append(seq)
        self._deltas.append(delta)
        if self.gaze:
            batch_state = self.cache.gaze_state
            merged = {}
            for layer in set(batch_state.descriptors) | set(state.descriptors):
                old = batch_state.descriptors.get(layer)
                new = state.descriptors[layer]
                merged[layer] = new if old is None else _cat_regions(old, new)
            batch_state.descriptors = merged
        self._relayout()

    def _retire(self) -> None:
        """Remove finished rows: the last rows move into the freed slots; unused columns go."""
        gone = {i for i, seq in enumerate(self.running) if seq.done or seq.cancelled}
        if not gone:
            return
        survivors = len(self.running) - len(gone)
        tail = [i for i in range(survivors, len(self.running)) if i not in gone]
        index = [i if i not in gone else tail.pop(0) for i in range(survivors)]
        self.cache.keep(index)
        self.running = [self.running[i] for i in index]
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
            (o + s.prompt_tokens for o, s in zip(self._offsets, self.running, strict=True)),
            default=0,
        )
        rows = [s.layout for s in self.running]
        state.layout = stack_rows(rows, self._offsets, length, device=self.device)
        regions = state.layout.max_regions
        state.descriptors = {k: _fit_regions(v, regions) for k, v in state.descriptors.items()}
        state.rope_deltas = torch.cat(self._deltas) if self._deltas else None

    def _drop_cancelled(self) -> None:
        with self._lock:
            if any(s.cancelled for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
        if self._partial is not None and self._partial.cancelled:
            self._partial.chunks = self._partial.prompt_ids = None
            self._partial = None
        if any(s.cancelled for s in self.running):
            self._retire()

    # ---- decoding

    def _decode(self) -> list[StepOutput]:
        rows = self.running
        try:
            logits = self._forward(rows)
        except Exception as err:  # noqa: BLE001 - the batch step failed: every row ends
            outputs = [StepOutput(sequence=s, error=err) for s in rows]
            for seq in rows:
                seq.done = True
            self._retire()
            self.cache = self._new_cache()
            return outputs
        for seq in rows:
            seq.peak_batch = max(seq.peak_batch, len(rows))
        return self._advance(rows, logits)

    def _forward(self, rows: list[EngineSequence]) -> torch.Tensor:
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

    # ---- sampling, stops, text

    def _advance(self, rows: list[EngineSequence], logits: torch.Tensor) -> list[StepOutput]:
        """Each row's next token (the sampler's), stops and text (the detokenizer's). A row
        that fails (non-finite logits, a sampling error) ends alone with its error; the
        others go on."""
        outputs = []
        try:
            picks = self.sampler.pick(rows, logits)
        except Exception as err:  # noqa: BLE001 - a failure of the step's sampling ends its rows
            logger.exception("sampling failed for %d sequences", len(rows))
            for seq in rows:
                seq.done = True
            return [StepOutput(sequence=seq, error=err) for seq in rows]
        for i, seq in enumerate(rows):
            try:
                if picks.errors[i] is not None:
                    raise picks.errors[i]
                outputs.append(self._advance_row(seq, picks.tokens[i], picks.logprobs[i]))
            except Exception as err:  # noqa: BLE001 - one row's failure ends only it
                logger.exception("sequence %d failed in sampling", seq.id)
                seq.done = True
                outputs.append(StepOutput(sequence=seq, error=err))
        return outputs

    def _advance_row(self, seq: EngineSequence, tok: int, entry: TokenLogprob | None) -> StepOutput:
        out = StepOutput(sequence=seq)
        if entry is not None:
            seq.logprobs.append(entry)
            out.logprobs.append(entry)
        if tok in self.stops:
            seq.done, seq.finish_reason = True, "stop"
        else:
            seq.tokens.append(tok)
            out.token_ids.append(tok)
            if len(seq.tokens) >= seq.request.max_new_tokens:
                seq.done = True
        out.text = self.detokenizer.delta(seq)
        if seq.done:
            out.result = self._result(seq)
        return out

    def _result(self, seq: EngineSequence) -> GenerationResult:
        return GenerationResult(
            text=seq.final if seq.final is not None else seq.sent,
            token_ids=list(seq.tokens),
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=len(seq.tokens),
            attended_mean=_mean(seq.attended),
            dense_mean=_mean(seq.dense),
            routing=seq.routing if seq.return_routing else None,
            grids=seq.grids,
            logprobs=seq.logprobs if seq.top_logprobs is not None else None,
            cached_tokens=seq.cached_tokens,
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
