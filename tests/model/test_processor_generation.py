"""GazeProcessor encoding, labels and errors; generation with the gaze cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from gazeattn.generation import GazeCache, GenerationRequest, generate_batch, stream_generate
from gazeattn.model import load_model
from gazeattn.ops import TokenKind
from gazeattn.processing import ProcessorInputError, SequenceTooLong
from tests.model.conftest import image_chat, random_image, video_chat


@pytest.fixture(scope="module")
def gaze(gaze_dir):
    return load_model(gaze_dir)


def test_labels_only_on_assistant_turns(gaze):
    _, processor = gaze
    messages = [
        {"role": "system", "content": "you are helpful"},
        *image_chat(answer="red circle"),
        {"role": "user", "content": "and the square?"},
        {"role": "assistant", "content": "blue"},
    ]
    sample = processor.encode_sample(messages, images=[random_image(0)])
    labelled = sample.labels != -100
    text = processor.tokenizer.decode(sample.input_ids[labelled])
    assert text == "red circle<|im_end|>blue<|im_end|>"
    assert (sample.labels[labelled] == sample.input_ids[labelled]).all()


def test_layout_matches_tokens(gaze):
    _, processor = gaze
    sample = processor.encode_sample(video_chat(), videos=[[random_image(i) for i in range(3)]])
    batch = processor.collate(
        [sample, processor.encode_sample(image_chat(), images=[random_image(9)])]
    )
    layout = batch["gaze_layout"]
    ids = batch["input_ids"]
    assert torch.equal(layout.kinds == TokenKind.VISUAL, ids == processor.image_token_id)
    assert torch.equal(layout.kinds == TokenKind.CONTEXT, ids == processor.context_token_id)
    assert torch.equal(layout.kinds == TokenKind.PAD, batch["attention_mask"] == 0)
    assert batch["pixel_values"].shape == (4, 3, 96, 96)
    assert layout.spans[0][0].grid == (3, 12, 12) and layout.spans[0][0].is_video


def test_hf_style_call_and_chat_template(gaze):
    _, processor = gaze
    prompt = processor.apply_chat_template(image_chat(answer=None), add_generation_prompt=True)
    assert "<image>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    batch = processor(
        text=[prompt, prompt], images=[random_image(1), PILImage.new("L", (30, 20), 128)]
    )
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert batch["gaze_layout"].batch_size == 2


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p: p.encode_sample(image_chat(), images=[]), "more image placeholders"),
        (lambda p: p.encode_sample(image_chat(), images=[random_image(0)] * 2), "placeholders"),
        (lambda p: p.encode_sample([], images=[]), "empty conversation"),
        (
            lambda p: p.encode_sample(image_chat(), images=[np.zeros((4, 4, 3), np.float32)]),
            "uint8",
        ),
        (lambda p: p.encode_sample(image_chat(), images=[3.5]), "PIL image"),
        (lambda p: p.encode_sample([{"role": "robot", "content": "x"}]), "role"),
        (
            lambda p: p.encode_sample([{"role": "user", "content": "an <image> in text"}]),
            "media tokens",
        ),
        (lambda p: p.encode_sample(video_chat(), videos=[[]]), "without frames"),
        (lambda p: p(text=[" <image> <image>"], images=[random_image(0)]), "markers"),
    ],
    ids=[
        "missing-image",
        "extra-image",
        "empty",
        "float-array",
        "not-image",
        "role",
        "marker-in-text",
        "empty-video",
        "call-missing",
    ],
)
def test_processor_errors(gaze, call, match):
    _, processor = gaze
    with pytest.raises(ProcessorInputError, match=match):
        call(processor)


def test_too_long(gaze):
    _, processor = gaze
    with pytest.raises(SequenceTooLong, match="exceeds the limit of 50"):
        processor.encode_sample(image_chat(), images=[random_image(0)], max_length=50)


def _requests():
    return [
        GenerationRequest(
            messages=image_chat(answer=None), images=[random_image(1)], max_new_tokens=6
        ),
        GenerationRequest(
            messages=[{"role": "user", "content": "describe the scene"}], max_new_tokens=4
        ),
        GenerationRequest(
            messages=video_chat(), videos=[[random_image(s) for s in range(3)]], max_new_tokens=5
        ),
    ]


def test_batched_greedy_equals_one_by_one(gaze):
    model, processor = gaze
    batched = generate_batch(model, processor, _requests())
    singles = [generate_batch(model, processor, [r])[0] for r in _requests()]
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles]
    assert [r.completion_tokens for r in batched] == [6, 4, 5]
    # every request used its whole budget: each stopped for its length, none at an end token
    assert [r.finish_reason for r in batched] == ["length"] * 3


def test_generation_reports_savings_and_routing(gaze):
    model, processor = gaze
    result = generate_batch(model, processor, _requests()[2:], return_routing=True)[0]
    # 3 frames of 144 tokens and their 3 x 4 context tokens
    assert 0 < result.attended_mean < result.dense_mean == 3 * 144 + 3 * 4
    assert len(result.routing) == result.completion_tokens
    for token in result.routing:
        boxes = [r["box"] for r in token]
        assert boxes and all(b[0] == 0 and 0 <= b[1] < 3 for b in boxes)
    assert result.grids == [[3, 12, 12]]


def test_hf_generate_with_the_gaze_cache_matches(gaze):
    model, processor = gaze
    request = _requests()[0]
    ours = generate_batch(model, processor, [request])[0].token_ids
    prompt = processor.apply_chat_template(request.messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=request.images)
    out = model.generate(
        **inputs,
        cache=GazeCache(),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    assert out[0, inputs["input_ids"].shape[1] :].tolist()[: len(ours)] == ours


def test_stream_yields_the_text(gaze):
    model, processor = gaze
    request = _requests()[0]
    stream = stream_generate(model, processor, request)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            result = stop.value
            break
    assert "".join(pieces) == result.text


def _sampled(seed: int, temperature: float = 1.5) -> GenerationRequest:
    return GenerationRequest(
        messages=image_chat(answer=None),
        images=[random_image(3)],
        max_new_tokens=8,
        temperature=temperature,
        top_p=0.9,
        seed=seed,
    )


def test_sampling_is_seeded(gaze):
    model, processor = gaze
    a, b = (generate_batch(model, processor, [_sampled(7)])[0] for _ in range(2))
    assert a.token_ids == b.token_ids
    greedy = generate_batch(model, processor, [_sampled(7, temperature=0.0)])[0].token_ids
    others = [generate_batch(model, processor, [_sampled(s)])[0].token_ids for s in range(3)]
    assert any(tokens != greedy for tokens in others)
    bad = GenerationRequest(messages=image_chat(answer=None), images=[random_image(3)], top_p=0)
    with pytest.raises(ValueError, match="top_p"):
        generate_batch(model, processor, [bad])
