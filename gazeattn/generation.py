"""Batched generation with the gaze KV cache, and streaming for one request.

The gaze KV cache is a transformers ``DynamicCache`` that also keeps the gaze
state: per layer, the region descriptors computed once at prefill. A decode
step then costs the routing GEMV plus the gather of the selected regions
(``gazeattn.ops.gaze.decode``), not a pass over every visual key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from gazeattn.modeling import is_gaze_model, routing_layer_of
from gazeattn.processing import GazeProcessor


class GazeCache(DynamicCache):
    """A DynamicCache that carries the gaze state (layout, descriptors) across decode steps."""

    gaze_state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # beam search moves rows; the descriptors and layout rows move with the keys
        super().reorder_cache(beam_idx)
        if self.gaze_state is not None:
            self.gaze_state.select(beam_idx)


class InvalidRequest(ValueError):
    """A request the engine cannot run as asked (a client's error); ``param`` names the setting.

    Every other exception out of the engine is a fault of the server, never of the request.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(kw_only=True)
class GenerationRequest:
    """One chat request. ``messages`` use {"type": "image"} / {"type": "video"} parts, matched in
    order with ``images`` (PIL or HWC uint8) and ``videos`` (lists of frames)."""

    messages: list[dict]
    images: Sequence[Any] = ()
    videos: Sequence[Sequence[Any]] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass(kw_only=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    attended_mean: float  # visual KV entries per generated token (mean over layers and heads)
    dense_mean: float  # the same for dense attention
    # per generated token: the regions routed at the chosen layer,
    # [{"box": [span, t0, t1, h0, h1, w0, w1], "heads": n}, ...] (most heads first)
    routing: list[list[dict]] | None = None
    grids: list[list[int]] = field(default_factory=list)  # (t, h, w) of each image/video span
    # per generated token, when asked (gazeattn.engine.TokenLogprob)
    logprobs: list | None = None


def generate_batch(
    model,
    processor: GazeProcessor,
    requests: Sequence[GenerationRequest],
    *,
    return_routing: bool = False,
    routing_layer: int = -1,
) -> list[GenerationResult]:
    """Generate for several requests at once (left padding, one gaze cache)."""
    if not requests:
        return []
    steps = _decode(model, processor, list(requests), return_routing, routing_layer)
    for _ in steps:
        pass
    return steps.results


def stream_generate(
    model,
    processor: GazeProcessor,
    request: GenerationRequest,
    *,
    return_routing: bool = False,
    routing_layer: int = -1,
) -> Iterator[str]:
    """Yield text deltas as tokens are generated; the final GenerationResult is the return value.

    Text that could still become one of the request's stop strings is held back until it
    cannot, so a stop string never reaches the stream (as it never reaches the result).
    """
    steps = _decode(model, processor, [request], return_routing, routing_layer)
    hold = max((len(s) for s in request.stop if s), default=1) - 1
    sent = ""
    for _ in steps:
        if steps.done[0]:
            # the rest comes from the result, cut before a stop string
            continue
        text = steps.text(0)
        # a partial UTF-8 character decodes as U+FFFD until its last byte arrives
        text = text.rstrip("\ufffd")
        text = text[: len(text) - hold] if hold else text
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent) :]
            sent = text
    final = steps.results[0].text
    if len(final) > len(sent) and final.startswith(sent):
        yield final[len(sent) :]
    return steps.results[0]


class _decode:
    """Iterates decode steps over a batch; ``results`` is filled when it ends."""

    def __init__(self, model, processor, requests, return_routing, routing_layer):
        self.model, self.processor, self.requests = model, processor, requests
        self.return_routing = return_routing
        samples = [
            processor.encode_sample(
                r.messages, images=r.images, videos=r.videos, add_generation_prompt=True
            )
            for r in requests
        ]
        for r in requests:
            check_request(r)
        if return_routing and is_gaze_model(model):
            routing_layer = routing_layer_of(model, routing_layer)
        self.batch = processor.collate(samples, padding_side="left")
        self.prompt_lens = [len(s) for s in samples]
        self.grids = [s.grids for s in samples]
        self.stops = set(processor.stop_token_ids)
        # placeholders only the processor may place: a sampled one would break the next step
        banned = set(processor.placeholder_ids) | {processor.tokenizer.pad_token_id}
        self.banned = sorted(banned - {None} - self.stops)
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.done = [False] * len(requests)
        self.finish = ["length"] * len(requests)
        self.attended = [[] for _ in requests]
        self.dense = [[] for _ in requests]
        self.routing: list[list[list[dict]]] = [[] for _ in requests]
        self.layer = routing_layer  # a decoder layer id, checked below for a gaze model
        self.generators = [
            torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in requests
        ]
        self.results: list[GenerationResult] = []

    def text(self, i: int) -> str:
        return self.processor.decode(self.tokens[i])

    def __iter__(self):
        model, batch = self.model, self.batch
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        layout = batch["gaze_layout"]
        vision = {
            k: v.to(device) for k, v in batch.items() if k in self.processor.rules.input_names
        }
        cache = GazeCache()
        max_new = max(r.max_new_tokens for r in self.requests)
        step_ids = ids
        with torch.no_grad():
            for step in range(max_new):
                out = model(
                    input_ids=step_ids,
                    **(vision if step == 0 else {}),
                    attention_mask=mask,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    gaze_layout=layout,
                    gaze_report=True,
                    gaze_selection=self.return_routing,
                )
                self._record(cache.gaze_state, layout)
                logits = out.logits[:, -1].float()
                logits[:, self.banned] = float("-inf")
                next_ids = self._pick(logits)
                self._advance(next_ids)
                yield step
                if all(self.done):
                    break
                step_ids = next_ids[:, None].to(device)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        self._finish()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        picks = []
        for i, r in enumerate(self.requests):
            row = logits[i]
            if r.temperature <= 0:
                picks.append(int(row.argmax()))
                continue
            picks.append(sample_token(row, r.temperature, r.top_p, self.generators[i]))
        return torch.tensor(picks)

    def _advance(self, next_ids: torch.Tensor) -> None:
        for i, r in enumerate(self.requests):
            if self.done[i]:
                continue
            tok = int(next_ids[i])
            if tok in self.stops:
                self.done[i], self.finish[i] = True, "stop"
                continue
            self.tokens[i].append(tok)
            if r.stop and any(s and s in self.text(i) for s in r.stop):
                self.done[i], self.finish[i] = True, "stop"
            elif len(self.tokens[i]) >= r.max_new_tokens:
                self.done[i] = True

    def _record(self, state, layout) -> None:
        """Routing of the last query, which picks the next token: entries per layer, boxes at one layer."""
        layers = sorted(state.stats)
        for i in range(len(self.requests)):
            if self.done[i]:
                continue
            stats = [state.stats[layer] for layer in layers]
            self.attended[i].append(
                _mean([float(s.attended[i, :, -1].float().mean()) for s in stats])
            )
            self.dense[i].append(_mean([float(s.dense[i, -1]) for s in stats]))
            if self.return_routing:
                chosen = state.stats[self.layer].selected  # [B, Hr, Tq, K]
                # None when the layer ran dense (a dense-twin model): nothing was routed
                self.routing[i].append(
                    [] if chosen is None else _boxes(chosen[i, :, -1], layout.regions.box[i])
                )

    def _finish(self) -> None:
        for i, r in enumerate(self.requests):
            text = self.text(i)
            for s in r.stop:
                if s and s in text:
                    text = text[: text.index(s)]
            n = len(self.tokens[i])
            self.results.append(
                GenerationResult(
                    text=text,
                    token_ids=self.tokens[i],
                    finish_reason=self.finish[i],
                    prompt_tokens=self.prompt_lens[i],
                    completion_tokens=n,
                    attended_mean=_mean(self.attended[i]),
                    dense_mean=_mean(self.dense[i]),
                    routing=self.routing[i] if self.return_routing else None,
                    grids=self.grids[i],
                )
            )


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


def check_temperature(temperature: float) -> None:
    """0 (greedy) or a positive temperature that stays positive in float32, where sampling
    divides the logits by it (1e-46 is 0 there, and the division NaN)."""
    if temperature < 0:
        raise InvalidRequest("temperature must be >= 0", param="temperature")
    if temperature > 0 and torch.tensor(temperature, dtype=torch.float32).item() == 0:
        raise InvalidRequest(
            f"temperature={temperature!r} is 0 in float32, where sampling divides by it; use 0 "
            "for greedy decoding or a larger temperature",
            param="temperature",
        )


def check_request(r: GenerationRequest) -> None:
    """The request's own settings (``InvalidRequest`` naming the first that is wrong)."""
    if r.max_new_tokens < 1:
        raise InvalidRequest("max_new_tokens must be >= 1", param="max_tokens")
    check_temperature(r.temperature)
    if not 0 < r.top_p <= 1:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")


def sample_token(
    row: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from the logits ``row`` at ``temperature`` (> 0) with nucleus ``top_p``."""
    # shift by the max first: with a tiny temperature the other logits then go to -inf
    # instead of the max going to inf (inf - inf = nan in the softmax)
    probs = torch.softmax((row - row.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
