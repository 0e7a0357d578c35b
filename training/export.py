"""The exported gaze model as an MLflow model: logged into the training run and registered."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc

MODEL_ARTIFACT = "model_dir"


class GazePyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the HF-format export with ``gazeattn.load_model``; predicts answers to prompts.

    Input: a DataFrame or list of dicts with a ``prompt`` column (text-only here;
    images go through the serving endpoint). Output: the generated answers.
    """

    def load_context(self, context) -> None:
        from gazeattn import load_model

        self.model, self.processor = load_model(context.artifacts[MODEL_ARTIFACT])
        self.model.eval()

    def predict(self, context, model_input, params=None):
        from gazeattn.generation import GenerationRequest, generate_batch

        rows = (
            model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        )
        max_new = int((params or {}).get("max_new_tokens", 32))
        requests = [
            GenerationRequest(
                messages=[{"role": "user", "content": str(row["prompt"])}], max_new_tokens=max_new
            )
            for row in rows
        ]
        return [r.text for r in generate_batch(self.model, self.processor, requests)]


def model_dir_of(local_root: str | Path) -> Path:
    """Where the HF export lies inside a downloaded MLflow model of this kind."""
    return Path(local_root) / "artifacts" / MODEL_ARTIFACT


def log_model(uri: str, run_id: str, export_dir: Path, registered_name: str | None) -> str | None:
    """Log ``export_dir`` into run ``run_id`` as a pyfunc model; register it when a name is given."""
    mlflow.set_tracking_uri(uri)
    requirements = [f"{p}=={metadata.version(p)}" for p in ("torch", "transformers", "mlflow")]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=GazePyfuncModel(),
            artifacts={MODEL_ARTIFACT: str(export_dir)},
            pip_requirements=requirements,
            registered_model_name=registered_name,
        )
    print(f"[finetune] MLflow model: {info.model_uri}", flush=True)
    return registered_name
