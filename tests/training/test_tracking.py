"""MLflow tracking against a real server: run reuse, params, buffering while the server is down."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from tests.servers import MlflowServer
from tracking.uri import resolve_tracking_uri
from training.tracking import Tracker, resolve_run


def test_resolve_run_reuses_the_run_of_a_name(mlflow_server):
    first = resolve_run(mlflow_server.uri, "exp-reuse", "run-a")
    again = resolve_run(mlflow_server.uri, "exp-reuse", "run-a")
    other = resolve_run(mlflow_server.uri, "exp-reuse", "run-b")
    assert first == again != other


def test_tracker_logs_params_and_metrics(mlflow_server):
    run_id = resolve_run(mlflow_server.uri, "exp-log", "run")
    tracker = Tracker(mlflow_server.uri, run_id)
    tracker.log_params({"model.attn": "gaze", "train.max_steps": 3})
    # logging the same params again (a resumed run) is not an error
    tracker.log_params({"model.attn": "gaze"})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "kv_savings_pct": 75.0}, step)
    tracker.close()
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.data.params["model.attn"] == "gaze"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 1.0 / 3]


def test_tracker_buffers_while_the_server_is_down(tmp_path, caplog):
    server = MlflowServer(tmp_path / "srv").start()
    run_id = resolve_run(server.uri, "exp-down", "run")
    tracker = Tracker(server.uri, run_id)
    tracker.log_metrics({"loss": 3.0}, 0)
    # step 0 reaches the live server before it stops (else the sender may still hold it)
    assert tracker.flush(timeout_s=30)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        tracker.log_metrics({"loss": 2.0}, 1)
        tracker.log_metrics({"loss": 1.0}, 2)
        # the background sender meets the dead server and keeps both metrics
        assert not tracker.flush(timeout_s=2)
    assert sum("unreachable" in r.message for r in caplog.records) == 1
    assert len(tracker._buffer) + tracker._in_flight == 2 and tracker.dropped == 0
    # the same store comes back on the same port: the buffered metrics arrive
    restarted = MlflowServer(tmp_path / "srv", port=server.port).start()
    try:
        assert tracker.flush(timeout_s=30)
        assert len(tracker._buffer) == 0
        history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [0, 1, 2]
    finally:
        tracker.close(timeout_s=5)
        restarted.stop()


def test_default_tracking_uri_is_the_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_logged_model_holds_the_export_where_model_dir_of_looks(mlflow_server, tmp_path):
    import mlflow

    from gazeattn.tiny import build_tiny
    from tracking.models import log_model, model_dir_of

    export = build_tiny(tmp_path / "export")
    run_id = resolve_run(mlflow_server.uri, "exp-model", "run")
    before = mlflow.get_tracking_uri()
    model_uri = log_model(mlflow_server.uri, run_id, export, "tiny-logged")
    assert model_uri.startswith("models:/m-")
    assert mlflow.get_tracking_uri() == before
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    versions = client.search_model_versions("name='tiny-logged'")
    assert [v.run_id for v in versions] == [run_id]
    root = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("tiny-logged", versions[0].version),
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server.uri,
    )
    assert (model_dir_of(root) / "config.json").exists()
