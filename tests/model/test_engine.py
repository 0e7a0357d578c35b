"""Continuous batching (gazeattn.engine): sequences join and leave a running batch.

The golden check: for a set of image, video and text prompts, greedy output from the engine
is the same alone, in a busy batch that other sequences join and leave, from
``generate_batch``, and from transformers' ``generate`` on the exported checkpoint loaded
through the Auto classes. The tiny random checkpoints are sharpened (decoder weights x4) so
their greedy tokens depend on the prompt: unsharpened, the Qwen-VL ones repeat one token
whatever they read, and would hide a wrong position or a wrong row.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from gazeattn import cache as cache_module
from gazeattn.cache import BatchCache
from gazeattn.engine import Engine
from gazeattn.generation import (
    GazeCache,
    GenerationRequest,
    InvalidRequest,
    generate_batch,
    stream_generate,
)
from gazeattn.model import load_model
from gazeattn.ops import GazeConfig
from gazeattn.prefix_cache import CachedPrefixes, visual_prefix
from gazeattn.sample import EncodedSample
from tests.model.conftest import image_chat, random_image, video_chat

FAMILIES = ("llava", "qwen2.5-vl")


def _sharpen(model) -> None:
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(4.0)


@pytest.fixture(scope="module")
def exported(gaze_dirs, tmp_path_factory):
    """family -> the directory of a sharpened gaze checkpoint, saved as an export is."""
    out = {}
    for family in FAMILIES:
        model, processor = load_model(gaze_dirs[family])
        _sharpen(model)
        path = tmp_path_factory.mktemp(f"export-{family}")
        model.save_pretrained(path)
        processor.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="module")
def loaded(exported):
    return {family: load_model(path) for family, path in exported.items()}


def golden() -> list[GenerationRequest]:
    return [
        GenerationRequest(
            messages=image_chat(answer=None), images=[random_image(1)], max_new_tokens=7
        ),
        GenerationRequest(
            messages=[{"role": "user", "content": "describe the scene"}], max_new_tokens=5
        ),
        GenerationRequest(
            messages=video_chat(), videos=[[random_image(s) for s in range(3)]], max_new_tokens=6
        ),
        GenerationRequest(
            messages=image_chat("which is larger?", answer=None, n_images=2),
            images=[random_image(4), random_image(5, (70, 30))],
            max_new_tokens=8,
        ),
    ]


def _hf_generate(path, request: GenerationRequest) -> list[int]:
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(request.messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=list(request.images), videos=list(request.videos))
    out = model.generate(
        **inputs,
        cache=GazeCache(),
        max_new_tokens=request.max_new_tokens,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _staggered(engine: Engine, requests, **options) -> list:
    """Submit one request per step, so each joins a batch that is already decoding."""
    seqs, results = [], {}
    pending = list(requests)
    while pending or len(results) < len(seqs):
        if pending:
            seqs.append(engine.submit(pending.pop(0), **options))
        for out in engine.step():
            assert out.error is None, out.error
            if out.result is not None:
                results[out.sequence.id] = out.result
    return [results[s.id] for s in seqs]


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    """The batch cache does not clear its new buffers; here they start as NaN, so a row that
    reads a column nothing wrote (padding, a moved or grown buffer) ends with NaN logits and
    differs from its reference in every test of this module."""
    monkeypatch.setattr(
        cache_module, "_buffer", lambda size, like: torch.full(size, math.nan, dtype=like.dtype)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_the_same_alone_in_a_busy_batch_and_in_generate(family, exported, loaded):
    model, processor = loaded[family]
    engine = Engine(model, processor, max_batch_size=4)
    alone = [engine.run([r])[0].token_ids for r in golden()]
    assert len({tuple(t) for t in alone}) == len(alone), "the prompts must give different outputs"
    # a long-running sequence that the golden requests join and leave around
    busy = GenerationRequest(
        messages=video_chat("and then?"),
        videos=[[random_image(s) for s in range(10, 14)]],
        max_new_tokens=30,
    )
    joined = _staggered(engine, [busy, *golden()])[1:]
    assert [r.token_ids for r in joined] == alone
    reversed_order = _staggered(engine, list(reversed(golden())))
    assert [r.token_ids for r in reversed_order][::-1] == alone
    together = engine.run(golden())
    assert [r.token_ids for r in together] == alone
    reference = [generate_batch(model, processor, [r])[0] for r in golden()]
    assert [r.token_ids for r in reference] == alone
    assert [r.text for r in together] == [r.text for r in reference]
    for request, tokens in zip(golden(), alone, strict=True):
        assert _hf_generate(exported[family], request)[: len(tokens)] == tokens
    assert engine.num_running == 0 and engine.cache.rows == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_alone_equal_logprobs_in_a_batch(family, loaded):
    model, processor = loaded[family]
    engine = Engine(model, processor, max_batch_size=4)
    asked = [replace(r, top_logprobs=3) for r in golden()]
    alone = [engine.run([r])[0] for r in asked]
    batched = _staggered(engine, asked)
    for one, many in zip(alone, batched, strict=True):
        assert len(one.logprobs) == one.completion_tokens
        for a, b in zip(one.logprobs, many.logprobs, strict=True):
            assert a.token_id == b.token_id == a.top[0][0]  # greedy: the most likely token
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.logprob <= 0
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == sorted((v for _, v in a.top), reverse=True)


def test_seeded_sampling_in_a_mixed_batch(loaded):
    model, processor = loaded["llava"]
    engine = Engine(model, processor)

    def sampled(seed):
        return GenerationRequest(
            messages=image_chat(answer=None),
            images=[random_image(3)],
            max_new_tokens=8,
            temperature=1.2,
            top_p=0.9,
            seed=seed,
        )

    alone = engine.run([sampled(7)])[0].token_ids
    mixed = _staggered(engine, [golden()[0], sampled(7), golden()[2], sampled(8)])
    assert mixed[1].token_ids == alone
    assert mixed[0].token_ids == engine.run([golden()[0]])[0].token_ids
    assert mixed[3].token_ids != alone


def test_stop_strings_never_reach_the_output(loaded):
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    request = golden()[0]
    full = engine.run([request])[0].text
    assert len(full) > 6
    for stop in (full[3:6], full[2], full[-2:]):
        stopped = GenerationRequest(
            messages=request.messages, images=request.images, max_new_tokens=7, stop=(stop,)
        )
        seq = engine.submit(stopped)
        deltas, result = [], None
        while result is None:
            for out in engine.step():
                deltas.append(out.text)
                result = out.result or result
        streamed = "".join(deltas)
        assert stop not in streamed and stop not in result.text
        assert streamed == result.text == full[: full.index(stop)]
        assert result.finish_reason == "stop" and seq.done
        assert generate_batch(model, processor, [stopped])[0].text == result.text
        # the library's one-request stream holds the stop string back too
        pieces, stream = [], stream_generate(model, processor, stopped)
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as done:
                assert done.value.text == result.text
                break
        assert "".join(pieces) == result.text


def test_cancel_frees_the_slot_and_spares_the_others(loaded):
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    requests = golden()
    seqs = [engine.submit(r) for r in requests]
    engine.step()
    assert engine.num_running == len(requests)
    engine.cancel(seqs[2])
    results = {}
    while len(results) < len(requests) - 1:
        for out in engine.step():
            assert out.sequence is not seqs[2]
            if out.result is not None:
                results[out.sequence.id] = out.result.token_ids
        assert seqs[2] not in engine.running
    for i in (0, 1, 3):
        assert results[seqs[i].id] == engine.run([requests[i]])[0].token_ids


def test_prefill_is_bounded_and_running_rows_keep_streaming(loaded):
    model, processor = loaded["llava"]
    # chunks off: a prompt larger than the budget is prefilled alone, in a step of its own
    engine = Engine(model, processor, max_batch_size=3, max_prefill_tokens=1, chunked_prefill=False)
    long = GenerationRequest(
        messages=image_chat(answer=None), images=[random_image(1)], max_new_tokens=12
    )
    first = engine.submit(long)
    engine.step()
    others = [engine.submit(r) for r in golden()]
    for _ in range(4):
        outputs = engine.step()
        # one newcomer prefilled per step, and the running sequence got its token
        assert sum(o.sequence in others and not o.sequence.tokens[1:] for o in outputs) <= 1
        assert sum(o.sequence is first for o in outputs) == 1
        assert engine.num_running <= 3
    while engine.has_work:
        engine.step()
        assert engine.num_running <= 3
    assert all(s.done for s in others)


def test_one_failing_prefill_ends_only_its_request(loaded, monkeypatch):
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    good = [engine.submit(r) for r in golden()[:2]]
    bad = engine.submit(golden()[2])

    prefill = engine.runner.prefill

    def fail_on_bad(seq):
        if seq is bad:
            raise ValueError("broken pixels")
        return prefill(seq)

    monkeypatch.setattr(engine.runner, "prefill", fail_on_bad)
    forward = model.forward

    def fail_together(*args, **kwargs):
        # the three arrive together: their batched prefill fails (a bad image among them),
        # then each is prefilled alone
        if kwargs["input_ids"].shape[0] > 1 and kwargs["input_ids"].shape[1] > 1:
            raise ValueError("broken pixels")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fail_together)
    errors, results = [], {}
    while engine.has_work:
        for out in engine.step():
            if out.error is not None:
                errors.append((out.sequence, str(out.error)))
            elif out.result is not None:
                results[out.sequence.id] = out.result.token_ids
    assert errors == [(bad, "broken pixels")]
    monkeypatch.undo()
    assert [results[s.id] for s in good] == [engine.run([r])[0].token_ids for r in golden()[:2]]


def test_penalties_and_logit_bias(loaded):
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    request = golden()[1]
    plain = engine.run([request])[0].token_ids
    forced = plain[0] + 1
    biased = engine.run([replace(request, logit_bias={forced: 100.0})])[0].token_ids
    assert biased == [forced] * len(plain)
    avoided = engine.run([replace(request, logit_bias={plain[0]: -100.0})])[0].token_ids
    assert avoided[0] != plain[0]
    # the penalised logits, on a row that generated [5, 5, 9]
    seq = engine.submit(replace(request, presence_penalty=0.5, frequency_penalty=1.0))
    seq.tokens = [5, 5, 9]
    logits = torch.zeros(1, model.get_output_embeddings().weight.shape[0])
    adjusted = engine.sampler.adjusted([seq], logits)
    assert adjusted[0, 5] == -2.5 and adjusted[0, 9] == -1.5 and adjusted[0, 10] == 0
    engine.cancel(seq)
    engine.step()
    with pytest.raises(InvalidRequest, match="logit_bias") as err:
        engine.submit(replace(request, logit_bias={10**9: 1.0}))
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidRequest, match="presence_penalty") as err:
        engine.submit(replace(request, presence_penalty=3.0))
    assert err.value.param == "presence_penalty"
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        engine.submit(replace(request, top_logprobs=21))


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_models_decode_in_the_engine_as_in_generate(family, stock_dirs):
    model, processor = load_model(stock_dirs[family])
    _sharpen(model)
    engine = Engine(model, processor, max_batch_size=4)
    requests = [golden()[0], golden()[3], golden()[1]]
    alone = [engine.run([r])[0].token_ids for r in requests]
    assert [r.token_ids for r in _staggered(engine, requests)] == alone
    for request, tokens in zip(requests, alone, strict=True):
        prompt = processor.apply_chat_template(request.messages, add_generation_prompt=True)
        inputs = dict(processor(text=prompt, images=list(request.images)))
        inputs.pop("gaze_layout")
        if family.startswith("qwen"):
            inputs["mm_token_type_ids"] = engine.runner.token_types(inputs["input_ids"])
        out = model.generate(
            **inputs,
            max_new_tokens=request.max_new_tokens,
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        assert out[0, inputs["input_ids"].shape[1] :].tolist()[: len(tokens)] == tokens


def _recomputed(model, processor, request: GenerationRequest, tokens: list[int]):
    """Greedy tokens and, per token, the last query's gaze stats and routed regions from a
    full forward over the prompt and the tokens so far (no decode cache): the reference the
    engine's cached decoding is checked against."""
    from gazeattn.runner import _boxes

    sample = processor.encode_sample(
        request.messages, images=request.images, videos=request.videos, add_generation_prompt=True
    )
    greedy, attended, routing = [], [], []
    layer = len(model.model.language_model.layers) - 1
    with torch.no_grad():
        for i in range(len(tokens)):
            batch = processor.collate([sample.followed_by(tokens[:i])])
            batch.pop("labels")
            cache = GazeCache()
            out = model(**batch, cache=cache, use_cache=True, gaze_report=True, gaze_selection=True)
            greedy.append(int(out.logits[0, -1].argmax()))
            stats = cache.gaze_state.stats
            attended.append(
                np.mean([float(s.attended[0, :, -1].float().mean()) for s in stats.values()])
            )
            boxes = batch["gaze_layout"].regions.box[0]
            chosen = stats[layer].selected  # None where the layer ran dense
            routing.append([] if chosen is None else _boxes(chosen[0, :, -1], boxes))
    return greedy, float(np.mean(attended)), routing


def test_dense_twin_in_the_engine_equals_a_full_recompute(loaded):
    model, processor = loaded["llava"]
    saved = model.gaze_config
    model.gaze_config = GazeConfig(top_k="all", backend="dense")
    try:
        engine = Engine(model, processor)
        for request, ours in zip(golden(), _staggered(engine, golden()), strict=True):
            greedy, _, _ = _recomputed(model, processor, request, ours.token_ids)
            assert greedy == ours.token_ids
    finally:
        model.gaze_config = saved


def test_batch_cache_rows_join_move_and_leave():
    """The cache views equal left-padded stacks of each row's keys as rows come and go (a
    view showing a column nothing wrote holds NaN: see ``_nan_buffers``)."""
    gen = torch.Generator().manual_seed(0)
    cache = BatchCache(num_layers=2)
    rows: list[torch.Tensor] = []  # each row's keys [H, T_i, D]

    def check():
        total = cache.layers[0].get_seq_length()
        expect = torch.zeros(len(rows), 2, total, 4)
        for i, row in enumerate(rows):
            expect[i, :, total - row.shape[1] :] = row
        for layer in cache.layers:
            assert torch.equal(layer.keys, expect) and torch.equal(layer.values, -expect)

    def join(length):
        keys = torch.randn(1, 2, length, 4, generator=gen)
        cache.insert([(keys, -keys), (keys, -keys)], max_rows=3)
        rows.append(keys[0])
        check()

    def step():
        new = torch.randn(len(rows), 2, 1, 4, generator=gen)
        for layer in cache.layers:
            layer.update(new, -new)
        for i in range(len(rows)):
            rows[i] = torch.cat([rows[i], new[i]], dim=1)
        check()

    join(5)
    step()
    join(3)  # shorter: right-aligned, padded on the left
    join(400)  # longer than the batch and than the buffer's headroom: everyone moves
    for _ in range(300):  # past the buffer's end: it grows
        step()
    cache.keep([2, 1])  # the first row leaves, the last takes its slot
    rows[:] = [rows[2], rows[1]]
    check()
    used = max(r.shape[1] for r in rows)
    cache.trim_left(cache.layers[0].get_seq_length() - used)
    check()
    join(2)
    join(9)  # a fourth row: the row capacity grows
    step()
    cache.keep([])
    rows.clear()
    join(7)  # an idle buffer is reused
    step()
    with pytest.raises(ValueError, match="rows"):
        cache.layers[0].update(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))


def test_generated_video_prompt_routes_as_a_full_recompute(loaded):
    """The gaze report (entries attended, routed boxes) of the engine's cached decoding is
    that of a full forward at each step."""
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    request = golden()[2]
    ours = _staggered(engine, [golden()[0], request], return_routing=True)[1]
    greedy, attended, routing = _recomputed(model, processor, request, ours.token_ids)
    assert greedy == ours.token_ids
    assert ours.attended_mean == pytest.approx(attended)
    assert ours.dense_mean == 3 * (144 + 4)
    assert ours.routing == routing and all(ours.routing) and ours.grids == [[3, 12, 12]]
    assert np.isfinite(ours.attended_mean) and ours.attended_mean < ours.dense_mean


def _drain(engine: Engine) -> tuple[dict, dict]:
    """Step until idle: sequence id -> token ids, and sequence id -> error."""
    results, errors = {}, {}
    while engine.has_work:
        for out in engine.step():
            if out.error is not None:
                errors[out.sequence.id] = out.error
            elif out.result is not None:
                results[out.sequence.id] = out.result.token_ids
    return results, errors


def test_a_row_that_fails_in_sampling_ends_alone(loaded, monkeypatch):
    """NaN logits in one row (sampled, so the sampler raises) end that request only."""
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    requests = golden()[:3]
    requests[1] = GenerationRequest(
        messages=requests[1].messages, max_new_tokens=5, temperature=0.7, seed=3
    )
    seqs = [engine.submit(r) for r in requests]
    decode = engine.runner.decode

    def poisoned():
        logits, rows = decode(), engine.running
        if seqs[1] in rows:
            logits[rows.index(seqs[1])] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "decode", poisoned)
    results, errors = _drain(engine)
    assert list(errors) == [seqs[1].id] and "non-finite" in str(errors[seqs[1].id])
    monkeypatch.undo()
    for i in (0, 2):
        assert results[seqs[i].id] == engine.run([requests[i]])[0].token_ids


def test_temperatures_that_vanish_in_float32_are_refused(loaded):
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    ask = golden()[1]
    with pytest.raises(InvalidRequest, match="float32") as err:
        engine.submit(GenerationRequest(messages=ask.messages, temperature=1e-46))
    assert err.value.param == "temperature"
    # the smallest float32 temperature is greedy in effect
    tiny = GenerationRequest(messages=ask.messages, max_new_tokens=4, temperature=1e-45, seed=0)
    greedy = GenerationRequest(messages=ask.messages, max_new_tokens=4)
    assert engine.run([tiny])[0].token_ids == engine.run([greedy])[0].token_ids


def test_a_join_that_fails_at_its_second_layer_leaves_the_batch_whole(loaded, monkeypatch):
    """An out-of-memory while one layer of the batch cache takes the new row: the newcomer
    ends with the error, the running rows decode on as if it never came."""
    model, processor = loaded["llava"]
    engine = Engine(model, processor)
    requests = golden()
    running = [engine.submit(r) for r in requests[:2]]
    engine.step()
    layer = engine.cache.layers[1]
    insert = layer.insert

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the new row")

    monkeypatch.setattr(layer, "insert", out_of_memory)
    newcomer = engine.submit(requests[3])
    failed = [out for out in engine.step() if out.error is not None]
    assert [out.sequence for out in failed] == [newcomer]
    assert isinstance(failed[0].error, torch.OutOfMemoryError)
    monkeypatch.setattr(layer, "insert", insert)
    late = engine.submit(requests[2])
    results, errors = _drain(engine)
    assert not errors
    for seq, request in [*zip(running, requests[:2], strict=True), (late, requests[2])]:
        assert results[seq.id] == engine.run([request])[0].token_ids


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """family -> a sharpened tiny gaze model of the Qwen3 families the engine batches."""
    from gazeattn.tiny import build_tiny

    out = {}
    for family in ("qwen3-vl", "qwen3.5"):
        path = build_tiny(
            tmp_path_factory.mktemp(family),
            family=family,
            gaze_config=GazeConfig(keep_ratio=0.3, num_context_tokens=4),
        )
        model, processor = load_model(path)
        _sharpen(model)
        out[family] = (model.eval(), processor)
    return out


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3.5"])
def test_qwen3_families_decode_in_the_engine_as_in_generate(qwen3, family):
    """DeepStack (Qwen3-VL) and a hybrid decoder whose linear-attention layers keep a
    recurrent state per row (Qwen3.5): greedy output alone, in a busy batch that rows join
    and leave, and from generate_batch is the same, and routing is reported at a layer that
    routes; a linear-attention layer is refused by name."""
    from gazeattn.modeling import routed_layers

    model, processor = qwen3[family]
    requests = golden()
    engine = Engine(model, processor, max_batch_size=3)
    alone = [engine.run([r])[0].token_ids for r in requests]
    busy = _staggered(engine, requests, return_routing=True)
    assert [r.token_ids for r in busy] == alone
    expected = generate_batch(model, processor, requests)
    assert [r.token_ids for r in expected] == alone
    assert all(r.routing and any(r.routing) for r in busy[:1])
    layers = routed_layers(model)
    linear = [i for i in range(model.config.text_config.num_hidden_layers) if i not in layers]
    assert bool(linear) == (family == "qwen3.5")
    for layer in linear:
        with pytest.raises(InvalidRequest, match="does not route"):
            engine.submit(requests[0], return_routing=True, routing_layer=layer)


def _one_picture_questions(seed: int = 21) -> list[GenerationRequest]:
    """Several users asking different questions about one picture (one prefix)."""
    image = random_image(seed, (40, 56))
    asks = ("what colour is it?", "where is the circle?", "how many shapes are there?")
    return [
        GenerationRequest(messages=image_chat(q, answer=None), images=[image], max_new_tokens=6)
        for q in asks
    ]


def _stock(family: str, stock_dirs, root):
    """A sharpened stock model of ``family`` (built under ``root`` when not in stock_dirs)."""
    from gazeattn.tiny import build_stock

    path = stock_dirs.get(family) or build_stock(root / family, family=family)
    model, processor = load_model(path)
    _sharpen(model)
    return model.eval(), processor


@pytest.mark.parametrize(
    "family",
    [*FAMILIES, "qwen3-vl", "qwen3.5"] + [f"stock-{f}" for f in (*FAMILIES, "qwen3-vl", "qwen3.5")],
)
def test_prefix_cache_hits_answer_as_a_cold_prefill(family, loaded, qwen3, stock_dirs, tmp_path):
    """Prompts that share their images or video reuse the prefilled prefix (keys and values,
    descriptors, rotary deltas, a hybrid decoder's recurrent states): greedy output is the
    same as without the cache, alone or in a busy batch, and a hit reports its tokens. A
    stock model's suffix takes the whole prompt's M-RoPE positions (golden()[2], a video,
    answered wrongly on Qwen2.5-VL when it continued from the prefix's delta)."""
    if family.startswith("stock-"):
        model, processor = _stock(family.removeprefix("stock-"), stock_dirs, tmp_path)
    else:
        model, processor = loaded[family] if family in loaded else qwen3[family]
    requests = [*golden(), *_one_picture_questions()]
    cold = [r.token_ids for r in Engine(model, processor).run(requests)]
    assert len({tuple(t) for t in cold[-3:]}) > 1, "the questions must give different answers"
    engine = Engine(model, processor, max_batch_size=3, prefix_cache_bytes=2**30)
    first = engine.run(requests)
    again = _staggered(engine, requests)
    assert [r.token_ids for r in first] == cold == [r.token_ids for r in again]
    media = [bool(r.images or r.videos) for r in requests]
    # the first pass: the picture's later questions hit; the second: every media prompt
    assert [r.cached_tokens > 0 for r in first] == [False] * len(golden()) + [False, True, True]
    assert [r.cached_tokens > 0 for r in again] == media
    assert all(r.cached_tokens < r.prompt_tokens for r in again)
    stats = engine.prefix_cache.stats
    assert stats.hits == 2 + sum(media) and stats.entries == sum(media[: len(golden())]) + 1
    assert stats.cached_tokens == sum(r.cached_tokens for r in [*first, *again])
    assert engine.num_running == 0 and engine.cache.rows == 0


def test_a_prefix_digest_computed_before_submit_hits_as_the_engines_own(loaded):
    """A server hashes the prefix where it encodes the request (``visual_prefix`` on the
    sample): its key is the engine's, so such a prompt and one the engine hashes itself share
    the entry; a sample cut or extended in its text forgets its digest."""
    model, processor = loaded["llava"]
    first, second = _one_picture_questions(23)[:2]
    engine = Engine(model, processor, prefix_cache_bytes=2**30)
    engine.run([first])
    sample = processor.encode_sample(
        second.messages, images=second.images, add_generation_prompt=True
    )
    length, digest = visual_prefix(sample, processor)
    seq = engine.submit(second, sample=sample)
    while not seq.done:
        engine.step()
    assert seq.cached_tokens == length and engine.prefix_cache.stats.hits == 1
    assert sample.followed_by([1, 2]).prefix is None
    assert sample.truncated_to(len(sample) - 1).prefix is None
    assert visual_prefix(sample.followed_by([1, 2]), processor) == (length, digest)


@pytest.mark.parametrize(
    "family", [*FAMILIES, "qwen3-vl", "qwen3.5", "stock-qwen2.5-vl", "stock-qwen3-vl"]
)
def test_a_prompt_without_its_pixels_prefills_on_its_held_prefix(
    family, loaded, qwen3, stock_dirs, tmp_path
):
    """A server leaves out the pixel inputs of a prompt whose prefix is cached and holds the
    entry (``cached_prefixes``, ``without_pixels``, ``hold_prefix``): it answers as a cold
    prefill does, also when the entry is evicted before its prefill. Such a sample without a
    hold is refused; one whose prefix is not cached gets none."""
    if family.startswith("stock-"):
        model, processor = _stock(family.removeprefix("stock-"), stock_dirs, tmp_path)
    else:
        model, processor = loaded[family] if family in loaded else qwen3[family]
    first, second, third = _one_picture_questions(24)
    cold = [r.token_ids for r in Engine(model, processor).run([second, third])]
    engine = Engine(model, processor, prefix_cache_bytes=2**30)
    engine.run([first])
    whole, bare = _bare(second, processor)
    assert bare.prefix == whole.prefix and bare.prefix[1] in engine.cached_prefixes()
    pixels = set(processor.rules.pixel_names)  # the grids stay
    assert pixels & set(whole.vision) and set(bare.vision) == set(whole.vision) - pixels
    with pytest.raises(ValueError, match="prefix_hold"):
        engine.submit(second, sample=bare)
    (held,) = engine.run([second], sample=bare, prefix_hold=engine.hold_prefix(bare))
    _, bare = _bare(third, processor)
    hold = engine.hold_prefix(bare)
    engine.prefix_cache.clear()  # evicted between the hold and the prefill
    assert not engine.cached_prefixes().keys and engine.hold_prefix(bare) is None
    (evicted,) = engine.run([third], sample=bare, prefix_hold=hold)
    assert [held.token_ids, evicted.token_ids] == cold
    assert held.cached_tokens == evicted.cached_tokens == bare.prefix[0] > 0
    # the keys are the engine's: the same digest under other settings is not among them
    engine.run([first])
    assert bare.prefix[1] in engine.cached_prefixes()
    other = CachedPrefixes(settings="other", keys=engine.cached_prefixes().keys)
    assert bare.prefix[1] not in other
    with pytest.raises(ValueError, match="pixel inputs"):
        visual_prefix(bare.followed_by([1]), processor)


def _bare(request: GenerationRequest, processor) -> tuple[EncodedSample, EncodedSample]:
    """``request``'s encoded prompt, its prefix hashed, and the same without its pixels."""
    sample = processor.encode_sample(
        request.messages, images=request.images, add_generation_prompt=True
    )
    visual_prefix(sample, processor)
    return sample, sample.without_pixels(processor.rules.pixel_names)


def test_prefix_cache_evicts_the_least_recent_and_never_fails(loaded):
    """Over its budget the cache drops its least recently used prefixes (answers unchanged
    after an eviction); a prefix larger than the whole budget is served uncached."""
    model, processor = loaded["llava"]
    a, b = _one_picture_questions(21), _one_picture_questions(22)
    cold = [r.token_ids for r in Engine(model, processor).run([*a, *b])]
    probe = Engine(model, processor, prefix_cache_bytes=2**30)
    probe.run(a[:1])
    one = probe.prefix_cache.stats.bytes
    engine = Engine(model, processor, prefix_cache_bytes=int(1.5 * one))  # room for one
    order = [a[0], b[0], a[1], b[1], b[2], a[2]]
    results = engine.run(order)
    expected = [cold[0], cold[3], cold[1], cold[4], cold[5], cold[2]]
    assert [r.token_ids for r in results] == expected
    assert [r.cached_tokens > 0 for r in results] == [False, False, False, False, True, False]
    stats = engine.prefix_cache.stats
    assert stats.entries == 1 and stats.evictions == 4 and stats.bytes == one
    tiny = Engine(model, processor, prefix_cache_bytes=one // 2)
    assert [r.token_ids for r in tiny.run(a)] == cold[:3]
    assert tiny.prefix_cache.stats.entries == 0 and tiny.prefix_cache.stats.hits == 0


@pytest.mark.parametrize(
    "family", [*FAMILIES, "qwen3-vl", "stock-llava", "stock-qwen2.5-vl", "stock-qwen3-vl"]
)
def test_chunked_prefill_answers_as_one_prefill(family, loaded, qwen3, stock_dirs, tmp_path):
    """A prompt prefilled in chunks of a few tokens (cut inside images, frames and text)
    answers as one prefill of it does, with and without the prefix cache, alone and in a
    busy batch; routing reported at its prompt's end is the same too. A stock model's
    chunks run its decoder on transformers' own inputs of the whole prompt."""
    if family.startswith("stock-"):
        model, processor = _stock(family.removeprefix("stock-"), stock_dirs, tmp_path)
    else:
        model, processor = loaded[family] if family in loaded else qwen3[family]
    requests = [*golden(), *_one_picture_questions()]
    whole = Engine(model, processor, chunked_prefill=False).run(requests, return_routing=True)
    for cache_bytes in (0, 2**30):
        engine = Engine(
            model, processor, max_batch_size=3, max_prefill_tokens=13,
            prefix_cache_bytes=cache_bytes,
        )  # fmt: skip
        chunked = _staggered(engine, requests, return_routing=True)
        assert [r.token_ids for r in chunked] == [r.token_ids for r in whole]
        assert [r.routing for r in chunked] == [r.routing for r in whole]
        assert engine.chunks_run > len(requests)
        assert engine.num_running == 0 and engine.prefilling is None


@pytest.mark.parametrize("kind", ["gaze", "stock"])
def test_a_long_prompt_prefills_in_chunks_between_decode_steps(kind, loaded, stock_dirs):
    """While a long video prompt prefills, a chunk per step, the running sequence gets a
    token at every step: its inter-token latency is bounded by a chunk, not the prompt."""
    model, processor = loaded["llava"] if kind == "gaze" else _stock("llava", stock_dirs, None)
    budget = 16
    engine = Engine(model, processor, max_batch_size=4, max_prefill_tokens=budget)
    stops = {i: -100.0 for i in processor.stop_token_ids}
    running = engine.submit(
        GenerationRequest(
            messages=[{"role": "user", "content": "describe"}], max_new_tokens=200, logit_bias=stops
        )
    )
    while not running.tokens:
        engine.step()
    video = GenerationRequest(
        messages=video_chat(),
        videos=[[random_image(s) for s in range(3)]],
        max_new_tokens=8,
        logit_bias=stops,
    )
    long = engine.submit(video)
    chunks = 0
    while not long.tokens:
        before = len(running.tokens)
        engine.step()
        chunks += 1
        assert len(running.tokens) == before + 1  # it decoded in this step
        assert engine.num_running == (1 if not long.tokens else 2)
    assert long.prompt_tokens > 4 * budget
    assert chunks == -(-long.prompt_tokens // budget) == engine.chunks_run
    assert not running.done


def test_a_prefix_hit_shares_the_entrys_keys_and_never_writes_them():
    """A hit's cache holds the entry's key and value tensors (no copy of a long video's keys
    per hit); extending it, as the suffix's prefill does, leaves the entry as it was."""
    from transformers.cache_utils import DynamicCache

    from gazeattn.prefix_cache import PrefixCache

    gen = torch.Generator().manual_seed(3)
    cache = DynamicCache()
    for layer in range(2):
        keys = torch.randn(1, 2, 5, 4, generator=gen)
        cache.update(keys, -keys, layer)
    store = PrefixCache(2**20)
    store.put("p", cache, 5)
    entry = store._entries["p"].cache
    held = [(layer.keys.clone(), layer.values.clone()) for layer in entry.layers]
    hit = store.get("p")
    assert all(a.keys is b.keys for a, b in zip(hit.layers, entry.layers, strict=True))
    for layer in range(2):
        hit.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), layer)
    assert hit.get_seq_length() == 8 and entry.get_seq_length() == 5
    for layer, (keys, values) in zip(entry.layers, held, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_cpu_batch_cache_reserves_its_rows_at_the_first_join(monkeypatch):
    """On CPU the first buffer holds every row the batch may have (no copy to grow it later),
    unless that is more than ``CPU_RESERVE_BYTES``: then it starts at 4 rows and grows."""
    import gazeattn.cache as cache_module

    keys = torch.zeros(1, 2, 10, 4)
    roomy = BatchCache(num_layers=1)
    roomy.insert([(keys, keys)], max_rows=16)
    assert roomy.layers[0].kbuf.shape[0] == 16
    monkeypatch.setattr(cache_module, "CPU_RESERVE_BYTES", 1)
    tight = BatchCache(num_layers=1)
    tight.insert([(keys, keys)], max_rows=16)
    assert tight.layers[0].kbuf.shape[0] == 4
