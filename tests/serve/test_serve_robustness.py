"""Request values that pass a plain schema check yet used to fail inside decoding (a 500)."""

from __future__ import annotations

import json

import pytest

from gazeattn.generation import GenerationRequest, generate_batch
from gazeattn.model import load_model
from gazeattn.tiny import build_tiny
from serving.app import parse_body
from serving.errors import BadRequest, InvalidBody


def body(**kw) -> bytes:
    messages = [{"role": "user", "content": "hi"}]
    return json.dumps({"model": "m", "messages": messages, **kw}).encode()


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1], ids=["2^64", "-2^63-1"])
def test_seed_outside_the_generator_range_is_400(seed):
    with pytest.raises(InvalidBody, match="seed"):
        parse_body(body(seed=seed))


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63)], ids=["0", "2^64-1", "-2^63"])
def test_seed_inside_the_generator_range_decodes(seed):
    assert parse_body(body(seed=seed)).seed == seed


def test_a_lone_surrogate_is_a_400_and_a_pair_is_text():
    lone = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    with pytest.raises(BadRequest, match="surrogate"):
        parse_body(lone)
    pair = lone.replace(b"\\ud800", b"\\ud83d\\ude00")
    assert parse_body(pair).messages[0].content == "hi \U0001f600"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(build_tiny(tmp_path_factory.mktemp("model")))


@pytest.mark.parametrize("temperature", [1e-45, 1e-30], ids=["denormal", "1e-30"])
def test_a_tiny_temperature_decodes_like_greedy(tiny, temperature):
    model, processor = tiny
    messages = [{"role": "user", "content": "what color is the circle?"}]

    def ask(t: float, seed: int | None = None):
        request = GenerationRequest(messages=messages, max_new_tokens=5, temperature=t, seed=seed)
        return generate_batch(model, processor, [request])[0].token_ids

    assert ask(temperature, seed=1) == ask(0.0)
