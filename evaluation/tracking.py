"""Evaluation results into MLflow (models come from ``tracking.models.resolve_model``).

An evaluation logs into the training run when one is given (``run_id``), else into
a new run of ``experiment`` linked to the model by tags (``gazeattn.model`` = the
model's path or URI, ``gazeattn.model_run_id`` = the run that logged it, when known).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from evaluation.runner import EvalReport, EvalSample
from tracking.experiments import experiment_id
from tracking.models import ResolvedModel

MODEL_TAG = "gazeattn.model"
MODEL_RUN_TAG = "gazeattn.model_run_id"
EVAL_TAG = "gazeattn.eval"


def start_eval_run(
    client: MlflowClient,
    *,
    experiment: str,
    run_name: str,
    model: ResolvedModel,
    tags: dict[str, str] | None = None,
) -> str:
    exp_id = experiment_id(client, experiment)
    link = {MODEL_TAG: model.uri, **({MODEL_RUN_TAG: model.run_id} if model.run_id else {})}
    run = client.create_run(exp_id, run_name=run_name, tags={**link, **(tags or {})})
    return run.info.run_id


def log_report(
    client: MlflowClient,
    run_id: str,
    report: EvalReport,
    *,
    samples: list[EvalSample] | None = None,
    pictures: list[Path] = (),
    params: dict[str, object] | None = None,
    step: int = 0,
) -> None:
    """Params (the eval config), the metrics, a per-sample table and the gaze pictures."""
    label = report.config.label
    existing = client.get_run(run_id).data.params
    all_params = {**report.config.params(), **(params or {})}
    items = [Param(k, str(v)[:6000]) for k, v in all_params.items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    client.set_tag(run_id, EVAL_TAG, label)
    ts = _now_ms()
    metrics = [Metric(k, float(v), ts, step) for k, v in report.metrics.items()]
    client.log_batch(run_id, metrics=metrics)
    client.log_table(run_id, data=sample_table(report), artifact_file=f"eval/{label}/samples.json")
    client.log_dict(run_id, report.metrics, f"eval/{label}/metrics.json")
    for path in pictures:
        client.log_artifact(run_id, str(path), f"gaze_pictures/{label}")


def sample_table(report: EvalReport) -> dict[str, list]:
    rows = [asdict(r) for r in report.samples]
    columns = ["id", "prediction", "answer", "correct", "completion_tokens", "attended_mean",
               "dense_mean", "flops_ratio"]  # fmt: skip
    table = {c: [row[c] for row in rows] for c in columns}
    for layer in report.routing_layers:
        table[f"hit_rate_layer_{layer}"] = [
            (sum(r.hits[layer]) / len(r.hits[layer])) if r.hits.get(layer) else None
            for r in report.samples
        ]
    return table


def _now_ms() -> int:
    return int(time.time() * 1000)


def dump_report(report: EvalReport, path: Path) -> Path:
    """The metrics and per-sample answers as JSON (for logs and the demo)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "config": report.config.model_dump(),
        "metrics": report.metrics,
        "samples": sample_table(report),
    }
    path.write_text(json.dumps(data, indent=1, default=str))
    return path
