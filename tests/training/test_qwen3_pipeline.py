"""Tiny hub-layout checkpoints of Qwen3-VL and Qwen3.5 through the pipeline.

make_shards -> fine-tuning (2 ZeRO-3 workers on a local Ray, MLflow on a real server; Qwen3-VL
with LoRA adapters merged into the export, Qwen3.5's hybrid decoder trained fully) -> HF
export -> Ray Serve (the openai client, an image and a video in one request; the engine's
batch cache keeps Qwen3.5's linear-attention states per row) -> evaluation, as
``test_families_pipeline.py`` runs it for the older families.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForImageTextToText

from gazeattn import load_model
from gazeattn.model import is_gaze_model
from gazeattn.tiny import build_stock
from tests.training.test_families_pipeline import _config as family_config
from tests.training.test_families_pipeline import _served_answer
from training.trainer import run_finetune

pytestmark = [pytest.mark.slow, pytest.mark.ray]

FAMILY_NAMES = {"qwen3-vl": "qwen3_vl", "qwen3.5": "qwen3_5"}
CASES = {
    "qwen3-vl": {
        "model.lora": "{r: 4, alpha: 8, dropout: 0.0}",
        "model.visual_budget.max_pixels": 16384,
        "model.visual_budget.frames_per_video": 4,
    },
    "qwen3.5": {
        "model.visual_budget.max_pixels": 16384,
        "model.visual_budget.frames_per_video": 4,
        # no held-out scoring in a 3-step run
        "train.heldout_every": 0,
    },
}


def _train(tmp_path, family, tracking_uri):
    stock = build_stock(tmp_path / "stock", family=family)
    cfg = family_config(tmp_path, family, stock, tracking_uri, cases=CASES)
    result = run_finetune(cfg)
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["loss"])
    model, processor = load_model(result.export_dir)
    assert is_gaze_model(model) and processor.family == FAMILY_NAMES[family]
    assert type(AutoModelForImageTextToText.from_pretrained(result.export_dir)) is type(model)
    assert processor.visual_budget == cfg.model.visual_budget
    return result.export_dir, model, processor


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3.5"])
def test_qwen3_families_through_the_whole_pipeline(tmp_path, mlflow_server, ray_serve, family):
    from evaluation.cli import evaluate_main

    export, _, _ = _train(tmp_path, family, mlflow_server.uri)
    answer, prompt_tokens = _served_answer(ray_serve, export, family, video_frames=4)
    # the image's tokens and two timestamped temporal patches of the 4 frames
    assert isinstance(answer, str) and prompt_tokens > 2 * 4
    report = evaluate_main(
        ["--model", export, "--data", str(tmp_path / "data" / "test.json"), "--no-mlflow",
         "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--pictures", "1"]
    )  # fmt: skip
    assert len(report.samples) == 4
    assert report.routing_layers and all(
        layer in report.routing_layers for layer in _attending(export)
    )


def _attending(export: str) -> list[int]:
    """The decoder layers that attend (Qwen3.5: the full-attention ones)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(export).text_config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind != "linear_attention"]
