"""The OpenAI-compatible app on a real Ray Serve (127.0.0.1) with the real tiny gaze model.

One Serve instance per module: an open app at ``/`` and the same app behind an
API key at ``/secure``.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_tiny
from serving.settings import ServeSettings
from tests.serve.harness import (
    data_url,
    image_bytes,
    image_part,
    local_serve,
    static_files,
    user,
)

pytestmark = pytest.mark.ray

MODEL = "gaze-tiny"
SERVED: dict = {}  # the served checkpoint's directory (set by the server fixture)
KEY = "test-key-0123"
LAYERS = 2
# one image of the tiny model: a 12 x 12 grid and 4 context tokens
IMAGE_TOKENS = 12 * 12 + 4
# the chat template writes a newline after each image or video marker
MARKER = 1
LIMITS = dict(
    max_body_bytes=512 * 1024,
    max_image_bytes=64 * 1024,
    max_image_pixels=512 * 512,
    max_images=4,
    max_prompt_tokens=800,
    max_tokens_limit=32,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    for folder in ("allowed", "other"):
        (root / folder).mkdir()
        (root / folder / "image.png").write_bytes(image_bytes(5))
    with static_files(root) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    from ray import serve

    from serving.app import app

    model_dir = build_tiny(
        tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(keep_ratio=0.3), layers=LAYERS
    )
    settings = ServeSettings(
        model=str(model_dir),
        model_name=MODEL,
        allowed_image_url_prefixes=[f"{files}/allowed/"],
        # the allow-listed file server is on 127.0.0.1
        allow_private_image_hosts=True,
        max_batch_size=4,
        **LIMITS,
    )
    secure = settings.model_copy(update={"api_key_env": "GAZEATTN_TEST_KEY"})
    options = dict(num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
    env = {"runtime_env": {"env_vars": {"GAZEATTN_TEST_KEY": KEY}}, "num_cpus": 1}
    with local_serve() as url:
        serve.run(app(settings, **options), name="open", route_prefix="/")
        secure_options = {**options, "ray_actor_options": env}
        serve.run(app(secure, **secure_options), name="secure", route_prefix="/secure")
        SERVED["model_dir"] = model_dir
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


# ---- the openai client


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{server}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_text_only(client):
    out = chat(client, [{"role": "system", "content": "you are helpful"}, *user()])
    choice = out.choices[0]
    assert out.model == MODEL and out.object == "chat.completion"
    assert isinstance(choice.message.content, str)
    used = out.usage.completion_tokens
    # "length" exactly when the 6-token budget is used up, else the model ended its turn
    assert choice.finish_reason == ("length" if used == 6 else "stop") and used <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_images_add_their_tokens(client):
    text = chat(client, user()).usage.prompt_tokens
    one = chat(client, user(image_part(data_url(image_bytes(1))))).usage.prompt_tokens
    several = [
        image_part(data_url(image_bytes(2))),
        image_part(data_url(image_bytes(3, fmt="JPEG"), "image/jpeg")),
        image_part(data_url(image_bytes(4, size=(70, 30), fmt="WEBP"), "image/webp")),
    ]
    three = chat(client, user(*several)).usage.prompt_tokens
    assert one - text == IMAGE_TOKENS + MARKER
    assert three - text == 3 * (IMAGE_TOKENS + MARKER)


def test_questions_about_one_image_reuse_its_prefill(client):
    """The prefix cache (on by default): a second question about the same image (the same
    bytes) reports the prefilled prefix in OpenAI's usage field; the answer is unchanged."""
    image = image_part(data_url(image_bytes(31)))
    first = chat(client, user(image, text="what color is it?"))
    other = chat(client, user(image, text="where is the circle?"))
    again = chat(client, user(image, text="what color is it?"))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = other.usage.prompt_tokens_details.cached_tokens
    assert IMAGE_TOKENS < cached < other.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == cached
    assert again.choices[0].message.content == first.choices[0].message.content


def test_video_frames_extension(client):
    frames = [{"url": data_url(image_bytes(10 + i))} for i in range(3)]
    video = {"type": "video_frames", "video_frames": frames}
    out = chat(client, user(video), extra_body={"gaze": True})
    added = out.usage.prompt_tokens - chat(client, user()).usage.prompt_tokens
    assert added == 3 * IMAGE_TOKENS + MARKER
    assert out.model_extra["gaze"]["grids"] == [[3, 12, 12]]


def test_streaming_matches_the_completion(client):
    messages = user(image_part(data_url(image_bytes(6))))
    whole = chat(client, messages, max_tokens=8)
    stream = chat(
        client, messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == whole.choices[0].message.content
    assert finals == [whole.choices[0].finish_reason]
    streamed = chunks[-1].usage
    assert chunks[-1].choices == [] and streamed.total_tokens == whole.usage.total_tokens
    assert streamed.completion_tokens == whole.usage.completion_tokens
    # the same image again: its prefix came from the prefix cache
    assert streamed.prompt_tokens_details.cached_tokens > 0


def test_gaze_extension(client):
    out = chat(client, user(image_part(data_url(image_bytes(7)))), extra_body={"gaze": True})
    gaze = out.model_extra["gaze"]
    assert gaze["layer"] == LAYERS - 1 and gaze["grids"] == [[1, 12, 12]]
    # dense: the 144 image tokens and the 4 context tokens, the ones gaze counts too
    assert 0 < gaze["visual_entries_attended"] < gaze["visual_entries_dense"] == IMAGE_TOKENS
    assert gaze["savings"] == pytest.approx(
        1 - gaze["visual_entries_attended"] / gaze["visual_entries_dense"]
    )
    # one entry per generated token (plus the routed step that chose end-of-turn)
    n = out.usage.completion_tokens
    assert len(gaze["tokens"]) == n + (out.choices[0].finish_reason == "stop")
    for token in gaze["tokens"]:
        assert token["regions"]
        for region in token["regions"]:
            span, t0, t1, h0, h1, w0, w1 = region["box"]
            assert span == 0 and 0 <= t0 < t1 <= 1 and 0 <= h0 < h1 <= 12 and 0 <= w0 < w1 <= 12
            assert region["heads"] >= 1
    assert "gaze" not in chat(client, user()).model_extra


def test_gaze_layer_and_streamed_gaze(client):
    messages = user(image_part(data_url(image_bytes(8))))
    out = chat(client, messages, extra_body={"gaze": True, "gaze_layer": 0})
    assert out.model_extra["gaze"]["layer"] == 0
    stream = chat(client, messages, stream=True, extra_body={"gaze": True, "gaze_layer": 0})
    reports = [c.model_extra.get("gaze") for c in stream if c.model_extra.get("gaze")]
    assert reports == [out.model_extra["gaze"]]


def test_continuous_batches_give_the_single_answers(client):
    prompts = [
        user(text="what color is the circle?"),
        user(image_part(data_url(image_bytes(20))), text="where is the star?"),
        user(image_part(data_url(image_bytes(21))), image_part(data_url(image_bytes(22)))),
        user(text="how many"),
    ]
    raw = client.chat.completions.with_raw_response

    def ask(messages):
        response = raw.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        return response.parse(), int(response.headers["x-batch-size"])

    single = [ask(m) for m in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(ask, prompts))
    assert all(size == 1 for _, size in single)
    assert max(size for _, size in batched) >= 2, "the concurrent requests were never batched"
    for messages, (one, _), (many, _) in zip(prompts, single, batched, strict=True):
        assert many.choices[0].message.content == one.choices[0].message.content
        assert many.usage.total_tokens == one.usage.total_tokens
        assert many.usage.completion_tokens == one.usage.completion_tokens
        # the batched request's images were prefilled by the single one before it
        has_image = any(p["type"] == "image_url" for p in messages[0]["content"][:-1])
        assert (many.usage.prompt_tokens_details.cached_tokens > 0) == has_image


def test_served_answers_equal_generate_on_the_checkpoint(client):
    """Greedy answers of the server, concurrent, equal transformers' generate on the
    checkpoint loaded through the Auto classes (the same prompts, images and template)."""
    import numpy as np
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gazeattn.generation import GazeCache

    path = SERVED["model_dir"]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    pngs = [image_bytes(30), image_bytes(31, size=(70, 30)), image_bytes(32)]
    golden = [
        (user(image_part(data_url(pngs[0]))), [pngs[0]]),
        (user(image_part(data_url(pngs[1])), image_part(data_url(pngs[2]))), pngs[1:]),
        (user(text="how many circles?"), []),
    ]

    def ask(messages):
        out = chat(client, messages, max_tokens=8, extra_body={"gaze": True})
        return [t["token_id"] for t in out.model_extra["gaze"]["tokens"]][
            : out.usage.completion_tokens
        ]

    with ThreadPoolExecutor(len(golden)) as pool:
        served = list(pool.map(ask, [m for m, _ in golden]))
    for (messages, images), tokens in zip(golden, served, strict=True):
        parts = [
            {"type": "image"} if p["type"] == "image_url" else p for p in messages[0]["content"]
        ]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True
        )
        arrays = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in images]
        inputs = processor(text=prompt, images=arrays)
        out = model.generate(
            **inputs,
            cache=GazeCache(),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        assert out[0, inputs["input_ids"].shape[1] :].tolist()[: len(tokens)] == tokens


def test_sampling_with_a_seed_repeats(client):
    kw = dict(temperature=1.0, top_p=0.9, seed=3, max_tokens=8)
    first = chat(client, user(), **kw).choices[0].message.content
    assert chat(client, user(), **kw).choices[0].message.content == first


def _streamed(client, messages, **kw):
    chunks = list(chat(client, messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return text, finish, chunks


def test_stop_strings_never_appear_streamed_or_not(client):
    messages = user(image_part(data_url(image_bytes(9))))
    full = chat(client, messages, max_tokens=12).choices[0].message.content
    assert len(full) >= 4, "the tiny model must say enough to pick stop strings from"
    for stop in ([full[2:4]], [full[1], "zz"], [full[-2:]]):
        out = chat(client, messages, max_tokens=12, stop=stop)
        text, finish, _ = _streamed(client, messages, max_tokens=12, stop=stop)
        expected = full[: min(full.index(s) for s in stop if s in full)]
        assert out.choices[0].message.content == text == expected
        assert out.choices[0].finish_reason == "stop" and finish == ["stop"]
        assert not any(s in text for s in stop)


def test_logprobs_streamed_and_not(client):
    messages = user(image_part(data_url(image_bytes(11))))
    out = chat(client, messages, max_tokens=6, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # greedy: the generated token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content) == out.choices[0].message.content
    _, _, chunks = _streamed(client, messages, max_tokens=6, logprobs=True, top_logprobs=2)
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]
    plain = chat(client, messages, max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_penalties_and_logit_bias_change_the_answer(client):
    messages = user(image_part(data_url(image_bytes(12))))
    plain = chat(client, messages, max_tokens=6, extra_body={"gaze": True})
    # the gaze report names the generated token ids, which logit_bias takes
    first = plain.model_extra["gaze"]["tokens"][0]["token_id"]
    avoided = chat(
        client, messages, max_tokens=6, logit_bias={str(first): -100}, extra_body={"gaze": True}
    )
    assert avoided.model_extra["gaze"]["tokens"][0]["token_id"] != first
    forced = chat(
        client, messages, max_tokens=4, logit_bias={str(first): 100}, extra_body={"gaze": True}
    )
    assert [t["token_id"] for t in forced.model_extra["gaze"]["tokens"]] == [first] * 4
    repeated = chat(
        client,
        messages,
        max_tokens=4,
        logit_bias={str(first): 3},
        frequency_penalty=2.0,
        extra_body={"gaze": True},
    )
    ids = [t["token_id"] for t in repeated.model_extra["gaze"]["tokens"]]
    assert ids.count(first) < 4


def test_unknown_and_unsupported_fields_are_named(client):
    with pytest.raises(openai.BadRequestError, match="guided_json"):
        chat(client, user(), extra_body={"guided_json": {"type": "object"}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(client, user(), response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="top_k"):
        chat(client, user(), extra_body={"top_k": 5})
    # the neutral values clients send by default are accepted
    assert chat(client, user(), n=1, presence_penalty=0, extra_body={"top_k": -1}).choices


# ---- bad input: 4xx with a message, never a 500


def body(messages=None, **kw) -> dict:
    return {"model": MODEL, "messages": messages or user(), "max_tokens": 4, **kw}


def with_image(url: str) -> dict:
    return body(user(image_part(url)))


def flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = image_bytes(0)
BIG_SIDE = 600  # 600 x 600 pixels > the 512 x 512 limit, yet a small file
BAD_CASES = {
    "invalid json": (b"{not json", 400),
    "not an object": (b"[1, 2]", 400),
    "missing messages": ({"model": MODEL}, 400),
    "empty messages": ({"model": MODEL, "messages": []}, 400),
    "unknown role": (body([{"role": "robot", "content": "hi"}]), 400),
    "unknown part type": (body([{"role": "user", "content": [{"type": "audio"}]}]), 400),
    "temperature too high": (body(temperature=3), 400),
    "top_p zero": (body(top_p=0), 400),
    "temperature 0 in float32": (body(temperature=1e-46), 400),
    "max_tokens zero": (body(max_tokens=0), 400),
    "max_tokens over the limit": (body(max_tokens=10_000), 400),
    "n above one": (body(n=2), 400),
    "too many stop strings": (body(stop=["a", "b", "c", "d", "e"]), 400),
    "gaze layer out of range": (body(gaze=True, gaze_layer=LAYERS), 400),
    "wrong type for stream": (body(stream="yes please"), 400),
    "unknown model": (body() | {"model": "gpt-9"}, 404),
    "invalid base64": (with_image("data:image/png;base64,@@@notbase64@@@"), 400),
    "not an image": (with_image(data_url(b"hello, I am not an image")), 400),
    "not an image media type": (with_image(data_url(PNG, "text/plain")), 400),
    "data url without base64": (with_image("data:image/png,rawbytes"), 400),
    "truncated image": (with_image(data_url(PNG[: len(PNG) // 2])), 400),
    "image too many bytes": (with_image(data_url(image_bytes(0, size=(200, 200)))), 413),
    "image too many pixels": (with_image(data_url(flat_png(BIG_SIDE))), 413),
    "too many images": (body(user(*[image_part(data_url(PNG))] * 5)), 400),
    "prompt too long": (body(user(text="the red circle " * 400)), 400),
    "media token in text": (body(user(text="look <image> here")), 400),
    "file url": (with_image("file:///etc/passwd"), 400),
    "remote url": (with_image("https://example.com/cat.png"), 400),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_input_gets_4xx(server, case):
    payload, status = BAD_CASES[case]
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = httpx.post(
        f"{server}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_body_too_large(server):
    content = json.dumps(body(user(text="x" * (600 * 1024)))).encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user(), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        chat(client, user(image_part("http://127.0.0.1:9/x.png")))


# ---- remote URLs: refused unless allow-listed


def test_allow_listed_url_is_fetched(client, files):
    inline = chat(client, user(image_part(data_url(image_bytes(5)))))
    fetched = chat(client, user(image_part(f"{files}/allowed/image.png")))
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        chat(client, user(image_part(f"{files}/other/image.png")))


# ---- the API key


def test_auth_protects_everything_but_health(server):
    base = f"{server}/secure"
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        models = httpx.get(f"{base}/v1/models", headers=headers, timeout=30)
        completion = httpx.post(
            f"{base}/v1/chat/completions", json=body(), headers=headers, timeout=30
        )
        assert models.status_code == completion.status_code == 401
        assert completion.json()["error"]["type"] == "authentication_error"
    secured = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in secured.models.list()] == [MODEL]
    assert chat(secured, user()).choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


def test_open_app_needs_no_key(server):
    assert httpx.get(f"{server}/v1/models", timeout=30).status_code == 200


# ---- lmms-eval's OpenAI-compatible models (the request shapes they send)


def _png_base64(image: Image.Image) -> str:
    """An image as lmms-eval encodes it: PNG, base64."""
    import base64

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def _lmms_image(b64: str) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}


def lmms_eval_payloads() -> dict[str, tuple[dict, int]]:
    """name -> (the body lmms-eval sends, the images in it). Read from lmms-eval's
    ``models/simple/openai_compatible.py`` (``openai_compatible``: one user message, the
    context text first, then every image or video frame as a base64 PNG ``image_url`` part; a
    video is ``max_frames_num`` uniformly sampled frames plus the last one) and
    ``models/chat/openai_compatible.py`` with ``protocol.ChatMessages`` (``openai_compatible_
    chat``: the task's messages, list contents for every role, a video as its frames; the
    Qwen3-VL variant puts a ``<t seconds>`` text before each frame); both send ``max_tokens``
    and ``temperature`` 0 (greedy) and nothing else."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(9)]
    picked = [int(i) for i in np.linspace(0, len(frames) - 1, 2, dtype=int)]  # max_frames_num=2
    if len(frames) - 1 not in picked:
        picked.append(len(frames) - 1)
    still = _png_base64(Image.open(io.BytesIO(image_bytes(4))))
    video = [_png_base64(frames[i]) for i in picked]
    question = "Which shape is red? Answer with the option's letter."

    def body(messages: list[dict]) -> dict:
        return {"messages": messages, "model": MODEL, "max_tokens": 16, "temperature": 0}

    simple_image = body([{"role": "user", "content": [{"type": "text", "text": question}]}])
    simple_image["messages"][0]["content"].append(_lmms_image(still))
    simple_video = body([{"role": "user", "content": [{"type": "text", "text": question}]}])
    simple_video["messages"][0]["content"] += [_lmms_image(f) for f in video]
    chat = body(
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [_lmms_image(still), {"type": "text", "text": question}]},
        ]
    )
    timestamped = []
    for k, frame in enumerate(video):
        timestamped += [{"type": "text", "text": f"<{0.5 + k:.1f} seconds>"}, _lmms_image(frame)]
    qwen3_vl = body(
        [{"role": "user", "content": [*timestamped, {"type": "text", "text": question}]}]
    )
    return {
        "openai_compatible, an image": (simple_image, 1),
        "openai_compatible, a video": (simple_video, len(video)),
        "openai_compatible_chat, system and image": (chat, 1),
        "openai_compatible_chat, Qwen3-VL timestamps": (qwen3_vl, len(video)),
    }


def test_lmms_eval_requests_are_answered(server):
    """lmms-eval's client calls ``AsyncOpenAI().chat.completions.create(**payload)``, as here."""
    import asyncio

    payloads = lmms_eval_payloads()

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(
            *(client.chat.completions.create(**payload) for payload, _ in payloads.values())
        )

    responses = asyncio.run(ask_all())
    for (name, (_, images)), response in zip(payloads.items(), responses, strict=True):
        assert isinstance(response.choices[0].message.content, str), name
        assert response.choices[0].finish_reason in ("stop", "length"), name
        # every image and frame reached the model (each is 148 tokens of the tiny model)
        assert response.usage.prompt_tokens > images * IMAGE_TOKENS, name
