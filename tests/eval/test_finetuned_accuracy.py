"""After the demo fine-tuning, the model answers its own training questions: a real signal.

Runs the demo config (tiny model, generated data, 2 ZeRO-3 workers on CPU) into a real
MLflow server, then evaluates the export and the untrained starting point on the same
training samples, and the MLflow model into its training run.
"""

import os

import pytest
from mlflow.tracking import MlflowClient

from evaluation.cli import evaluate_main
from evaluation.data import load_json
from evaluation.runner import EvalConfig, evaluate_samples

pytestmark = pytest.mark.slow


# Seen 2026-11-24 on main a218d12: after configs/demo.yaml (30 steps, final loss 2.54) the export
# answers every training question with an empty string (accuracy 0/16); the demo config must
# train longer or harder before this can pass. Not strict, so it reports XPASS once it does.
@pytest.mark.xfail(reason="the demo fine-tuning does not learn the answers yet", strict=False)
def test_accuracy_is_high_after_demo_finetune(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    from gazeattn.model import load_model
    from training.config import REPO, load_config
    from training.trainer import run_finetune

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"run.storage_path={tmp_path / 'ray'}",
            f"data.synthetic_dir={tmp_path / 'data'}",
            f"mlflow.tracking_uri={mlflow_server.uri}",
            "run.name=eval-accuracy",
        ],
    )
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    try:
        result = run_finetune(cfg)
    finally:
        ray.shutdown()
    samples = load_json(tmp_path / "data" / "train.json", limit=16)
    config = EvalConfig(max_new_tokens=4, routing_layers=[0])
    model, processor = load_model(result.export_dir)
    after = evaluate_samples(model.eval(), processor, samples, config).metrics["eval/accuracy"]
    start, start_processor = load_model(tmp_path / "ray" / "eval-accuracy" / "gaze-init")
    before = evaluate_samples(start.eval(), start_processor, samples, config).metrics[
        "eval/accuracy"
    ]
    assert after >= 0.6, f"accuracy after fine-tuning {after:.2f} (before {before:.2f})"
    assert after >= before + 0.4

    # the logged MLflow model, evaluated into its training run
    evaluate_main([
        "--model", f"runs:/{result.mlflow_run_id}/model", "--data",
        str(tmp_path / "data" / "train.json"), "--limit", "4", "--max-new-tokens", "4",
        "--pictures", "1", "--run-id", result.mlflow_run_id,
        "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "eval"),
    ])  # fmt: skip
    run = MlflowClient(mlflow_server.uri).get_run(result.mlflow_run_id)
    assert "eval/accuracy" in run.data.metrics
