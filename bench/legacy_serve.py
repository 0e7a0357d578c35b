"""The serving app before continuous batching, kept as the benchmark's baseline (bench/serve.py).

Non-streamed requests that arrive together are grouped by ``@serve.batch`` into one
``generate_batch`` call, which runs until the longest ``max_tokens`` of the group, under a
lock; requests that arrive meanwhile wait for the whole group. (``generate_batch`` is now
the engine run on that group alone: what this baseline keeps is the grouping, not the old
decode loop.) Only ``POST /v1/chat/completions`` without streaming; request checks are the
current app's (``serving.requests.prepare``).

The benchmark asks every mode for exactly ``max_tokens`` tokens: the current app bans
the end-of-turn tokens through the request's ``logit_bias``; this app clears the
processor's stop tokens instead (the same decode work).
"""

# no `from __future__ import annotations`: FastAPI must see the Request annotation as a class
import asyncio
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from gazeattn import load_model
from gazeattn.generation import generate_batch
from serving.app import gaze_config, parse_body
from serving.requests import prepare
from serving.settings import ServeSettings

legacy_api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="LegacyChat", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(legacy_api)
class LegacyChat:
    def __init__(self, settings: dict, max_batch_size: int, batch_wait_timeout_s: float):
        from tracking.models import resolve_model

        self.settings = ServeSettings.model_validate(settings)
        path = resolve_model(self.settings.model).path
        self.model, self.processor = load_model(path, gaze=gaze_config(path, self.settings.gaze))
        self.model.eval()
        self.processor.stop_tokens = []
        self.model_name = self.settings.model_name or path.name
        self.num_layers = self.model.config.text_config.num_hidden_layers
        self.lock = threading.Lock()
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @legacy_api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> JSONResponse:
        body = parse_body(await request.body())
        # the legacy app takes no logit bias (see the module doc)
        body = body.model_copy(update={"logit_bias": None})
        prepared = await asyncio.to_thread(
            prepare, body, self.settings, self.processor, self.model_name, self.num_layers
        )
        result, size = await self.generate(prepared.generation)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                },
            },
            headers={"X-Batch-Size": str(size)},
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list) -> list:
        return await asyncio.to_thread(self._generate, requests)

    def _generate(self, requests: list) -> list:
        with self.lock:
            results = generate_batch(self.model, self.processor, requests)
        return [(r, len(requests)) for r in results]
