"""The gaze model: padding, save/load, context tokens, routing reports, budgets, conversion.

Parity with stock transformers and cached decoding, per family: test_families.py.
"""

from __future__ import annotations

import pytest
import torch

from gazeattn.generation import GazeCache
from gazeattn.model import (
    convert_to_gaze,
    load_model,
    set_gaze_budget,
    set_gaze_top_k,
)
from gazeattn.ops import GazeConfig
from tests.model.conftest import image_chat, random_image

FP32 = dict(atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_match_single_sequences(gaze_dir):
    model, processor = load_model(gaze_dir)
    samples = [
        processor.encode_sample(image_chat(), images=[random_image(1)]),
        processor.encode_sample(
            image_chat("a much longer question about the shapes in the picture", "blue", 2),
            images=[random_image(2), random_image(3)],
        ),
    ]
    with torch.no_grad():
        singles = [model(**processor.collate([s])).logits[0] for s in samples]
        for side in ("left", "right"):
            batch = processor.collate(samples, padding_side=side)
            logits = model(**batch).logits
            for b, single in enumerate(singles):
                n = single.shape[0]
                rows = logits[b, -n:] if side == "left" else logits[b, :n]
                torch.testing.assert_close(rows, single, **FP32)


def test_save_load_round_trip(gaze_dir, tmp_path):
    model, processor = load_model(gaze_dir)
    with torch.no_grad():
        model.gaze_context.weight.add_(0.5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor2 = load_model(tmp_path)
    assert again.gaze_config == model.gaze_config == processor2.gaze_config
    sample = processor.encode_sample(image_chat(), images=[random_image(4)])
    assert (
        processor2.encode_sample(image_chat(), images=[random_image(4)]).input_ids
        == sample.input_ids
    ).all()
    batch = processor.collate([sample])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_context_tokens_change_the_answer_and_are_trained(gaze_dir):
    model, processor = load_model(gaze_dir)
    batch = processor.collate([processor.encode_sample(image_chat(), images=[random_image(8)])])
    out = model(**batch)
    out.loss.backward()
    grad = model.gaze_context.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        before = model(**batch).logits
        model.gaze_context.weight.mul_(-3.0)
        after = model(**batch).logits
    assert not torch.allclose(before, after)


def _two_image_prompt(gaze_dir):
    """A top_k=1 gaze model and a prompt with two 12 x 12 images (8 regions), ready to generate."""
    model, processor = load_model(gaze_dir, gaze=GazeConfig(top_k=1, num_context_tokens=4))
    sample = processor.encode_sample(
        image_chat(answer=None, n_images=2),
        images=[random_image(1), random_image(2)],
        add_generation_prompt=True,
    )
    batch = processor.collate([sample])
    batch.pop("labels")
    return model, processor, sample, batch


def test_routing_report_counts(gaze_dir):
    model, processor, sample, batch = _two_image_prompt(gaze_dir)
    with torch.no_grad():
        out = model(**batch, gaze_report=True, gaze_selection=True)
    assert sorted(out.gaze_report) == [0, 1]
    # the 96 px image at patch 8 is a 12 x 12 grid: 4 regions of 36 per image, 8 in all
    for report in out.gaze_report.values():
        assert report.dense_mean > 0
        sel = report.selected[0, :, -1]  # [Hr, K] for the last query
        assert sel.shape[-1] == 1 and (sel >= 0).all() and (sel < 8).all()
    set_gaze_top_k(model, 3)
    with torch.no_grad():
        out3 = model(**batch, gaze_report=True)
    set_gaze_top_k(model, None)
    with torch.no_grad():
        out1 = model(**batch, gaze_report=True)
    for layer in (0, 1):
        assert out1.gaze_report[layer].attended_mean < out3.gaze_report[layer].attended_mean


def test_last_query_entries(gaze_dir):
    model, processor, sample, batch = _two_image_prompt(gaze_dir)
    cache = GazeCache()
    with torch.no_grad():
        model(**batch, cache=cache, use_cache=True)
    with torch.no_grad():
        model(
            input_ids=torch.tensor([[5]]),
            attention_mask=torch.ones(1, len(sample.input_ids) + 1, dtype=torch.long),
            cache=cache,
            use_cache=True,
            gaze_layout=batch["gaze_layout"],
            gaze_report=True,
        )
    # a decode query: one region of 36 plus the 2 x 4 context tokens, of 288 + 8 dense entries
    for stats in cache.gaze_state.stats.values():
        assert stats.attended[0, :, -1].tolist() == [36 + 8] * stats.attended.shape[1]
        assert stats.dense[0, -1] == 288 + 8


def test_budget_can_be_replaced(gaze_dir):
    model, _ = load_model(gaze_dir)
    set_gaze_budget(model, keep_ratio=1.0)
    assert model.gaze_config.keep_ratio == 1.0 and model.gaze_config.top_k is None
    with pytest.raises(TypeError, match="not a gaze model"):
        set_gaze_top_k(torch.nn.Linear(2, 2), 3)


def test_gaze_model_requires_its_layout(gaze_dir):
    model, processor = load_model(gaze_dir)
    batch = processor.collate([processor.encode_sample(image_chat(), images=[random_image(1)])])
    batch.pop("gaze_layout")
    with pytest.raises(ValueError, match="gaze_layout"):
        model(**batch)


def test_converted_and_saved_gaze_models_load_in_eval_mode(stock_dir, gaze_dir):
    # as from_pretrained does; conversion keeps the mode of the model it converts
    converted, _ = load_model(stock_dir, gaze=GazeConfig(top_k=2))
    saved, _ = load_model(gaze_dir)
    assert not converted.training and not saved.training
    stock, processor = load_model(stock_dir)
    assert convert_to_gaze(stock.train(), processor, GazeConfig(top_k=2))[0].training
