"""Fine-tuning parts: frozen modules, LoRA on the decoder, adapter checkpoints, the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gazeattn import load_model
from gazeattn.adapters import (
    LoraSettings,
    apply_lora,
    freeze,
    is_adapter_checkpoint,
    save_adapter,
    trainable_report,
)
from gazeattn.model import is_gaze_model, set_gaze_top_k
from gazeattn.ops import GazeConfig
from tests.model.conftest import image_chat, random_image


def _trainable(model, prefix: str) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize(
    "family,vision,projector",
    [("llava", "model.vision_tower", "model.multi_modal_projector"),
     ("qwen2.5-vl", "model.visual.blocks", "model.visual.merger")],
)  # fmt: skip
def test_freezing_the_tower_keeps_the_projector_training(stock_dirs, family, vision, projector):
    model, _ = load_model(stock_dirs[family], gaze=GazeConfig(top_k=2))
    freeze(model, vision=True)
    assert not _trainable(model, vision) and _trainable(model, projector)
    assert _trainable(model, "gaze_context") and _trainable(model, "model.language_model")
    freeze(model, vision=True, projector=True)
    assert not _trainable(model, projector)
    report = trainable_report(model)
    assert "projector" in report and "context_tokens" in report and "total" in report


def _batch(processor):
    sample = processor.encode_sample(image_chat(), images=[random_image(3, (40, 60))])
    return processor.collate([sample])


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_lora_trains_the_decoder_adapters_context_and_projector(stock_dirs, family, tmp_path):
    model, processor = load_model(
        stock_dirs[family], gaze=GazeConfig(keep_ratio=0.5, num_context_tokens=2)
    )
    peft_model = apply_lora(model, LoraSettings(r=4))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "language_model" in n for n in trained)
    assert not any("lora_" in n and ("vision" in n or "visual" in n) for n in trained)
    assert any("gaze_context" in n for n in trained)
    assert any(("multi_modal_projector" in n or "merger" in n) for n in trained)
    assert not any("embed_tokens" in n or "lm_head" in n for n in trained)
    batch = _batch(processor)
    peft_model.train()
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = peft_model(**batch).loss.item()
    for _ in range(3):
        peft_model(**batch).loss.backward()
        optim.step()
        optim.zero_grad()
    set_gaze_top_k(peft_model, None)  # the gaze controls reach through peft's wrappers
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(**batch)
    assert after.loss.item() < before
    out = tmp_path / "adapter"
    save_adapter(peft_model, processor, out, base=str(stock_dirs[family]))
    assert is_adapter_checkpoint(out)
    loaded, loaded_processor = load_model(out)
    merged, _ = load_model(out, merge_adapter=True)
    assert is_gaze_model(loaded) and is_gaze_model(merged)
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, after.logits, atol=0, rtol=0)
        torch.testing.assert_close(merged(**batch).logits, after.logits, atol=1e-5, rtol=1e-5)
    assert loaded_processor.gaze_config == processor.gaze_config
    with pytest.raises(ValueError, match="adapter checkpoint keeps"):
        load_model(out, gaze=GazeConfig(top_k=1))


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="r must be"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)
    assert np.isclose(LoraSettings().to_dict()["alpha"], 32)
