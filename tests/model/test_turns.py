"""Locating assistant turns for the labels: the definition, in linear time."""

from __future__ import annotations

import pytest

from gazeattn.model import load_model
from gazeattn.processing import MAX_RENDERED_TURNS, ProcessorInputError
from tests.model.conftest import FAMILIES, random_image

# a template that rewrites assistant contents as Qwen3's does (the text after "</think>"),
# which drops the markers: turns are then located by rendering each prefix
STRIPPING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
    "{% elif message['role'] == 'assistant' %}{{ content['text'].split('</think>')[-1] }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def processors(stock_dirs):
    return {family: load_model(stock_dirs[family])[1] for family in FAMILIES}


def by_definition(processor, messages: list[dict], generation_prompt: bool) -> list[tuple]:
    """The turns as the docs define them: what rendering a turn adds to the prompt asking for
    it, trailing whitespace left out, with whether an end-of-turn token must follow."""
    text = processor.render(messages, add_generation_prompt=generation_prompt)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.render(messages[:i], add_generation_prompt=True)
        turn = processor.render(messages[: i + 1])[len(before) :].rstrip()
        assert text.startswith(before + turn)
        ends = any(turn.endswith(t) for t in processor.stop_tokens)
        turns.append((len(before), len(before) + len(turn), not ends))
    return turns


def conversation(turns: int, *, system: bool = True, image: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for t in range(turns):
        content = [{"type": "text", "text": f"question {t}?"}]
        if image and t == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        answer = "" if t == 1 else f"  answer {t}\n "  # empty, and untrimmed whitespace
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("turns", [1, 2, 5])
@pytest.mark.parametrize("system", [True, False])
def test_marked_turns_equal_the_definition(processors, family, turns, system):
    processor = processors[family]
    for generation_prompt in (False, True):
        messages = conversation(turns, system=system)
        if generation_prompt:
            messages.append({"role": "user", "content": "one more?"})
        template = processor._template_messages(messages)
        text = processor._apply(template, add_generation_prompt=generation_prompt)
        found = processor._marked_turns(template, text, generation_prompt)
        assert found == by_definition(processor, messages, generation_prompt)


def test_long_conversations_render_a_bounded_number_of_times(processors, monkeypatch):
    """800 turns cost a few renderings, not two per turn (which took seconds per request)."""
    processor = processors["qwen2.5-vl"]
    calls = []
    apply = type(processor)._apply
    monkeypatch.setattr(
        type(processor), "_apply", lambda self, *a, **k: calls.append(1) or apply(self, *a, **k)
    )
    messages = conversation(400, image=False)
    sample = processor.encode_sample(messages)
    assert len(calls) <= 6
    labelled = sum(label != -100 for label in sample.labels)
    answers = processor.tokenizer("".join(f"answer {t}<|im_end|>" for t in range(400) if t != 1))[
        "input_ids"
    ]
    # every turn is labelled (its answer and the end of turn; the empty one its end of turn)
    assert labelled >= len(answers)


def test_a_template_that_drops_the_markers_is_rendered_turn_by_turn(processors):
    processor = processors["llava"]
    saved, processor.chat_template = processor.chat_template, STRIPPING_TEMPLATE
    try:
        messages = conversation(3)
        messages[2]["content"] = "<think>hm</think>red"
        template = processor._template_messages(messages)
        text = processor._apply(template)
        assert processor._marked_turns(template, text, False) is None
        _, spans = processor._assistant_spans(template, text)
        assert [text[a:b] for a, b in spans][0] == "red<|im_end|>"
        images = [random_image(0)]
        sample = processor.encode_sample(messages, images=images)
        assert any(label != -100 for label in sample.labels)
        long = conversation(MAX_RENDERED_TURNS + 1)
        long[2]["content"] = "<think>hm</think>red"
        with pytest.raises(ProcessorInputError, match="assistant turns"):
            processor.encode_sample(long, images=images)
    finally:
        processor.chat_template = saved
