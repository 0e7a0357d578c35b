"""Continuous (iteration-level) batching: sequences join and leave a running batch of one model.

An ``Engine`` owns a model (gaze or stock) and its processor. Each ``step()``:

1. drops cancelled sequences (their rows are freed at once);
2. prefills waiting sequences while the batch has room and at most ``max_prefill_tokens``
   prompt tokens are prefilled in this step: prefill is bounded, so running sequences keep
   streaming. A prompt larger than what is left of the step's budget is prefilled in
   chunks, one per step (chunked prefill: a gaze or stock model without recurrent layers;
   a hybrid decoder prefills it alone in a step of its own). A prefix-cache hit counts its whole
   prompt (measured: counting only its suffix let 16 hits join in one step, whose first
   tokens then all waited for the step's end; bench/RESULTS.md). Those admitted together prefill in one left-padded forward where
   that is exact (a gaze model without prefix caching or recurrent layers), else each
   alone. A prefilled sequence's first token is sampled from its prefill, and it joins the
   batch;
3. runs one decode step over every running sequence together, each with its own sampling
   settings (temperature, top_p, seed), stop tokens and strings, and token budget;
4. removes the sequences that finished, at once.

Its parts, split as vLLM's v1 engine is: the scheduler is here (the queue, admission,
bounded and chunked prefill, retirement); the model runner (``gazeattn.runner``) runs every
forward (prefill alone, together or in chunks, through the prefix cache; the batch's
decode step; the gaze report) and owns the batch's decode cache, for gaze and stock models;
the sampler (``gazeattn.sampler``: penalties, logit bias, greedy or sampled tokens,
logprobs) picks tokens; the detokenizer (``gazeattn.detokenizer``: text as it is decoded,
except what could still become a stop string; stop strings never reach the output,
streamed or not) makes text. A request's sampling settings are its ``SamplingParams``
(``GenerationRequest.check``). Greedy output of a sequence is the same alone, in a busy
batch and with or without a prefix-cache hit; ``generate_batch`` and ``stream_generate``
are this engine.

The engine is not thread-safe except for ``submit`` and ``cancel``, which a server calls
from other threads than the one running ``step``. No Ray here (``serving/`` drives it).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gazeattn.detokenizer import Detokenizer
from gazeattn.generation import GenerationRequest, GenerationResult
from gazeattn.modeling import ChunkedPrefill, routing_layer_of
from gazeattn.ops.layout import GazeLayout
from gazeattn.prefix_cache import CachedPrefixes, PrefixHold
from gazeattn.processing import GazeProcessor
from gazeattn.runner import ModelRunner, Prefilled, StockChunks
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
        # its prefix's entry, held until its prefill (a sample without its pixel inputs)
        self.held_prefix: PrefixHold | None = options["prefix_hold"]
        self.chunks: ChunkedPrefill | StockChunks | None = None  # its prefill, in chunks
        self.chunk_tokens = 0  # prompt tokens of its last chunk
        self.prompt_ids: tuple | None = None  # (ids, mask, vision) of a chunked prefill's prompt

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
            chunks (a model without recurrent layers).
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
        self.runner = ModelRunner(
            model, processor, max_rows=max_batch_size, prefix_cache_bytes=prefix_cache_bytes
        )
        self.gaze = self.runner.gaze
        self.stops = set(processor.stop_token_ids)
        banned = set(processor.placeholder_ids) | {processor.tokenizer.pad_token_id}
        self.sampler = Sampler(sorted(banned - {None} - self.stops))
        self.detokenizer = Detokenizer(processor)
        self._waiting: deque[EngineSequence] = deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.chunked_prefill = chunked_prefill and not self.runner.recurrent
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
        prefix_hold: PrefixHold | None = None,
    ) -> EngineSequence:
        """Queue a request (it samples as its ``SamplingParams`` say); ``sample`` is its
        ``processor.encode_sample`` (encoded here when not given). Raises InvalidRequest /
        ProcessorInputError for a request that cannot run. ``return_routing`` reports the
        regions routed at ``routing_layer``; ``tag``: anything the caller wants back on the
        sequence (``seq.tag``). A sample without its pixel inputs (``without_pixels``) comes
        with ``prefix_hold``, ``hold_prefix``'s hold on its cached prefix."""
        request.check(self.model.get_output_embeddings().weight.shape[0])
        if sample is not None and sample.pixels_dropped and prefix_hold is None:
            raise ValueError("a sample without its pixel inputs needs a prefix_hold")
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
        options = dict(return_routing=return_routing, routing_layer=layer, prefix_hold=prefix_hold)
        seq = EngineSequence(request, sample, options)
        seq.tag = tag
        with self._work:
            self._waiting.append(seq)
            self._work.notify_all()
        return seq

    def cached_prefixes(self) -> CachedPrefixes:
        """The visual prefixes cached now: a server's preparer leaves out the pixel inputs of
        a prompt whose prefix is among them."""
        cache = self.runner.prefix_cache
        keys = frozenset() if cache is None else cache.keys()
        return CachedPrefixes(settings=self.runner.prefix_settings, keys=keys)

    def hold_prefix(self, sample: EncodedSample) -> PrefixHold | None:
        """A hold on the cached entry of the sample's visual prefix for ``submit`` (None when
        it is not cached): its prefill takes that entry even if it is evicted meanwhile."""
        return self.runner.hold_prefix(sample)

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

    @property
    def running(self) -> list[EngineSequence]:
        """The sequences decoding in the batch, in row order (the runner's rows)."""
        return self.runner.rows

    @property
    def cache(self):
        """The batch's decode cache (the runner's)."""
        return self.runner.cache

    @property
    def prefix_cache(self):
        """The prefix cache (the runner's), None when prefix caching is off."""
        return self.runner.prefix_cache

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
        self.runner.reset()
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
        if len(group) > 1 and self.runner.batched_prefill:
            together = self._prefill_together(group)
            if together is not None:
                return outputs + together
        for seq in group:
            outputs.append(self._prefill(seq))
        return outputs

    def _take(self) -> EngineSequence:
        with self._lock:
            return self._waiting.popleft()

    def _prefill(self, seq: EngineSequence) -> StepOutput:
        """Prefill one sequence alone; it samples its first token and joins the batch."""
        try:
            return self._joined(seq, self.runner.prefill(seq))
        except Exception as err:  # noqa: BLE001 - one request's failure ends only it
            seq.done = True
            return StepOutput(sequence=seq, error=err)

    def _joined(self, seq: EngineSequence, prefilled: Prefilled) -> StepOutput:
        """A prefilled sequence's first token from its prompt's last logits; it joins the batch
        unless that ended it."""
        (output,) = self._advance([seq], prefilled.logits)
        if not seq.done:
            self.runner.join(seq, prefilled)
        return output

    def _start_chunks(self, seq: EngineSequence, budget: int) -> StepOutput | None:
        """Begin the sequence's prefill in chunks and run the first (``budget`` tokens); a
        prompt whose prefix is cached prefills its short suffix now, at once. Returns the
        sequence's output when its prefill ended (or failed) in this call."""
        try:
            if self.runner.prefix_held(seq):
                return self._prefill(seq)
            self.runner.start_chunks(seq)
        except Exception as err:  # noqa: BLE001 - one request's failure ends only it
            seq.done = True
            return StepOutput(sequence=seq, error=err)
        self._partial = seq
        return self._chunk(seq, budget)

    def _chunk(self, seq: EngineSequence, budget: int) -> StepOutput | None:
        """Run the next chunk (at most ``budget`` tokens) of the sequence's chunked prefill;
        after the last, it samples its first token and joins the batch (its output)."""
        seq.chunk_tokens = min(budget, seq.chunks.remaining)
        try:
            prefilled = self.runner.chunk(seq, seq.chunk_tokens)
            self.chunks_run += 1
            if prefilled is None:
                return None
            self._partial = None
            return self._joined(seq, prefilled)
        except Exception as err:  # noqa: BLE001 - one request's failure ends only it
            self._partial, seq.chunks, seq.prompt_ids = None, None, None
            seq.done = True
            return StepOutput(sequence=seq, error=err)

    def _prefill_together(self, group: list[EngineSequence]) -> list[StepOutput] | None:
        """Prefill ``group`` in one left-padded forward (what ``generate_batch`` asks: many
        prompts at once), then each row joins the batch as if prefilled alone. None when the
        forward failed (nothing has changed then: the caller prefills each alone, so a bad
        request ends alone)."""
        try:
            prefilled = self.runner.prefill_together(group)
        except Exception:  # noqa: BLE001 - each is prefilled alone instead
            logger.warning("a batched prefill failed; prefilling its sequences alone")
            return None
        outputs = self._advance(group, torch.cat([p.logits for p in prefilled]))
        for i, seq in enumerate(group):
            if seq.done:
                continue
            try:
                self.runner.join(seq, prefilled[i])
            except Exception as err:  # noqa: BLE001 - as a prefill alone: it ends only this one
                seq.done = True
                outputs[i] = StepOutput(sequence=seq, error=err)
        return outputs

    # ---- the batch

    def _retire(self) -> None:
        self.runner.retire()

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
            logits = self.runner.decode()
        except Exception as err:  # noqa: BLE001 - the batch step failed: every row ends
            outputs = [StepOutput(sequence=s, error=err) for s in rows]
            for seq in rows:
                seq.done = True
            self.runner.reset()
            return outputs
        for seq in rows:
            seq.peak_batch = max(seq.peak_batch, len(rows))
        return self._advance(rows, logits)

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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
