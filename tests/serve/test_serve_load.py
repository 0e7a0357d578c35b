"""Overload, disconnects, server faults and metrics, on a real Ray Serve on 127.0.0.1.

Bounded: at most 8 concurrent clients, every generation capped (max_tokens), every wait
with a timeout. Long generations are forced with ``logit_bias`` (one ordinary token at
+100), so a request decodes for as many steps as asked.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gazeattn.model import load_model
from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_tiny
from serving.settings import ServeSettings
from tests.serve.harness import (
    data_url,
    http_server,
    image_bytes,
    image_part,
    local_serve,
    user,
)
from tests.servers import free_port, wait_for

pytestmark = pytest.mark.ray

MODEL = "gaze-load"
LONG = 400
FORCED: dict[str, float] = {}  # logit_bias: one word made certain (set by the fixture)
# a stream that, if nobody cancelled it, would run for many seconds after its client left
ENDLESS = 4000


SLOW_FETCH_S = 4.0
CHUNK = 16  # max_prefill_tokens of the "chunked" app


class _SlowImage(BaseHTTPRequestHandler):
    """An image host that answers after ``SLOW_FETCH_S``: a preparation that takes time."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        time.sleep(SLOW_FETCH_S)
        body = image_bytes(0)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def slow_host():
    with http_server(_SlowImage) as url:
        yield url


@pytest.fixture(scope="module")
def served(tmp_path_factory, slow_host):
    from ray import serve

    from serving.app import app

    model_dir = build_tiny(tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(keep_ratio=0.3))
    # the same model with one output row NaN: sampling from it fails inside decoding
    model, processor = load_model(model_dir)
    # a whole word, so that every step streams text (a lone byte would wait for the next)
    word = processor.tokenizer.encode(" red", add_special_tokens=False)[0]
    FORCED[str(word)] = 100
    with torch.no_grad():
        model.lm_head.weight[word] = float("nan")
    broken_dir = tmp_path_factory.mktemp("broken")
    model.save_pretrained(broken_dir)
    processor.save_pretrained(broken_dir)
    settings = ServeSettings(
        model=str(model_dir),
        model_name=MODEL,
        max_batch_size=2,
        max_pending=3,
        max_tokens_limit=ENDLESS,
    )
    options = dict(num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
    metrics_port = free_port()
    with local_serve(metrics_port=metrics_port) as url:
        serve.run(app(settings, **options), name="load", route_prefix="/")
        broken = settings.model_copy(update={"model": str(broken_dir)})
        serve.run(app(broken, **options), name="broken", route_prefix="/broken")
        # one request at a time, prepared in one thread, its images on a slow host
        slow = settings.model_copy(
            update=dict(
                max_pending=1,
                prepare_workers=1,
                allowed_image_url_prefixes=[slow_host],
                allow_private_image_hosts=True,
            )
        )
        serve.run(app(slow, **options), name="slow", route_prefix="/slow")
        # a prefill budget of a few tokens: a video prompt prefills in many chunks
        chunked = settings.model_copy(update=dict(max_prefill_tokens=CHUNK, max_pending=4))
        serve.run(app(chunked, **options), name="chunked", route_prefix="/chunked")
        yield url, f"http://127.0.0.1:{metrics_port}/metrics"


def body(max_tokens: int = 6, **kw) -> dict:
    return {"model": MODEL, "messages": user(), "max_tokens": max_tokens, "temperature": 0, **kw}


def health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=30).json()


def test_over_the_queue_limit_is_429_with_retry_after(served):
    url, _ = served

    def ask(_):
        payload = body(LONG, logit_bias=FORCED)
        return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.headers["x-request-id"]
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and "limit is 3" in error["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == LONG
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    # ten at once against a limit of three (fewer could arrive spread out enough, on a busy
    # machine, that none was refused)
    with ThreadPoolExecutor(10) as pool:
        futures = [
            pool.submit(
                client.chat.completions.create,
                model=MODEL,
                messages=user(),
                max_tokens=LONG,
                logit_bias=FORCED,
            )
            for _ in range(10)
        ]
        errors = [f.exception() for f in futures]
    assert any(isinstance(e, openai.RateLimitError) for e in errors), errors
    assert wait_for(lambda: health(url)["pending"] == 0, timeout=60)


def test_a_disconnect_mid_stream_frees_the_slot_and_spares_the_others(served):
    url, metrics_url = served
    witness = body(24, messages=user(image_part(data_url(image_bytes(3)))))

    def ask():
        return httpx.post(f"{url}/v1/chat/completions", json=witness, timeout=120)

    alone = ask().json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json=body(ENDLESS, logit_bias=FORCED, stream=True),
            timeout=60,
        ) as stream:
            lines = stream.iter_lines()
            received = [next(lines) for _ in range(6)]
            # another request joins the batch the stream is decoding in
            other = pool.submit(ask).result()
        # leaving the block closed the connection mid-stream
        left = time.monotonic()
    assert sum(line.startswith("data: {") for line in received) >= 3
    assert other.headers["x-batch-size"] == "2"
    assert other.json()["choices"][0]["message"]["content"] == alone
    # freed at once, not after the thousands of steps the stream had left
    assert wait_for(lambda: health(url)["running"] == 0, timeout=8, interval=0.1)
    assert time.monotonic() - left < 8
    cancelled = 'status="cancelled"'
    assert wait_for(
        lambda: (_metric(metrics_url, "gazeattn_requests_total", cancelled) or 0) > 0, 30
    )
    after = ask()
    assert after.headers["x-batch-size"] == "1"
    assert after.json()["choices"][0]["message"]["content"] == alone


def test_a_client_that_leaves_during_preparation_still_holds_its_place(served, slow_host):
    """Its preparation runs on after it left: it counts against max_pending until it ends,
    so leaving clients cannot start more preparations than the limit."""
    url, _ = served
    slow = f"{url}/slow"
    fetching = body(2, messages=user(image_part(f"{slow_host}/image.png")))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow}/v1/chat/completions", json=fetching, timeout=1.0)
    assert health(slow)["pending"] == 1
    refused = httpx.post(f"{slow}/v1/chat/completions", json=body(2), timeout=30)
    assert refused.status_code == 429, refused.text
    assert wait_for(lambda: health(slow)["pending"] == 0, timeout=30, interval=0.2)
    assert httpx.post(f"{slow}/v1/chat/completions", json=body(2), timeout=30).status_code == 200


def test_server_faults_are_500s_in_openai_format_with_a_request_id(served):
    url, _ = served
    sampled = body(4, temperature=1.0, seed=1) | {"logit_bias": None}
    response = httpx.post(f"{url}/broken/v1/chat/completions", json=sampled, timeout=60)
    assert response.status_code == 500
    rid = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["type"] == "server_error" and rid in error["message"]
    with httpx.stream(
        "POST", f"{url}/broken/v1/chat/completions", json=sampled | {"stream": True}, timeout=60
    ) as stream:
        assert stream.status_code == 200
        events = [
            json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")
        ]
    assert events[-1]["error"]["type"] == "server_error"
    # a client error on the same replica stays a 4xx
    bad = httpx.post(f"{url}/broken/v1/chat/completions", json=body(0), timeout=60)
    assert bad.status_code == 400 and bad.headers["x-request-id"]
    # unknown routes and methods answer in the same format
    missing = httpx.get(f"{url}/v1/nothing-here", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wait_for(lambda: _logged(rid), timeout=30), f"request id {rid} not in the replica logs"


def test_metrics_are_on_the_ray_metrics_endpoint(served):
    url, metrics_url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
    image = user(image_part(data_url(image_bytes(5))))
    for stream in (False, True):
        out = client.chat.completions.create(
            model=MODEL, messages=image, max_tokens=5, temperature=0, stream=stream
        )
        if stream:
            list(out)
    names = [
        ("gazeattn_requests_total", 'status="ok"'),
        ("gazeattn_queue_length", "replica="),
        ("gazeattn_running_batch_size", "replica="),
        ("gazeattn_time_to_first_token_seconds_bucket", "le="),
        ("gazeattn_inter_token_latency_seconds_bucket", "le="),
        ("gazeattn_generated_tokens_total", "deployment="),
        ("gazeattn_prompt_tokens_total", "deployment="),
        ("gazeattn_visual_entries_attended_total", "deployment="),
        ("gazeattn_visual_entries_dense_total", "deployment="),
        # the second request's image is the first's: its prefix came from the prefix cache
        ("gazeattn_prefix_cache_tokens_total", "deployment="),
        ("gazeattn_prefix_cache_hit_rate", "replica="),
        ("gazeattn_prefix_cache_bytes", "replica="),
        ("gazeattn_prefix_cache_entries", "replica="),
        # the first request's image was processed in a preparing process
        ("gazeattn_media_cache_misses_total", "deployment="),
    ]
    for name, label in names:
        found = wait_for(lambda n=name, t=label: _metric(metrics_url, n, t) is not None, 30)
        assert found, name
    attended = _metric(metrics_url, "gazeattn_visual_entries_attended_total", "")
    dense = _metric(metrics_url, "gazeattn_visual_entries_dense_total", "")
    assert 0 < attended < dense
    assert _metric(metrics_url, "gazeattn_prefix_cache_tokens_total", "") > 0
    assert _metric(metrics_url, "gazeattn_prefix_cache_bytes", "") > 0


def test_a_long_video_prompt_prefills_in_chunks_while_a_stream_decodes(served):
    """A video prompt many times the replica's prefill budget arrives while a stream
    decodes: it prefills in chunks (the metric counts them), decodes beside the stream
    (batch 2), and answers as the same model does with the whole prompt in one step; the
    stream goes on after it."""
    url, metrics_url = served
    frames = [image_part(data_url(image_bytes(s)))["image_url"] for s in range(4)]
    video = body(4, messages=user({"type": "video_frames", "video_frames": frames}))
    whole = httpx.post(f"{url}/v1/chat/completions", json=video, timeout=120)
    before = _metric(metrics_url, "gazeattn_prefill_chunks_total", "") or 0.0
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream(
            "POST",
            f"{url}/chunked/v1/chat/completions",
            json=body(ENDLESS, logit_bias=FORCED, stream=True),
            timeout=60,
        ) as stream:
            lines = stream.iter_lines()
            assert sum(next(lines).startswith("data: {") for _ in range(4)) >= 2
            chunked = pool.submit(
                httpx.post, f"{url}/chunked/v1/chat/completions", json=video, timeout=120
            ).result()
            after = [next(lines) for _ in range(4)]
    assert chunked.status_code == 200 and whole.status_code == 200
    prompt = chunked.json()["usage"]["prompt_tokens"]
    assert prompt > 4 * CHUNK
    assert chunked.headers["x-batch-size"] == "2"
    assert chunked.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]
    assert all(line.startswith("data: {") or not line for line in after)
    chunks = -(-prompt // CHUNK)
    assert wait_for(
        lambda: (_metric(metrics_url, "gazeattn_prefill_chunks_total", "") or 0) >= before + chunks,
        30,
    )
    assert wait_for(lambda: health(url + "/chunked")["running"] == 0, timeout=8, interval=0.1)


def _metric(metrics_url: str, name: str, label: str) -> float | None:
    """The sum of a metric's samples whose labels contain ``label`` (None when absent)."""
    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.match(rf"ray_{name}(\{{.*\}})? ([0-9.eE+-]+)$", line)
        if match and label in (match.group(1) or ""):
            total, found = total + float(match.group(2)), True
    return total if found else None


def _logged(rid: str) -> bool:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return any(rid in p.read_text(errors="replace") for p in logs.glob("replica_*"))
