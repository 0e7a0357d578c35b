"""Request fields are honoured or refused by name, and the scheduler loop (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from gazeattn.engine import Engine
from gazeattn.generation import GenerationRequest
from gazeattn.model import load_model
from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_tiny
from serving.errors import BadRequest
from serving.requests import Prepared, prepare
from serving.scheduler import Scheduler
from serving.schemas import ChatCompletionRequest
from serving.settings import ServeSettings
from tests.serve.harness import data_url, image_bytes, image_part, user
from tests.servers import wait_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(keep_ratio=0.3))
    model, processor = load_model(path)
    return path, model.eval(), processor


def _prepare(tiny, **fields):
    path, _, processor = tiny
    settings = ServeSettings(model=str(path), max_tokens_limit=16)
    data = {"model": "m", "messages": user(), **fields}
    return prepare(ChatCompletionRequest.model_validate(data), settings, processor, "m", 2)


# (field, a value asking for something not served); each must be a 400 naming the field
REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "high",
    "web_search_options": {},
    "verbosity": "low",
    "service_tier": "flex",
    "store": True,
    "metadata": {"k": "v"},
    "top_k": 5,
    "min_p": 0.1,
    "repetition_penalty": 1.2,
    "min_tokens": 3,
    "ignore_eos": True,
}
# the same fields at the values that ask for nothing: accepted
NEUTRAL = {
    "tools": [],
    "tool_choice": "none",
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "service_tier": "auto",
    "store": False,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "ignore_eos": False,
    "parallel_tool_calls": True,
    "user": "someone",
    "safety_identifier": "hash",
    "prompt_cache_key": "k",
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_unsupported_values_are_refused_by_name(tiny, field):
    with pytest.raises(BadRequest, match=field) as err:
        _prepare(tiny, **{field: REFUSED[field]})
    assert err.value.param == field and err.value.status == 400


def test_neutral_values_are_accepted(tiny):
    prepared = _prepare(tiny, **NEUTRAL)
    assert prepared.user == "someone"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
        (
            {"messages": user(image_part(data_url(image_bytes(1))) | {})},
            None,
        ),
        (
            {
                "messages": user(
                    {"type": "image_url", "image_url": {"url": "data:x", "detail": "high"}}
                )
            },
            "messages.0.content.0.detail",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"gaze_layer": 0}, "gaze_layer"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"10000000": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"n": 2}, "n"),
    ],
    ids=[
        "message-name",
        "image-ok",
        "detail-high",
        "stream-options-without-stream",
        "obfuscation",
        "top-logprobs-without-logprobs",
        "gaze-layer-without-gaze",
        "two-budgets",
        "bias-not-an-id",
        "bias-out-of-vocab",
        "bias-too-big",
        "n",
    ],
)
def test_fields_inside_and_combinations(tiny, fields, param):
    if param is None:
        assert _prepare(tiny, **fields).prompt_tokens > 12 * 12
        return
    with pytest.raises(BadRequest) as err:
        _prepare(tiny, **fields)
    assert err.value.param == param


def test_sampling_fields_reach_the_engine(tiny):
    prepared = _prepare(
        tiny,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"7": -100},
        seed=4,
        temperature=0.5,
        top_p=0.8,
        stop=["x"],
        max_completion_tokens=5,
    )
    g = prepared.generation
    assert g.top_logprobs == 3 and g.logit_bias == {7: -100.0}
    assert g.presence_penalty == 0.5 and g.frequency_penalty == -0.5
    assert (g.seed, g.temperature, g.top_p, g.stop, g.max_new_tokens) == (4, 0.5, 0.8, ("x",), 5)
    assert prepared.sample is not None and len(prepared.sample) == prepared.prompt_tokens
    assert prepared.engine_options()["sample"] is prepared.sample
    assert _prepare(tiny, logprobs=True).generation.top_logprobs == 0
    assert _prepare(tiny).generation.top_logprobs is None


def _item(max_new: int, **kw) -> Prepared:
    request = GenerationRequest(messages=user(), max_new_tokens=max_new, **kw)
    return Prepared(generation=request, gaze=False, layer=-1, prompt_tokens=0)


def test_the_scheduler_streams_cancels_and_survives_a_broken_step(tiny, monkeypatch):
    _, model, processor = tiny
    engine = Engine(model, processor, max_batch_size=4)
    alone = engine.run([_item(6).generation])[0].token_ids
    scheduler = Scheduler(engine)

    async def collect(stream):
        outs = [out async for out in stream]
        return outs

    async def main():
        long = scheduler.submit(_item(64, stop=()))
        streams = [scheduler.submit(_item(6)) for _ in range(2)]
        first = await long.__anext__()
        scheduler.cancel(long)
        results = await asyncio.gather(*(collect(s) for s in streams))
        return first, results

    try:
        first, results = asyncio.run(main())
        assert first.sequence.cancelled or first.finished
        for outs in results:
            assert outs[-1].result.token_ids == alone
            assert "".join(o.text for o in outs) == outs[-1].result.text
        # the finished rows leave at the end of the step that finished them
        assert wait_for(lambda: engine.num_running == 0, timeout=10, interval=0.05)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in a step")

        async def after_a_broken_step():
            monkeypatch.setattr(engine, "_decode", broken)
            failed = await collect(scheduler.submit(_item(6)))
            monkeypatch.undo()
            fine = await collect(scheduler.submit(_item(6)))
            return failed, fine

        failed, fine = asyncio.run(after_a_broken_step())
        assert isinstance(failed[-1].error, RuntimeError)
        assert fine[-1].result.token_ids == alone
    finally:
        scheduler.close()


def test_a_step_wakes_the_event_loop_once_for_all_its_streams(tiny, monkeypatch):
    """The scheduler thread hands a step's outputs to the event loop in one call, not one per
    stream; every output reaches its own stream, in order."""
    from serving import scheduler as scheduler_module

    _, model, processor = tiny
    engine = Engine(model, processor, max_batch_size=4)
    alone = engine.run([_item(6).generation])[0].token_ids
    steps, handed = [0], []
    step = engine.step

    def counted(*args, **kwargs):
        steps[0] += 1
        return step(*args, **kwargs)

    put_all = scheduler_module._put_all

    def recorded(batch):
        handed.append(len(batch))
        assert len({id(stream) for stream, _ in batch}) == len(batch)
        put_all(batch)

    monkeypatch.setattr(engine, "step", counted)
    monkeypatch.setattr(scheduler_module, "_put_all", recorded)
    scheduler = Scheduler(engine)

    async def collect(stream):
        return [out async for out in stream]

    async def main():
        streams = [scheduler.submit(_item(6)) for _ in range(3)]
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        results = asyncio.run(main())
    finally:
        scheduler.close()
    for outs in results:
        assert outs[-1].result.token_ids == alone
    assert sum(handed) == sum(len(outs) for outs in results)
    # at most one hand-over per phase of a step (its joins' first tokens, its decode)
    assert len(handed) <= 2 * steps[0] and max(handed) == 3


def test_a_dead_scheduler_loop_fails_its_requests_and_the_health_check(tiny, monkeypatch):
    """``abort`` failing after a failed step (a sticky CUDA error) ends the loop: the open
    requests end with the error instead of hanging, new ones are refused, and the replica's
    health check and /healthz fail so that Serve replaces it."""
    from types import SimpleNamespace

    from serving.app import GazeChat

    _, model, processor = tiny
    engine = Engine(model, processor, max_batch_size=4)
    scheduler = Scheduler(engine)
    replica = SimpleNamespace(
        scheduler=scheduler, engine=engine, model_name="m", pending=0, preparing=0
    )
    chat = GazeChat.func_or_class
    chat.check_health(replica)

    def sticky(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def main():
        monkeypatch.setattr(engine, "_decode", sticky)
        monkeypatch.setattr(engine, "abort", sticky)
        outs = await asyncio.wait_for(collect(scheduler.submit(_item(6))), timeout=30)
        with pytest.raises(RuntimeError, match="scheduler loop is dead"):
            scheduler.submit(_item(6))
        return outs

    async def collect(stream):
        return [out async for out in stream]

    try:
        outs = asyncio.run(main())
        assert "illegal memory access" in str(outs[-1].error)
        assert not scheduler.alive
        with pytest.raises(RuntimeError, match="scheduler loop is dead"):
            chat.check_health(replica)
        health = asyncio.run(chat.healthz(replica))
        assert health.status_code == 503
    finally:
        scheduler.close()


def test_requests_are_prepared_in_other_processes(tiny):
    """The preparer's workers are processes of their own (a long prompt's encoding there
    cannot hold the decode loop's GIL), all started with it (not at the first requests that
    find none idle), and prepare exactly what ``prepare`` does here, client errors included."""
    import concurrent.futures
    import os
    import signal

    from serving.requests import Preparer

    path, _, processor = tiny
    settings = ServeSettings(model=str(path), max_tokens_limit=16)
    preparer = Preparer(settings, processor, "m", 2, workers=2)
    try:
        assert len(set(preparer.pids)) == 2 and os.getpid() not in preparer.pids
        assert preparer._pool.submit(os.getpid).result(timeout=120) in preparer.pids
        data = {"model": "m", "messages": user(image_part(data_url(image_bytes(2))))}
        body = ChatCompletionRequest.model_validate(data | {"max_tokens": 3})
        there = preparer.submit(body).result(timeout=120)
        here = prepare(body, settings, processor, "m", 2)
        assert there.sample.input_ids.tolist() == here.sample.input_ids.tolist()
        for key, value in here.sample.vision.items():
            assert (there.sample.vision[key] == value).all()
        assert there.prompt_tokens == here.prompt_tokens
        too_many = ChatCompletionRequest.model_validate(data | {"max_tokens": 17})
        with pytest.raises(BadRequest, match="limit of 16") as err:
            preparer.submit(too_many).result(timeout=60)
        assert err.value.param == "max_tokens"
        # a worker that dies (out of memory) breaks the pool: a new one serves what follows
        os.kill(preparer.pids[0], signal.SIGKILL)
        for _ in range(3):
            try:
                again = preparer.submit(body).result(timeout=120)
                break
            except concurrent.futures.process.BrokenProcessPool:
                continue  # submitted before the pool knew: failed, as the requests it held
        else:
            pytest.fail("no request was served after a worker died")
        assert again.sample.input_ids.tolist() == here.sample.input_ids.tolist()
    finally:
        preparer.close()
