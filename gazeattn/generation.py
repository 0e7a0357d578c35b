"""Generation requests and results, and the batch and streaming entry points over the one
engine that generates (``gazeattn.engine``: serving, evaluation and the MLflow model run it).

The gaze KV cache is a transformers ``DynamicCache`` that also keeps the gaze state: per
layer, the region descriptors computed once at prefill. A decode step then costs the routing
GEMV plus the gather of the selected regions (``gazeattn.ops.gaze.decode``), not a pass over
every visual key. ``GazeCache`` is that cache for transformers' own ``generate``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

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


MAX_TOP_LOGPROBS = 20


@dataclass(kw_only=True)
class SamplingParams:
    """How a request samples and when it stops: declared here once and checked by ``check``
    (the server maps OpenAI's fields onto it, the engine reads it).

    - ``temperature`` 0 is greedy; ``top_p`` the nucleus; ``seed`` makes sampling repeat;
    - ``stop`` strings end the answer and never reach it;
    - ``top_logprobs``: None for no logprobs, else how many alternatives per token (0-20);
    - ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]): subtracted from
      the logit of every token generated so far, once / once per occurrence;
    - ``logit_bias``: token id -> bias in [-100, 100], added to that token's logit.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def check(self, vocab_size: int) -> None:
        """``InvalidRequest`` naming (in OpenAI's terms) the first setting that is wrong."""
        if self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be >= 1", param="max_tokens")
        check_temperature(self.temperature)
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2]", param=name)
        for token, value in self.logit_bias.items():
            if not isinstance(token, int) or not 0 <= token < vocab_size:
                raise InvalidRequest(
                    f"logit_bias: {token!r} is not a token id of this model (0-{vocab_size - 1})",
                    param="logit_bias",
                )
            if not -100.0 <= value <= 100.0:
                raise InvalidRequest(
                    f"logit_bias: the bias of token {token} must be in [-100, 100]",
                    param="logit_bias",
                )


@dataclass(kw_only=True)
class GenerationRequest(SamplingParams):
    """One chat request. ``messages`` use {"type": "image"} / {"type": "video"} parts, matched in
    order with ``images`` (PIL or HWC uint8) and ``videos`` (lists of frames); how it samples
    is its ``SamplingParams``."""

    messages: list[dict]
    images: Sequence[Any] = ()
    videos: Sequence[Sequence[Any]] = ()


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
    # per generated token, when asked (gazeattn.sampler.TokenLogprob)
    logprobs: list | None = None
    cached_tokens: int = 0  # prompt tokens whose prefill came from the prefix cache


def generate_batch(
    model,
    processor: GazeProcessor,
    requests: Sequence[GenerationRequest],
    *,
    return_routing: bool = False,
    routing_layer: int = -1,
) -> list[GenerationResult]:
    """Generate for several requests at once: the serving engine (``gazeattn.engine``) with
    all of them in one batch, each prefilled alone and decoded together."""
    from gazeattn.engine import Engine

    if not requests:
        return []
    engine = Engine(
        model,
        processor,
        max_batch_size=len(requests),
        max_prefill_tokens=sys.maxsize,
        routing_layer=routing_layer,
    )
    return engine.run(requests, return_routing=return_routing)


def stream_generate(
    model,
    processor: GazeProcessor,
    request: GenerationRequest,
    *,
    return_routing: bool = False,
    routing_layer: int = -1,
) -> Iterator[str]:
    """Yield text deltas as tokens are generated (the serving engine's, for one request); the
    final GenerationResult is the return value.

    Text that could still become one of the request's stop strings is held back until it
    cannot, so a stop string never reaches the stream (as it never reaches the result).
    """
    from gazeattn.engine import Engine

    engine = Engine(model, processor, max_batch_size=1, routing_layer=routing_layer)
    engine.submit(request, return_routing=return_routing)
    while True:
        for out in engine.step():
            if out.error is not None:
                raise out.error
            if out.text:
                yield out.text
            if out.result is not None:
                return out.result


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
