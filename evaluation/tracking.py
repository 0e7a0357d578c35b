"""Models from MLflow, and evaluation results into MLflow.

An evaluation logs into the training run when one is given (``run_id``), else into
a new run of ``experiment`` linked to the model by tags (``gazeattn.model`` = the
model's path or URI, ``gazeattn.model_run_id`` = the run that logged it, when known).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from evaluation.runner import EvalReport, EvalSample

MODEL_TAG = "gazeattn.model"
MODEL_RUN_TAG = "gazeattn.model_run_id"
EVAL_TAG = "gazeattn.eval"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@dataclass(kw_only=True)
class ResolvedModel:
    uri: str  # as given
    path: Path  # an HF-format directory for gazeattn.load_model
    run_id: str | None = None  # the MLflow run that logged it, when known


def resolve_model(model: str, tracking_uri: str | None = None) -> ResolvedModel:
    """A local directory as is; an MLflow URI is downloaded (the pyfunc model's HF export
    lies at ``artifacts/model_dir`` of the download)."""
    if not model.startswith(MLFLOW_SCHEMES):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model} is neither a model directory nor an MLflow URI")
        return ResolvedModel(uri=model, path=path)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    for uri in (model, *_logged_model_uris(model)):
        try:
            root = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="gazeattn-model-")
            ))  # fmt: skip
        except (MlflowException, OSError):  # a runs:/ URI of an MLflow 3 logged model: next
            continue
        # pyfunc keeps a directory artifact under artifacts/<its basename>
        candidates = [root / "artifacts" / "model_dir", root / "model_dir", root]
        candidates += sorted(p.parent for p in root.glob("artifacts/*/config.json"))
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return ResolvedModel(uri=model, path=candidate, run_id=_run_of(model))
    raise FileNotFoundError(f"no HF model directory (config.json) in the download of {model}")


def _logged_model_uris(uri: str) -> list[str]:
    """``runs:/RUN/NAME`` -> the MLflow 3 logged models named NAME whose source run is RUN."""
    if not uri.startswith("runs:/"):
        return []
    run_id, _, name = uri[len("runs:/") :].partition("/")
    client = MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        experiment_ids=[exp], filter_string=f"source_run_id = '{run_id}'"
    )
    return [f"models:/{m.model_id}" for m in found if not name or m.name == name.strip("/")]


def _run_of(uri: str) -> str | None:
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/")[0]
    try:
        return mlflow.models.get_model_info(uri).run_id
    except (MlflowException, OSError):  # the link is a nicety; the model itself was found
        return None


def start_eval_run(
    client: MlflowClient,
    *,
    experiment: str,
    run_name: str,
    model: ResolvedModel,
    tags: dict[str, str] | None = None,
) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
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
        "config": asdict(report.config),
        "metrics": report.metrics,
        "samples": sample_table(report),
    }
    path.write_text(json.dumps(data, indent=1, default=str))
    return path
