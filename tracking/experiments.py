"""The MLflow experiments of the project's runs: created as model-training experiments."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

# MLflow 3's UI opens an experiment by its kind: a "GenAI" one on its traces overview,
# a model-development one on the runs table and metric charts (what our runs are)
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created on first use as a model-training experiment.

    An existing experiment without a kind gets one (MLflow would otherwise infer it)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={KIND_TAG: MODEL_TRAINING})
    if KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
    return found.experiment_id
