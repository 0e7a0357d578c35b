"""The Ray Serve deployment: an OpenAI-compatible chat endpoint with continuous batching.

- ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
  ``GET /healthz`` (the only route without the API key; it also reports the replica's
  running and waiting requests).
- Each replica runs one scheduler thread that owns the model (``gazeattn.engine.Engine``
  through ``serving.scheduler``): every decode step runs all of the replica's active
  requests together, streamed and non-streamed alike; new requests are prefilled (a bounded
  number of prompt tokens per step) and join at the next step; finished ones leave at once.
  The event loop only parses, submits and relays. A client that disconnects cancels its
  request and frees its slot.
- Over ``max_pending`` requests in a replica, a request gets 429 with ``Retry-After``.
- Every error is in OpenAI's format; 5xx only for faults of the server, logged with the
  request id that every response carries as ``X-Request-Id``.
- Metrics: ``serving.metrics`` (Prometheus, on Ray's metrics endpoint).
- ``serve build``/``serve deploy`` entry: ``serving.app:build_app`` with the
  ``ServeSettings`` fields as ``args`` (``infra/serve_config.yaml``).
"""

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from gazeattn import load_model
from gazeattn.engine import Engine, StepOutput
from gazeattn.generation import GenerationResult, InvalidRequest
from gazeattn.ops import GazeConfig, kv_savings
from gazeattn.processing import ProcessorInputError
from gazeattn.sampler import TokenLogprob
from serving.errors import (
    BadRequest,
    InvalidBody,
    RequestError,
    ServerError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    error_response,
)
from serving.metrics import ServeMetrics
from serving.requests import Prepared, Preparer
from serving.scheduler import RequestStream, Scheduler
from serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    GazeReport,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    RoutedRegion,
    TokenRouting,
    TopLogprob,
    Usage,
)
from serving.schemas import TokenLogprob as LogprobOut
from serving.settings import GazeOverride, ServeSettings, placement

logger = logging.getLogger("ray.serve")

# no /docs or /openapi.json: every route but /healthz is behind the API key
api = FastAPI(title="gazeattn", docs_url=None, redoc_url=None, openapi_url=None)


def request_id(request: Request) -> str:
    """The request's id: Serve's (its proxy sets ``X-Request-Id`` on the request, taking the
    client's when given, and returns it on the response; its replica logs carry it)."""
    if not hasattr(request.state, "request_id"):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return request.state.request_id


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return err.response(request_id(request), echo=_echo(request))


@api.exception_handler(ProcessorInputError)
async def _processor_error(request: Request, err: ProcessorInputError) -> JSONResponse:
    return BadRequest(str(err)).response(request_id(request), echo=_echo(request))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    # unknown routes (404) and methods (405), in OpenAI's format too
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    headers = dict(err.headers or {})
    if _echo(request):
        headers["X-Request-Id"] = request_id(request)
    return error_response(err.status_code, str(err.detail), kind, headers=headers)


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    rid = request_id(request)
    logger.error("request %s failed", rid, exc_info=err)
    return ServerError(f"internal server error (request id {rid})").response(
        rid, echo=_echo(request)
    )


def client_error(err: BaseException) -> RequestError | None:
    """The 4xx an exception is, or None for a fault of the server (a 5xx with the request id).

    Only errors that name what is wrong with the request are the client's: an internal
    ``ValueError`` (an inconsistent batch, a library's check) is the server's.
    """
    if isinstance(err, RequestError):
        return None if isinstance(err, ServerError) else err
    if isinstance(err, InvalidRequest):
        return BadRequest(str(err), param=err.param)
    if isinstance(err, ProcessorInputError):
        return BadRequest(str(err), param="messages")
    return None


def _echo(request: Request) -> bool:
    """Whether the response must carry the request id itself (Serve adds it when it set it)."""
    return request.headers.get("x-request-id") is None


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(piece)
    return b"".join(chunks)


def parse_body(raw: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    # "\ud800" alone is valid JSON but not text: the tokenizer would fail on it (a 500)
    if b"\\ud" in raw.lower():
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise BadRequest(
                "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
            ) from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        # a field this server does not know is refused by name (never silently ignored)
        extra = [e for e in err.errors() if e["type"] == "extra_forbidden"]
        if extra:
            where = ".".join(str(p) for p in _data_path(data, extra[0]["loc"]))
            raise BadRequest(
                f"unknown field {where!r}: not part of the chat completions API served here",
                param=where,
                code="unknown_parameter",
            ) from None
        raise InvalidBody.from_validation(err) from None


def _data_path(data, loc: tuple) -> list:
    """A validation error's location as a path into the body: pydantic's union member and
    tag labels (``list[tagged-union[...]]``, the part type) are not keys of the data."""
    path, node = [], data
    for item in loc:
        if isinstance(node, list) and isinstance(item, int) and item < len(node):
            path.append(item)
            node = node[item]
        elif isinstance(node, dict) and item in node:
            path.append(item)
            node = node[item]
    return path or list(loc)


def gaze_config(path: Path, override: GazeOverride | None) -> GazeConfig | None:
    """The checkpoint's gaze config with the override's budget and backend, or None (as saved)."""
    if override is None:
        return None
    saved = json.loads((path / "config.json").read_text()).get("gaze_config")
    if saved is None:
        raise ValueError(f"{path} is not a gaze checkpoint; gaze overrides need one")
    return override.apply(GazeConfig.from_dict(saved))


def _error_event(err: Exception, rid: str) -> str:
    client = client_error(err)
    if client is not None:
        body = {
            "message": client.message,
            "type": client.type,
            "param": client.param,
            "code": client.code,
        }
    else:
        logger.error("request %s failed in decoding", rid, exc_info=err)
        body = {
            "message": f"internal server error (request id {rid})",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    return f"data: {json.dumps({'error': body})}\n\n"


# Serve pickles the class by value when it is decorated: everything it uses is defined above.
@serve.deployment(name="GazeChat", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class GazeChat:
    def __init__(self, settings: dict):
        from tracking.models import MLFLOW_SCHEMES, resolve_model

        self.settings = ServeSettings.model_validate(settings)
        path = resolve_model(self.settings.model).path
        device, dtype = placement(self.settings.device, self.settings.dtype, path)
        self.model, self.processor = load_model(
            path, gaze=gaze_config(path, self.settings.gaze), device=device, dtype=dtype
        )
        logger.info("serving %s on %s in %s", path, device, dtype)
        self.model.eval()
        # an MLflow model is named by its URI, a directory by its name
        mlflow_uri = self.settings.model.startswith(MLFLOW_SCHEMES)
        self.model_name = self.settings.model_name or (
            self.settings.model if mlflow_uri else path.name
        )
        self.num_layers = self.model.config.text_config.num_hidden_layers
        self.eos_id = self.processor.tokenizer.eos_token_id
        # read here, in the replica, so the key never travels in the application's config
        self.api_key = os.environ.get(self.settings.api_key_env) or None
        self.created = int(time.time())
        self.metrics = ServeMetrics()
        self.engine = Engine(
            self.model,
            self.processor,
            max_batch_size=self.settings.max_batch_size,
            max_prefill_tokens=self.settings.max_prefill_tokens,
            chunked_prefill=self.settings.chunked_prefill,
            routing_layer=self.settings.routing_layer,
            prefix_cache_bytes=self.settings.prefix_cache_bytes,
        )
        self.scheduler = Scheduler(self.engine, on_step=self.metrics.engine)
        # requests are validated (images decoded, prompt encoded) in a bounded pool of other
        # processes, so that preparation never holds the decode loop's GIL
        self.preparer = Preparer(
            self.settings,
            self.processor,
            self.model_name,
            self.num_layers,
            workers=self.settings.prepare_workers,
        )
        # preparations queued or running (counted until they end, even if their client left)
        self.preparing = 0
        self._preparing_lock = threading.Lock()
        if self.api_key is None:
            logger.warning(
                "no API key: $%s is unset or empty, so every route of this replica is open to "
                "anyone who can reach it; set the variable (a Kubernetes secret) to require "
                "Authorization: Bearer <key>",
                self.settings.api_key_env,
            )

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()
        preparer = getattr(self, "preparer", None)
        if preparer is not None:
            preparer.close()

    def check_health(self) -> None:
        """Serve's health check: a replica whose scheduler loop died is unhealthy (Serve then
        replaces it) instead of taking requests that would hang."""
        if not self.scheduler.alive:
            raise RuntimeError(f"the scheduler loop is dead: {self.scheduler.failure!r}")

    # ---- routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        alive = self.scheduler.alive
        body = {
            "status": "ok" if alive else "scheduler loop dead",
            "model": self.model_name,
            "running": self.engine.num_running,
            "waiting": self.engine.num_waiting,
            "pending": self.pending,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @property
    def pending(self) -> int:
        """Requests in this replica: being validated, waiting for prefill, or decoding."""
        return self.preparing + self.engine.num_waiting + self.engine.num_running

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self.authorize(request)
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        arrived = time.perf_counter()
        rid = request_id(request)
        try:
            self.authorize(request)
            body = parse_body(await read_body(request, self.settings.max_body_bytes))
            if self.pending >= self.settings.max_pending:
                raise TooManyRequests(
                    f"this replica has {self.pending} requests in progress (the limit is "
                    f"{self.settings.max_pending}); retry later",
                    code="rate_limit_exceeded",
                )
        except RequestError as err:
            self.metrics.outcome("rejected" if isinstance(err, TooManyRequests) else "client_error")
            raise
        try:
            prepared = await self.prepare(body)
            if prepared.user:
                logger.info("request %s from user %r", rid, prepared.user[:64])
            stream = self.scheduler.submit(prepared)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = self.events(stream, prepared, rid, include_usage, body.logprobs, arrived)
                return StreamingResponse(
                    events, media_type="text/event-stream", headers=self.id_header(request)
                )
            response = await self.complete(stream, prepared, body.logprobs, arrived)
            response.headers.update(self.id_header(request))
            return response
        except asyncio.CancelledError:
            self.metrics.outcome("cancelled")
            raise
        except Exception as err:
            client = client_error(err)
            if client is not None:
                self.metrics.outcome("client_error")
                raise client from None
            self.metrics.outcome("server_error")
            logger.error("request %s failed", rid, exc_info=err)
            raise ServerError(f"internal server error (request id {rid})") from None

    async def prepare(self, body: ChatCompletionRequest) -> Prepared:
        """``serving.requests.prepare`` in the replica's preparer. A prompt whose visual
        prefix the engine has cached comes back without its pixel inputs (a long video's are
        tens of MB through the preparer's pipe, which its prefill never reads) and holds the
        prefix's entry until its prefill; one whose entry was evicted in the meantime is
        prepared again with them. The request counts as pending from now until its
        preparation ends: a client that leaves meanwhile cancels only its wait (a preparation
        that has not started is dropped at once)."""
        prepared = await self._prepare(body, self.engine.cached_prefixes())
        if prepared.sample.pixels_dropped:
            self.metrics.pixels_skipped.inc()
            prepared.prefix_hold = self.engine.hold_prefix(prepared.sample)
            if prepared.prefix_hold is None:
                self.metrics.prepared_again.inc()
                prepared = await self._prepare(body, None)
        return prepared

    async def _prepare(self, body: ChatCompletionRequest, cached) -> Prepared:
        with self._preparing_lock:
            self.preparing += 1
        try:
            future = self.preparer.submit(body, cached)
        except BaseException:
            self._prepared(None)
            raise
        future.add_done_callback(self._prepared)
        prepared = await asyncio.wrap_future(future)
        self.metrics.media(hits=prepared.media_hits, misses=prepared.media_misses)
        return prepared

    def _prepared(self, _future) -> None:
        with self._preparing_lock:
            self.preparing -= 1

    # ---- decoding

    async def outputs(self, stream: RequestStream, arrived: float) -> AsyncIterator[StepOutput]:
        """The request's outputs with its latency metrics; cancels it if the reader leaves."""
        start = last = arrived
        first = True
        try:
            async for out in stream:
                if out.token_ids:
                    now = time.perf_counter()
                    if first:
                        self.metrics.ttft.observe(now - start)
                    else:
                        self.metrics.itl.observe(now - last)
                    first, last = False, now
                if out.result is not None:
                    seq = out.sequence
                    self.metrics.finished(
                        prompt=seq.prompt_tokens,
                        cached=seq.cached_tokens,
                        generated=out.result.completion_tokens,
                        attended=sum(seq.attended),
                        dense=sum(seq.dense),
                    )
                yield out
        finally:
            if not stream.finished:
                self.scheduler.cancel(stream)

    async def complete(
        self, stream: RequestStream, prepared: Prepared, logprobs: bool | None, arrived: float
    ) -> JSONResponse:
        result = None
        async for out in self.outputs(stream, arrived):
            if out.error is not None:
                raise out.error
            result = out.result or result
        self.metrics.outcome("ok")
        completion = ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[
                Choice(
                    message=AssistantMessage(content=result.text),
                    finish_reason=result.finish_reason,
                    logprobs=self.logprobs(result.logprobs) if logprobs else None,
                )
            ],
            usage=usage(result),
            gaze=self.report(result, prepared) if prepared.gaze else None,
        )
        headers = {"X-Batch-Size": str(stream.sequence.peak_batch)}
        return JSONResponse(completion.model_dump(exclude_none=True), headers=headers)

    async def events(
        self,
        stream: RequestStream,
        prepared: Prepared,
        rid: str,
        include_usage: bool,
        logprobs: bool | None,
        arrived: float,
    ) -> AsyncIterator[str]:
        """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: Delta | None, finish=None, entries=None, **extra) -> str:
            choices = []
            if delta is not None:
                choice_logprobs = self.logprobs(entries) if logprobs and entries else None
                choices = [ChunkChoice(delta=delta, finish_reason=finish, logprobs=choice_logprobs)]
            body = ChatCompletionChunk(
                id=ident,
                created=created,
                model=self.model_name,
                choices=choices,
                **extra,
            )
            return f"data: {json.dumps(body.model_dump(exclude_none=True))}\n\n"

        try:
            yield chunk(Delta(role="assistant", content=""))
            async for out in self.outputs(stream, arrived):
                if out.error is not None:
                    # the headers are sent: report the error as an event, as OpenAI does
                    client = client_error(out.error) is not None
                    self.metrics.outcome("client_error" if client else "server_error")
                    yield _error_event(out.error, rid)
                    return
                if out.text or out.logprobs:
                    yield chunk(Delta(content=out.text), entries=out.logprobs)
                if out.result is not None:
                    result = out.result
                    report = self.report(result, prepared) if prepared.gaze else None
                    yield chunk(Delta(), finish=result.finish_reason, gaze=report)
                    if include_usage:
                        yield chunk(None, usage=usage(result))
                    yield "data: [DONE]\n\n"
                    self.metrics.outcome("ok")
        except Exception as err:
            self.metrics.outcome("server_error")
            logger.error("request %s failed while streaming", rid, exc_info=err)
            yield _error_event(err, rid)
        finally:
            # the client went away (the stream was closed or cancelled): free the slot now
            if not stream.finished:
                self.scheduler.cancel(stream)
                self.metrics.outcome("cancelled")

    # ---- helpers

    @staticmethod
    def id_header(request: Request) -> dict[str, str]:
        return {"X-Request-Id": request_id(request)} if _echo(request) else {}

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")

    def logprobs(self, entries: list[TokenLogprob] | None) -> ChoiceLogprobs:
        def piece(token_id: int) -> tuple[str, list[int]]:
            text = self.processor.tokenizer.decode([token_id])
            return text, list(text.encode("utf-8"))

        content = []
        for entry in entries or []:
            token, raw = piece(entry.token_id)
            top = []
            for token_id, value in entry.top:
                alt, alt_raw = piece(token_id)
                top.append(TopLogprob(token=alt, logprob=value, bytes=alt_raw))
            content.append(
                LogprobOut(token=token, logprob=entry.logprob, bytes=raw, top_logprobs=top)
            )
        return ChoiceLogprobs(content=content)

    def report(self, result: GenerationResult, prepared: Prepared) -> GazeReport:
        routing = result.routing or []
        # the step that chose the end-of-turn token was routed too
        ids = list(result.token_ids) + [self.eos_id] * max(0, len(routing) - len(result.token_ids))
        dense = result.dense_mean
        return GazeReport(
            layer=prepared.layer % self.num_layers,
            grids=result.grids,
            visual_entries_attended=result.attended_mean,
            visual_entries_dense=dense,
            savings=kv_savings(result.attended_mean, dense),
            tokens=[
                TokenRouting(token_id=tok, regions=[RoutedRegion(**r) for r in regions])
                for tok, regions in zip(ids, routing, strict=False)
            ],
        )


def build_app(args: dict) -> Application:
    """Application builder for ``serve run/build serving.app:build_app model=DIR ...``."""
    settings = ServeSettings.model_validate(args)
    return GazeChat.bind(settings.model_dump())


def app(settings: ServeSettings, **deployment_options) -> Application:
    """The application with deployment options (autoscaling, actor options) set in code."""
    deployment = GazeChat.options(**deployment_options) if deployment_options else GazeChat
    return deployment.bind(settings.model_dump())
