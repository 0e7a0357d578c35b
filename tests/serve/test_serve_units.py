"""Serving pieces without a server: the shipped Serve config, image decoding, request checks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gazeattn.generation import GenerationRequest, generate_batch
from gazeattn.model import load_model
from gazeattn.ops import GazeConfig
from gazeattn.ops.config import dense_twin
from gazeattn.tiny import build_tiny
from serving.errors import BadRequest, InvalidBody, NotFound, TooLarge
from serving.images import allowed, load_image
from serving.schemas import ChatCompletionRequest
from serving.settings import GazeOverride, ServeSettings
from tests.serve.harness import data_url, image_bytes, image_part, user

CONFIG = Path(__file__).resolve().parents[2] / "infra" / "serve_config.yaml"
LIMITS = dict(max_bytes=4096, max_pixels=100 * 100)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(keep_ratio=0.3))


def test_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import GazeChat, build_app

    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "serving.app:build_app"
    ServeSettings.model_validate(application.args)
    (deployment,) = application.deployments
    assert deployment.name == GazeChat.name
    scaling = deployment.autoscaling_config
    assert scaling["min_replicas"] <= scaling["max_replicas"]
    assert deployment.max_ongoing_requests >= application.args["max_batch_size"]
    raw_deployment = raw["applications"][0]["deployments"][0]
    assert "num_gpus" in raw_deployment["ray_actor_options"]
    # what jobs/serve.py applies locally
    GazeChat.options(**{k: v for k, v in raw_deployment.items() if k != "name"})
    assert build_app(application.args).__class__.__name__ == "Application"


def test_auto_placement_is_the_cpu_here_and_the_checkpoints_dtype_on_a_gpu(
    model_dir, monkeypatch, tmp_path
):
    import json

    import torch

    from serving.settings import placement

    assert not torch.cuda.is_available()
    assert placement("auto", "auto", model_dir) == (torch.device("cpu"), torch.float32)
    assert placement("cpu", "bfloat16", model_dir) == (torch.device("cpu"), torch.bfloat16)
    trained = tmp_path / "bf16"
    trained.mkdir()
    config = json.loads((model_dir / "config.json").read_text()) | {"dtype": "bfloat16"}
    (trained / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement("auto", "auto", trained) == (torch.device("cuda"), torch.bfloat16)
    # a float32 checkpoint still runs in bf16 on a GPU unless asked otherwise
    assert placement("auto", "auto", model_dir)[1] == torch.bfloat16
    assert placement("cuda:1", "float32", model_dir) == (torch.device("cuda:1"), torch.float32)
    with pytest.raises(ValueError, match="torch device"):
        ServeSettings(model="m", device="gpu please")


def png(size=(20, 30), mode="RGB", fmt="PNG", frames=1) -> bytes:
    images = [Image.new(mode, size, color=i * 40) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=frames > 1, append_images=images[1:])
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [png(), png(mode="RGBA"), png(mode="L", fmt="JPEG"), png(fmt="GIF", frames=3)],
    ids=["rgb-png", "rgba-png", "gray-jpeg", "animated-gif"],
)
def test_images_decode_to_rgb(data):
    image = load_image(data_url(data), **LIMITS)
    assert image.mode == "RGB" and image.size == (20, 30)


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("data:image/png;base64,!!!!", BadRequest, "invalid base64"),
        (data_url(b"plain text"), BadRequest, "not a decodable image"),
        (data_url(png(fmt="TIFF"), "image/tiff"), BadRequest, "not a decodable image"),
        (data_url(image_bytes(0)[:3000]), BadRequest, "corrupt"),
        (data_url(png(), "application/pdf"), BadRequest, "not an image"),
        ("data:image/png;base64,", BadRequest, "empty"),
        (data_url(b"x" * 5000), TooLarge, "limit of 4096 bytes"),
        (data_url(png(size=(101, 100))), TooLarge, "pixels"),
        ("ftp://host/x.png", BadRequest, "scheme"),
        ("http://example.com/x.png", BadRequest, "remote image URLs"),
    ],
    ids=[
        "bad-base64",
        "text",
        "tiff",
        "truncated",
        "pdf-type",
        "empty",
        "too-many-bytes",
        "too-many-pixels",
        "ftp",
        "remote",
    ],
)
def test_bad_images_are_client_errors(url, error, message):
    with pytest.raises(error, match=message):
        load_image(url, **LIMITS)


ALLOWED = ["https://img.example.com", "http://store.internal:8080/images/"]


@pytest.mark.parametrize(
    "url",
    [
        "https://img.example.com@evil.test/x.png",  # the host is evil.test
        "https://img.example.com.evil.test/x.png",
        "https://img.example.com:8443/x.png",  # another port
        "http://img.example.com/x.png",  # another scheme
        "https://user:pw@img.example.com/x.png",  # credentials
        "http://store.internal:8080/images-private/x.png",  # beside the path, not under it
        "http://store.internal:8080/images/../secret.png",  # climbs out of the path
        "http://store.internal:8080/images/%2e%2e/secret.png",
        "http://store.internal/images/x.png",  # port 80, not 8080
    ],
)
def test_the_allow_list_matches_parsed_urls(url):
    assert not allowed(url, ALLOWED)
    with pytest.raises(BadRequest, match="remote image URLs"):
        load_image(url, allowed_prefixes=ALLOWED, **LIMITS)


@pytest.mark.parametrize(
    "url",
    [
        "https://img.example.com/x.png",
        "https://IMG.example.com:443/a/b.png?size=2",
        "http://store.internal:8080/images/x.png",
        "http://store.internal:8080/images/",
    ],
)
def test_the_allow_list_admits_what_it_names(url):
    assert allowed(url, ALLOWED)


def test_allow_list_entries_must_parse():
    with pytest.raises(ValueError, match="allowed_image_url_prefixes"):
        ServeSettings(model="m", allowed_image_url_prefixes=["img.example.com/"])


def test_the_pixels_of_a_request_are_bounded_together(model_dir):
    from serving.requests import prepare

    _, processor = load_model(model_dir)
    settings = ServeSettings(model=str(model_dir), max_request_pixels=2 * 40 * 56)
    image = image_part(data_url(image_bytes(0)))  # 40 x 56

    def run(n: int):
        data = {"model": "m", "messages": user(*[image] * n), "max_tokens": 2}
        return prepare(ChatCompletionRequest.model_validate(data), settings, processor, "m", 2)

    assert run(2).generation.images == []
    with pytest.raises(TooLarge, match="total more than 4480 pixels") as err:
        run(3)
    assert err.value.param == "messages.0.content.2.image_url"


def test_images_are_shrunk_as_they_are_decoded(model_dir, monkeypatch):
    """Each image and video leaves the decoder at the size its encoding takes (the tiny
    model's 96 px), before the next is decoded; what is encoded is the original's pixels
    (tests/model/test_media_fit.py)."""
    from serving.requests import prepare

    _, processor = load_model(model_dir)
    decoded, encoded = [], []
    fit_image = processor.fit_image
    monkeypatch.setattr(processor, "fit_image", lambda im: decoded.append(im.size) or fit_image(im))
    encode = processor.encode_sample

    def record(messages, images, videos, **kw):
        encoded.extend(im.size for im in [*images, *[f for v in videos for f in v]])
        return encode(messages, images=images, videos=videos, **kw)

    monkeypatch.setattr(processor, "encode_sample", record)
    settings = ServeSettings(model=str(model_dir))
    big = data_url(image_bytes(0, size=(300, 500)))
    frames = {"type": "video_frames", "video_frames": [{"url": big}, {"url": big}]}
    data = {"model": "m", "messages": user(image_part(big), frames), "max_tokens": 2}
    prepare(ChatCompletionRequest.model_validate(data), settings, processor, "m", 2)
    assert decoded == [(500, 300)]
    assert encoded == [(96, 96)] * 3


def test_prepare_checks_and_converts(model_dir):
    from dataclasses import replace

    from gazeattn.prefix_cache import visual_prefix
    from serving.requests import prepare

    _, processor = load_model(model_dir)
    settings = ServeSettings(model=str(model_dir), max_images=2, max_tokens_limit=16)

    def run(**kw):
        data = {"model": "m", "messages": user(), **kw}
        return prepare(ChatCompletionRequest.model_validate(data), settings, processor, "m", 2)

    frames = {"type": "video_frames", "video_frames": [{"url": data_url(image_bytes(1))}]}
    prepared = run(
        messages=[{"role": "developer", "content": "be brief"}, *user(frames)],
        max_tokens=5,
        stop="x",
        gaze=True,
    )
    generation = prepared.generation
    assert generation.messages[0] == {"role": "system", "content": "be brief"}
    assert generation.messages[1]["content"][0] == {"type": "video"}
    # the engine decodes the encoded sample; the decoded frames are not kept
    assert generation.videos == [] and generation.images == []
    assert [type(p).__name__ for p in prepared.sample.parts].count("Video") == 1
    assert generation.max_new_tokens == 5 and generation.stop == ("x",)
    assert prepared.gaze and prepared.layer == -1 and prepared.prompt_tokens > 148
    # the prefix cache's content digest is hashed here, off the scheduler, as the engine would
    length, digest = prepared.sample.prefix
    assert digest and 0 < length < prepared.prompt_tokens
    assert visual_prefix(replace(prepared.sample, prefix=None), processor) == (length, digest)
    with pytest.raises(NotFound):
        prepare(ChatCompletionRequest(model="x", messages=user()), settings, processor, "m", 2)
    with pytest.raises(BadRequest, match="limit of 16"):
        run(max_tokens=17)
    with pytest.raises(BadRequest, match="limit of 2"):
        run(messages=user(*[image_part(data_url(image_bytes(0)))] * 3))
    with pytest.raises(BadRequest, match="gaze_layer"):
        run(gaze_layer=-3)


def test_a_preparing_process_keeps_the_media_it_processed(model_dir, monkeypatch):
    """A request about a picture seen before (another question) skips its processing, and
    encodes and hashes as the first; media_cache_bytes=0 keeps nothing."""
    from serving import requests
    from serving.requests import _init_worker, _prepare_in_worker

    _, processor = load_model(model_dir)
    settings = ServeSettings(model=str(model_dir), max_images=2, max_tokens_limit=16)
    image = image_part(data_url(image_bytes(2)))

    def body(question: str) -> ChatCompletionRequest:
        messages = [{"role": "user", "content": [image, {"type": "text", "text": question}]}]
        return ChatCompletionRequest.model_validate({"model": "m", "messages": messages})

    monkeypatch.setattr(requests, "_WORKER", None)
    _init_worker(settings, processor, "m", 2)
    first, second = _prepare_in_worker(body("what?")), _prepare_in_worker(body("and now?"))
    stats = processor.media_cache.stats
    assert (stats.misses, stats.hits, stats.entries) == (1, 1, 1)
    # what each request reports (the replica's gazeattn_media_cache_* counters)
    assert (first.media_hits, first.media_misses) == (0, 1)
    assert (second.media_hits, second.media_misses) == (1, 0)
    assert first.sample.prefix == second.sample.prefix and first.sample.prefix[1]
    for name, array in first.sample.vision.items():
        assert np.array_equal(array, second.sample.vision[name])
    _, plain = load_model(model_dir)
    _init_worker(settings.model_copy(update={"media_cache_bytes": 0}), plain, "m", 2)
    assert plain.media_cache is None
    uncached = _prepare_in_worker(body("what?"))
    assert uncached.sample.prefix == first.sample.prefix
    assert (uncached.media_hits, uncached.media_misses) == (0, 1)


def test_body_parsing_errors():
    from serving.app import parse_body

    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_body(b"{")
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_body(b"[" * 100_000)
    with pytest.raises(InvalidBody, match="messages"):
        parse_body(b'{"model": "m"}')
    # unknown fields are refused by name, at the top level and inside messages and parts
    with pytest.raises(BadRequest, match="unknown field 'x'") as err:
        parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": 1}')
    assert err.value.param == "x" and err.value.status == 400
    with pytest.raises(BadRequest, match="messages.0.weight"):
        parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "a", "weight": 1}]}')
    part = b'{"type": "image_url", "image_url": {"url": "data:x", "size": 3}}'
    with pytest.raises(BadRequest, match=r"messages.0.content.0.image_url.size"):
        parse_body(b'{"model": "m", "messages": [{"role": "user", "content": [' + part + b"]}]}")


def test_gaze_override_replaces_budget_and_backend(model_dir):
    from serving.app import gaze_config

    assert gaze_config(model_dir, None) is None
    dense = gaze_config(model_dir, GazeOverride(backend="dense"))
    assert dense.backend == "dense" and dense.keep_ratio == 0.3
    top = gaze_config(model_dir, GazeOverride(top_k=3))
    assert top.top_k == 3 and top.keep_ratio is None
    twin = gaze_config(model_dir, GazeOverride(attn="dense"))
    assert twin == dense_twin(GazeConfig(keep_ratio=0.3))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"keep_ratio": 1.5}, "keep_ratio must be in"),
        ({"top_k": 0}, "top_k must be"),
        ({"top_k": 3, "keep_ratio": 0.5}, "exactly one"),
        ({"attn": "dense", "top_k": 3}, "takes no top_k"),
        ({"region_size": [1, 2, 2]}, "Extra inputs"),
    ],
    ids=["ratio", "top-k", "both", "dense-with-budget", "not-overridable"],
)
def test_bad_gaze_overrides_fail_in_the_settings(override, message):
    with pytest.raises(ValueError, match=message):
        ServeSettings.model_validate({"model": "m", "gaze": override})


def test_placeholder_tokens_are_never_generated(model_dir):
    """A model that prefers the image token must still produce decodable text tokens."""
    model, processor = load_model(model_dir)
    banned = processor.image_token_id

    def prefer_image(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., banned] += 1e4
        return logits

    model.lm_head.register_forward_hook(prefer_image)
    request = GenerationRequest(messages=user(), max_new_tokens=4)
    (result,) = generate_batch(model, processor, [request])
    assert banned not in result.token_ids
    assert result.completion_tokens == 4 or result.finish_reason == "stop"


@pytest.mark.slow  # the sqlite store's migrations take tens of seconds
def test_mlflow_uri_resolves_to_the_model_directory(model_dir, tmp_path, monkeypatch):
    import mlflow

    from tracking.models import resolve_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("serve", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), "export/model")
    client.set_terminated(run.info.run_id)
    path = resolve_model(f"runs:/{run.info.run_id}/export").path
    assert path.name == "model" and (path / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_only_errors_that_name_the_request_are_client_errors():
    """An internal ValueError (an inconsistent batch, a library's check) is a fault of the
    server, answered 500 with the request id; errors that say what is wrong with the request
    are 400s naming the field."""
    from gazeattn.generation import InvalidRequest
    from gazeattn.processing import ProcessorInputError
    from serving.app import client_error
    from serving.errors import ServerError

    assert client_error(ValueError("the batch cache holds 3 rows; the model ran 2")) is None
    assert client_error(RuntimeError("CUDA error")) is None
    assert client_error(ServerError("internal")) is None
    bad = client_error(InvalidRequest("temperature is 0 in float32", param="temperature"))
    assert isinstance(bad, BadRequest) and bad.param == "temperature"
    assert client_error(ProcessorInputError("media tokens in text")).status == 400
    too_large = TooLarge("image too large", param="messages.0")
    assert client_error(too_large) is too_large


def test_a_question_about_a_cached_prefix_comes_without_its_pixels(model_dir):
    """The replica's preparation (``GazeChat.prepare``): a request whose visual prefix the
    engine has cached comes without its pixel inputs, holds the entry and answers as it would
    with them; one whose entry is evicted before the engine holds it is prepared again with
    them (and counted). A preparing process told of no cached prefix leaves nothing out."""
    import asyncio
    import concurrent.futures
    import threading
    from types import SimpleNamespace

    from gazeattn.engine import Engine
    from serving.app import GazeChat
    from serving.requests import prepare

    model, processor = load_model(model_dir)
    settings = ServeSettings(model=str(model_dir), max_tokens_limit=16)
    engine = Engine(model.eval(), processor, prefix_cache_bytes=2**30)
    evict: list[bool] = []  # the next preparation ends after an eviction of every prefix
    told: list = []  # what each preparation was told of the engine's cached prefixes

    def submit(body, cached=None) -> concurrent.futures.Future:  # the Preparer, in this process
        told.append(cached)
        future = concurrent.futures.Future()
        future.set_result(prepare(body, settings, processor, "m", 2, cached))
        if evict:
            evict.pop()
            engine.prefix_cache.clear()
        return future

    counted = {"pixels_skipped": 0, "prepared_again": 0}
    chat = object.__new__(GazeChat.func_or_class)
    chat.engine, chat.preparer = engine, SimpleNamespace(submit=submit)
    media_seen: list[dict] = []  # what each preparation reported of the media cache
    chat.metrics = SimpleNamespace(
        **{name: SimpleNamespace(inc=lambda n=name: counted.update({n: counted[n] + 1}))
           for name in counted},
        media=lambda **seen: media_seen.append(seen),
    )  # fmt: skip
    chat.preparing, chat._preparing_lock = 0, threading.Lock()
    image = image_part(data_url(image_bytes(3)))

    def body(question: str) -> ChatCompletionRequest:
        data = {"model": "m", "messages": user(image, text=question), "max_tokens": 6}
        data["temperature"] = 0  # greedy
        return ChatCompletionRequest.model_validate(data)

    def answer(prepared, on=engine) -> tuple[list[int], int]:
        """(greedy tokens, cached prompt tokens) of the prepared request on engine ``on``."""
        seq = on.submit(prepared.generation, **prepared.engine_options())
        while not seq.done:
            on.step()
        return seq.tokens, seq.cached_tokens

    # the same requests with their pixels, on an engine of its own
    whole = Engine(model, processor, prefix_cache_bytes=2**30)
    first = asyncio.run(chat.prepare(body("what?")))
    assert not first.sample.pixels_dropped and first.prefix_hold is None
    assert answer(first) == answer(first, whole) and not told[-1].keys  # nothing cached yet
    second = asyncio.run(chat.prepare(body("and now?")))
    assert second.sample.pixels_dropped and second.prefix_hold is not None
    assert not set(processor.rules.pixel_names) & set(second.sample.vision)
    assert second.sample.prefix[1] in told[-1]
    with_pixels = prepare(body("and now?"), settings, processor, "m", 2)
    got = answer(second)
    assert got == answer(with_pixels, whole) and got[1] == second.sample.prefix[0]
    assert counted == {"pixels_skipped": 1, "prepared_again": 0}
    # this process has no media cache: each preparation processed its image
    assert media_seen == [{"hits": 0, "misses": 1}] * 2
    evict.append(True)
    third = asyncio.run(chat.prepare(body("and then?")))
    assert told[-2].keys and told[-1] is None  # again, told of nothing
    assert not third.sample.pixels_dropped and third.prefix_hold is None
    assert counted == {"pixels_skipped": 2, "prepared_again": 1}
    whole.prefix_cache.clear()
    got = answer(third)
    assert got == answer(third, whole) and got[1] == 0  # a miss: its prefix prefilled again
    assert chat.preparing == 0
