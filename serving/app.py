"""The Ray Serve deployment: an OpenAI-compatible chat endpoint decoding with the gaze KV cache.

- ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
  ``GET /healthz`` (the only route without the API key).
- Concurrent non-streamed requests are batched by ``@serve.batch`` into one
  ``generate_batch`` call (left padding, one gaze cache; greedy batched equals
  one-by-one). A streamed request decodes alone, one step at a time, interleaved
  with the batches under the model lock.
- ``serve build``/``serve deploy`` entry: ``serving.app:build_app`` with the
  ``ServeSettings`` fields as ``args`` (``infra/serve_config.yaml``).
"""

import asyncio
import hmac
import json
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

from gazeattn import load_model
from gazeattn.generation import GenerationResult, generate_batch, stream_generate
from gazeattn.ops import GazeConfig
from gazeattn.processing import ProcessorInputError
from serving.errors import (
    BadRequest,
    RequestError,
    TooLarge,
    Unauthorized,
    Unprocessable,
    error_response,
)
from serving.requests import Prepared, prepare
from serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    GazeReport,
    ModelCard,
    ModelList,
    RoutedRegion,
    TokenRouting,
    Usage,
)
from serving.settings import GazeOverride, ServeSettings

# no /docs or /openapi.json: every route but /healthz is behind the API key
api = FastAPI(title="gazeattn", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return err.response()


@api.exception_handler(ProcessorInputError)
async def _processor_error(_: Request, err: ProcessorInputError) -> JSONResponse:
    return error_response(400, str(err), "invalid_request_error")


def usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
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
        raise Unprocessable.from_validation(err) from None


def gaze_config(path: Path, override: GazeOverride | None) -> GazeConfig | None:
    """The checkpoint's gaze config with the override's budget and backend, or None (as saved)."""
    if override is None:
        return None
    saved = json.loads((path / "config.json").read_text()).get("gaze_config")
    if saved is None:
        raise ValueError(f"{path} is not a gaze checkpoint; gaze overrides need one")
    return override.apply(GazeConfig.from_dict(saved))


# Serve pickles the class by value when it is decorated: everything it uses is defined above.
@serve.deployment(name="GazeChat", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class GazeChat:
    def __init__(self, settings: dict):
        from tracking.models import MLFLOW_SCHEMES, resolve_model

        self.settings = ServeSettings.model_validate(settings)
        path = resolve_model(self.settings.model).path
        self.model, self.processor = load_model(
            path, gaze=gaze_config(path, self.settings.gaze), device=self.settings.device
        )
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
        self.lock = threading.Lock()
        self.generate.set_max_batch_size(self.settings.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    # ---- routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self.authorize(request)
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self.authorize(request)
        body = parse_body(await read_body(request, self.settings.max_body_bytes))
        prepared = await asyncio.to_thread(
            prepare, body, self.settings, self.processor, self.model_name, self.num_layers
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self.stream(prepared, include_usage), media_type="text/event-stream"
            )
        outcome = await self.generate(prepared)
        if isinstance(outcome, Exception):
            raise outcome
        result, batch_size = outcome
        completion = ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=[
                Choice(
                    message=AssistantMessage(content=result.text),
                    finish_reason=result.finish_reason,
                )
            ],
            usage=usage(result),
            gaze=self.report(result, prepared) if prepared.gaze else None,
        )
        return JSONResponse(
            completion.model_dump(exclude_none=True),
            headers={"X-Batch-Size": str(batch_size)},
        )

    # ---- decoding

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, items: list[Prepared]) -> list:
        """Per request (GenerationResult, batch size), or the exception that request raised."""
        return await asyncio.to_thread(self.generate_sync, items)

    def generate_sync(self, items: list[Prepared]) -> list:
        """One generate_batch call per routing layer asked for (requests without gaze join any)."""
        groups: dict[int, list[int]] = {}
        plain = [i for i, item in enumerate(items) if not item.gaze]
        for i, item in enumerate(items):
            if item.gaze:
                groups.setdefault(item.layer % self.num_layers, []).append(i)
        if not groups:
            groups[self.settings.routing_layer % self.num_layers] = plain
        else:
            groups[next(iter(groups))] += plain
        outcomes: list = [None] * len(items)
        for layer, members in groups.items():
            requests = [items[i].generation for i in members]
            routing = any(items[i].gaze for i in members)
            try:
                with self.lock:
                    results = generate_batch(
                        self.model,
                        self.processor,
                        requests,
                        return_routing=routing,
                        routing_layer=layer,
                    )
            except ValueError:
                if len(members) == 1:
                    raise
                # find the request at fault: the others still get their answers
                for i in members:
                    outcomes[i] = self.generate_one(items[i], routing, layer)
                continue
            for i, result in zip(members, results, strict=True):
                outcomes[i] = (result, len(members))
        return outcomes

    def generate_one(self, item: Prepared, routing: bool, layer: int):
        try:
            with self.lock:
                (result,) = generate_batch(
                    self.model,
                    self.processor,
                    [item.generation],
                    return_routing=routing,
                    routing_layer=layer,
                )
            return result, 1
        except ValueError as err:
            return err

    async def stream(self, prepared: Prepared, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: Delta, finish=None, **extra) -> str:
            choices = [ChunkChoice(delta=delta, finish_reason=finish)] if delta else []
            body = ChatCompletionChunk(
                id=ident, created=created, model=self.model_name, choices=choices, **extra
            )
            return f"data: {json.dumps(body.model_dump(exclude_none=True))}\n\n"

        steps = stream_generate(
            self.model,
            self.processor,
            prepared.generation,
            return_routing=prepared.gaze,
            routing_layer=prepared.layer,
        )
        yield chunk(Delta(role="assistant", content=""))
        try:
            while True:
                done, value = await asyncio.to_thread(self.step, steps)
                if done:
                    break
                yield chunk(Delta(content=value))
        except ValueError as err:
            # the headers are sent: report the error as an event, as OpenAI does
            error = {"error": {"message": str(err), "type": "invalid_request_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        report = self.report(value, prepared) if prepared.gaze else None
        yield chunk(Delta(), finish=value.finish_reason, gaze=report)
        if include_usage:
            yield chunk(None, usage=usage(value))
        yield "data: [DONE]\n\n"

    def step(self, steps) -> tuple[bool, object]:
        """Advance a stream by one delta under the model lock: (False, text) or (True, result)."""
        with self.lock:
            try:
                return False, next(steps)
            except StopIteration as stop:
                return True, stop.value

    # ---- helpers

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")

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
            savings=0.0 if dense == 0 else 1.0 - result.attended_mean / dense,
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
