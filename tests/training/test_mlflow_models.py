"""MLflow models found again (``tracking.models``): one cached download per model on a node,
no temporary directory left per call, and no artifact path that leaves the download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tracking.models import MODEL_ARTIFACT, UnsafeModelPath, model_dir_of, resolve_model


def _mlmodel(root: Path, path: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    flavors = {"python_function": {"artifacts": {MODEL_ARTIFACT: {"path": path}}}}
    (root / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}))


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_the_mlmodel_path_is_read_inside_the_download(tmp_path):
    root = tmp_path / "download"
    _mlmodel(root, "artifacts/export")
    assert model_dir_of(root) == root / "artifacts" / "export"


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_an_mlmodel_path_outside_the_download_is_refused(tmp_path, where):
    elsewhere = _model(tmp_path / "elsewhere")
    root = tmp_path / "download"
    _mlmodel(root, str(elsewhere) if where == "absolute" else "../elsewhere")
    with pytest.raises(UnsafeModelPath, match="outside"):
        model_dir_of(root)


def test_a_symlink_out_of_the_download_is_refused(tmp_path):
    elsewhere = _model(tmp_path / "elsewhere")
    root = tmp_path / "download"
    _mlmodel(root, "artifacts/export")
    (root / "artifacts").mkdir()
    (root / "artifacts" / "export").symlink_to(elsewhere)
    with pytest.raises(UnsafeModelPath, match="outside"):
        model_dir_of(root)


def _gazeattn_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("gazeattn-model-*")}


def test_resolving_again_reuses_one_cached_download(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("GAZEATTN_CACHE", str(tmp_path / "cache"))
    before_uri = mlflow.get_tracking_uri()
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"resolve-{tmp_path.name}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(_model(tmp_path / "export")), "export/model")
    temp_before = _gazeattn_temp_dirs()
    try:
        paths = [
            resolve_model(f"runs:/{run.info.run_id}/export", mlflow_server.uri).path
            for _ in range(3)
        ]
    finally:
        mlflow.set_tracking_uri(before_uri)
    assert paths[0] == paths[1] == paths[2] and (paths[0] / "config.json").is_file()
    assert paths[0].is_relative_to(tmp_path / "cache")
    assert _gazeattn_temp_dirs() == temp_before
    # one download in the cache, nothing half-made beside it
    assert len(list((tmp_path / "cache" / "mlflow").iterdir())) == 1
