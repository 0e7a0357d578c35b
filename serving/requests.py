"""OpenAI chat request -> gazeattn GenerationRequest, with every limit checked.

Everything that can be wrong with a request is found here, before it joins a
batch, so one bad request never fails the others decoded with it.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
from dataclasses import dataclass

from gazeattn.generation import GenerationRequest, InvalidRequest, SamplingParams
from gazeattn.media_cache import MediaCache
from gazeattn.prefix_cache import CachedPrefixes, PrefixHold, visual_prefix
from gazeattn.processing import GazeProcessor, ProcessorInputError, SequenceTooLong
from gazeattn.sample import EncodedSample
from serving.errors import BadRequest, NotFound
from serving.images import PixelBudget, load_image
from serving.schemas import (
    NEUTRAL,
    ChatCompletionRequest,
    ImagePart,
    TextPart,
    VideoFramesPart,
)
from serving.settings import ServeSettings

MAX_STOP = 4


@dataclass(kw_only=True)
class Prepared:
    """A validated request: the engine's request, its encoded prompt and its options."""

    generation: GenerationRequest
    sample: EncodedSample | None = None  # processor.encode_sample of the prompt
    gaze: bool
    layer: int
    prompt_tokens: int
    user: str | None = None
    # the engine's hold on the prompt's cached prefix, where its pixel inputs were left out
    prefix_hold: PrefixHold | None = None
    # its images and videos found processed in the preparing process's media cache, and
    # processed (all of them where the process has no cache)
    media_hits: int = 0
    media_misses: int = 0

    def engine_options(self) -> dict:
        """The keyword arguments of ``gazeattn.engine.Engine.submit``."""
        return dict(
            sample=self.sample,
            return_routing=self.gaze,
            routing_layer=self.layer,
            prefix_hold=self.prefix_hold,
        )


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """A 400 naming the first field set to something this server does not do."""
    for name in type(body).model_fields:
        if name in NEUTRAL:
            _neutral(name, getattr(body, name), name)
    for i, message in enumerate(body.messages):
        for name in ("name", "tool_calls", "function_call", "refusal", "audio"):
            _neutral(name, getattr(message, name), f"messages.{i}.{name}")
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            urls = [part.image_url] if isinstance(part, ImagePart) else []
            urls += part.video_frames if isinstance(part, VideoFramesPart) else []
            for url in urls:
                _neutral("detail", url.detail, f"messages.{i}.content.{j}.detail")
    if body.stream_options is not None:
        if not body.stream:
            raise BadRequest("stream_options needs stream: true", param="stream_options")
        _neutral(
            "include_obfuscation",
            body.stream_options.include_obfuscation,
            "stream_options.include_obfuscation",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.gaze_layer is not None and not body.gaze:
        raise BadRequest("gaze_layer needs gaze: true", param="gaze_layer")
    given = {body.max_tokens, body.max_completion_tokens} - {None}
    if len(given) > 1:
        raise BadRequest(
            "max_tokens and max_completion_tokens differ; give one", param="max_completion_tokens"
        )


def _neutral(name: str, value, param: str) -> None:
    if value not in NEUTRAL[name]:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise BadRequest(
            f"{param}={shown} is not supported by this server (accepted: "
            f"{', '.join(repr(v) for v in NEUTRAL[name])})",
            param=param,
            code="unsupported_parameter",
        )


def logit_bias(body: ChatCompletionRequest) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON strings) with int keys; ``SamplingParams.check``
    checks the ids and values."""
    out = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise BadRequest(f"logit_bias key {key[:20]!r} is not a token id", param="logit_bias")
        out[int(key)] = float(value)
    return out


def sampling(body: ChatCompletionRequest, max_new: int, vocab: int) -> SamplingParams:
    """The request's sampling settings, checked (a 400 naming the field)."""
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=logit_bias(body),
    )
    try:
        params.check(vocab)
    except InvalidRequest as err:
        raise BadRequest(str(err), param=err.param) from None
    return params


def check_options(body: ChatCompletionRequest, settings: ServeSettings, model_name: str) -> int:
    """Checks that need no decoding; returns the number of new tokens to generate."""
    if body.model != model_name:
        raise NotFound(
            f"the model {body.model!r} is not served here (this server has {model_name!r})",
            param="model",
            code="model_not_found",
        )
    if body.n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    refuse_unsupported(body)
    stops = body.stop_list()
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise BadRequest(f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    default = min(settings.default_max_tokens, settings.max_tokens_limit)
    max_new = body.max_completion_tokens or body.max_tokens or default
    if max_new > settings.max_tokens_limit:
        raise BadRequest(
            f"max_tokens={max_new} exceeds this server's limit of {settings.max_tokens_limit}",
            param="max_tokens",
        )
    n_media = sum(
        1 if isinstance(part, ImagePart) else len(part.video_frames)
        for message in body.messages
        if isinstance(message.content, list)
        for part in message.content
        if not isinstance(part, TextPart)
    )
    if n_media > settings.max_images:
        raise BadRequest(
            f"{n_media} images and video frames exceed the limit of {settings.max_images}",
            param="messages",
            code="too_many_images",
        )
    return max_new


def prepare(
    body: ChatCompletionRequest,
    settings: ServeSettings,
    processor: GazeProcessor,
    model_name: str,
    num_layers: int,
    cached: CachedPrefixes | None = None,
) -> Prepared:
    """Validate, decode the images and count the prompt tokens (CPU work: run it off the loop).
    A prompt whose visual prefix is among the engine's ``cached`` prefixes comes without its
    pixel inputs (``EncodedSample.without_pixels``): its prefill reads none of them."""
    max_new = check_options(body, settings, model_name)
    params = sampling(body, max_new, len(processor.tokenizer))
    layer = settings.routing_layer if body.gaze_layer is None else body.gaze_layer
    if not -num_layers <= layer < num_layers:
        raise BadRequest(
            f"gaze_layer={layer} is not a layer of this model ({num_layers} layers)",
            param="gaze_layer",
        )
    messages, images, videos = [], [], []
    budget = PixelBudget(settings.max_request_pixels)
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, list):
            content = [
                _part(
                    part, images, videos, settings, budget, f"messages.{i}.content.{j}", processor
                )
                for j, part in enumerate(content)
            ]
        messages.append({"role": role, "content": content or ""})
    generation = GenerationRequest(messages=messages, images=images, videos=videos, **vars(params))
    limit = settings.max_prompt_tokens or processor.max_length
    media = processor.media_cache
    seen = (media.stats.hits, media.stats.misses) if media is not None else (0, 0)
    try:
        sample = processor.encode_sample(
            messages, images=images, videos=videos, add_generation_prompt=True
        )
    except SequenceTooLong as err:
        raise BadRequest(str(err), param="messages", code="context_length_exceeded") from None
    except ProcessorInputError as err:
        raise BadRequest(str(err), param="messages") from None
    # the engine decodes the encoded sample: the full-resolution images go now, not when the
    # request ends
    generation.images, generation.videos = [], []
    prompt_tokens = len(sample)
    if prompt_tokens > limit:
        raise BadRequest(
            f"the prompt has {prompt_tokens} tokens, more than this server's limit of {limit}",
            param="messages",
            code="context_length_exceeded",
        )
    context = processor.max_length
    if prompt_tokens + max_new > context:
        raise BadRequest(
            f"{prompt_tokens} prompt tokens + max_tokens={max_new} exceed the model's context "
            f"of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if settings.prefix_cache_bytes:
        # the prefix's content key, hashed here (a preparing process), not on the scheduler
        _, digest = visual_prefix(sample, processor)
        if cached is not None and digest in cached:
            sample = sample.without_pixels(processor.rules.pixel_names)
    hits, misses = (
        (media.stats.hits - seen[0], media.stats.misses - seen[1])
        if media is not None
        else (0, len(images) + len(videos))
    )
    return Prepared(
        generation=generation,
        sample=sample,
        gaze=body.gaze,
        layer=layer,
        prompt_tokens=prompt_tokens,
        media_hits=hits,
        media_misses=misses,
        user=body.user or body.safety_identifier,
    )


def _part(
    part,
    images: list,
    videos: list,
    settings: ServeSettings,
    budget: PixelBudget,
    where: str,
    processor: GazeProcessor,
) -> dict:
    """One content part; each image (each video) is shrunk to the size its encoding takes as
    soon as it is decoded, so a request holds its originals one at a time."""
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    options = dict(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        allowed_prefixes=settings.allowed_image_url_prefixes,
        timeout_s=settings.image_fetch_timeout_s,
        allow_private=settings.allow_private_image_hosts,
        budget=budget,
    )
    if isinstance(part, ImagePart):
        image = load_image(part.image_url.url, param=f"{where}.image_url", **options)
        images.append(processor.fit_image(image))
        return {"type": "image"}
    assert isinstance(part, VideoFramesPart)
    frames = [
        load_image(frame.url, param=f"{where}.video_frames.{k}", **options)
        for k, frame in enumerate(part.video_frames)
    ]
    videos.append(processor.fit_video(frames))
    return {"type": "video"}


class Preparer:
    """``prepare`` in ``workers`` spawned processes, each with its own copy of the processor.

    Encoding a long conversation or decoding large images is CPU work in Python that holds
    the GIL: in the replica's process it starved the decode loop (22 -> 0.3 steps/s while a
    400-turn prompt was encoded). In other processes it cannot; and the pool bounds how many
    requests are prepared at once. A worker that dies (out of memory) fails the requests it
    held and the pool is started again. Each worker keeps the images and videos it processed
    (``settings.media_cache_bytes``, ``gazeattn.media_cache``): a request about a picture or
    video seen before skips their processing and the hash of their pixels. A request whose
    visual prefix the engine has cached comes back without its pixel inputs (``prepare``'s
    ``cached``).

    Every worker is started with the pool, not when requests first find none idle
    (what ``ProcessPoolExecutor`` does with spawned processes): a worker's start imports torch
    and transformers and loads the processor, seconds of CPU that otherwise fell on the
    replica's first burst of concurrent requests, beside its decode loop. ``pids``: the first
    pool's workers (a pool started again after a worker died is not waited for).
    """

    def __init__(
        self,
        settings: ServeSettings,
        processor: GazeProcessor,
        model_name: str,
        num_layers: int,
        workers: int,
    ):
        self._args = (settings, processor, model_name, num_layers)
        self._workers = workers
        self._lock = threading.Lock()
        self._pool, started = self._start()
        self.pids = [future.result(timeout=STARTUP_TIMEOUT_S) for future in started]

    def _start(
        self,
    ) -> tuple[concurrent.futures.ProcessPoolExecutor, list[concurrent.futures.Future]]:
        """A new pool and a future per worker, done (its pid) once every worker has started."""
        context = multiprocessing.get_context("spawn")
        # each start task waits for the others: one per worker, so all of them spawn now
        started = context.Barrier(self._workers)
        pool = concurrent.futures.ProcessPoolExecutor(
            self._workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(*self._args, started),
        )
        return pool, [pool.submit(_started) for _ in range(self._workers)]

    def submit(
        self, body: ChatCompletionRequest, cached: CachedPrefixes | None = None
    ) -> concurrent.futures.Future:
        """``prepare(body, ..., cached)`` in a worker; its future."""
        with self._lock:
            try:
                return self._pool.submit(_prepare_in_worker, body, cached)
            except concurrent.futures.process.BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool, _ = self._start()  # not waited for: this is the event loop
                return self._pool.submit(_prepare_in_worker, body, cached)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_WORKER: tuple | None = None  # a Preparer worker's (settings, processor, model, layers)
_STARTED = None  # the Barrier of its pool's workers' start
STARTUP_TIMEOUT_S = 600  # for every worker of a pool to start (imports, the processor)


def _init_worker(
    settings: ServeSettings,
    processor: GazeProcessor,
    model_name: str,
    num_layers: int,
    started=None,
) -> None:
    global _WORKER, _STARTED
    if settings.media_cache_bytes:
        processor.media_cache = MediaCache(settings.media_cache_bytes)
    _WORKER = (settings, processor, model_name, num_layers)
    _STARTED = started


def _started() -> int:
    """A worker's start task: returns its pid once every worker of the pool has started."""
    _STARTED.wait(timeout=STARTUP_TIMEOUT_S)
    return os.getpid()


def _prepare_in_worker(
    body: ChatCompletionRequest, cached: CachedPrefixes | None = None
) -> Prepared:
    return prepare(body, *_WORKER, cached)
