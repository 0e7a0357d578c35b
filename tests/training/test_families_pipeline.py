"""The whole pipeline on a stock hub-layout checkpoint of each family.

make_shards -> fine-tuning (2 ZeRO-3 workers on a local Ray, MLflow on a real server)
-> HF export -> Ray Serve on the same Ray (the openai client, an image in the request) ->
evaluation.
LLaVA-1.5 (CLIP with its CLS token, Llama tokenizer, USER/ASSISTANT template) trains its
decoder fully; Qwen2.5-VL (dynamic resolution, merger, M-RoPE) trains LoRA adapters that
the driver merges into the export.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from transformers import AutoModelForImageTextToText

from gazeattn import load_model
from gazeattn.model import is_gaze_model
from gazeattn.tiny import build_stock
from training.config import load_config
from training.trainer import run_finetune

pytestmark = [pytest.mark.slow, pytest.mark.ray]

FAMILY_NAMES = {"llava-1.5": "llava", "qwen2.5-vl": "qwen2_5_vl"}
CASES = {
    "llava-1.5": {"model.freeze_vision": "false"},
    "qwen2.5-vl": {
        "model.lora": "{r: 4, alpha: 8, dropout: 0.0}",
        "model.visual_budget.max_pixels": 12544,
        "model.visual_budget.frames_per_video": 2,
    },
}


def _config(tmp_path, family, stock, tracking_uri, cases=CASES):
    """The demo's config, shrunk to 3 steps on 16 samples, with ``cases[family]`` on top."""
    sets = {
        "model.name_or_path": str(stock),
        "run.name": f"family-{family}",
        "run.storage_path": str(tmp_path / "ray"),
        "data.synthetic_dir": str(tmp_path / "data"),
        "data.synthetic.n_train": 16,
        "data.synthetic.n_test": 4,
        "data.synthetic.image_size": 64,
        "data.progress_bars": False,
        "train.max_steps": 3,
        "train.micro_batch_size": 2,
        "train.checkpoint_every": 3,
        "top_k_schedule.warmup_steps": 2,
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.experiment": "families",
        "mlflow.registered_model_name": f"family-{family}",
        "mlflow.system_metrics": False,
        **cases[family],
    }
    return load_config("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()])


def _image_url(seed: int) -> str:
    array = np.random.default_rng(seed).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _served_answer(url: str, export: str, name: str, video_frames: int = 0) -> tuple[str, int]:
    """The export deployed as the app ``name`` on the module's Ray Serve, asked through the
    openai client about an image (and a video of ``video_frames`` frames): its answer and
    prompt tokens. The app is deleted after."""
    from openai import OpenAI
    from ray import serve

    from serving.app import app
    from serving.settings import ServeSettings

    settings = ServeSettings(model=export, model_name="family")
    frames = [{"url": _image_url(10 + i)} for i in range(video_frames)]
    video = [{"type": "video_frames", "video_frames": frames}] if frames else []
    serve.run(app(settings, num_replicas=1), name=name, route_prefix=f"/{name}")
    try:
        client = OpenAI(base_url=f"{url}/{name}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="family",
            max_tokens=4,
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _image_url(3)}},
                        *video,
                        {"type": "text", "text": "What colour is the square?"},
                    ],
                }
            ],
        )
    finally:
        serve.delete(name)
    return reply.choices[0].message.content, reply.usage.prompt_tokens


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_stock_checkpoint_through_the_whole_pipeline(tmp_path, family, mlflow_server, ray_serve):
    from evaluation.cli import evaluate_main

    stock = build_stock(tmp_path / "stock", family=family)
    cfg = _config(tmp_path, family, stock, mlflow_server.uri)
    result = run_finetune(cfg)
    export = result.export_dir
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["loss"])

    # the export is the family's gaze model, through gazeattn and through the Auto classes
    model, processor = load_model(export)
    assert is_gaze_model(model) and processor.family == FAMILY_NAMES[family]
    assert type(AutoModelForImageTextToText.from_pretrained(export)) is type(model)
    assert processor.visual_budget == cfg.model.visual_budget
    if cfg.model.lora is not None:
        # merged on the driver: a plain gaze checkpoint, no adapter files
        assert not (tmp_path / "ray" / cfg.run.name / "export" / "adapter_config.json").exists()

    params = MlflowClient(mlflow_server.uri).get_run(result.mlflow_run_id).data.params
    assert params["model.visual_budget.frames_per_video"] == str(
        cfg.model.visual_budget.frames_per_video
    )

    answer, prompt_tokens = _served_answer(ray_serve, export, family)
    assert isinstance(answer, str) and prompt_tokens > 4

    report = evaluate_main(
        ["--model", export, "--data", str(tmp_path / "data" / "test.json"), "--no-mlflow",
         "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--pictures", "1"]
    )  # fmt: skip
    assert len(report.samples) == 4
    assert 0.0 <= report.metrics["eval/accuracy"] <= 1.0
