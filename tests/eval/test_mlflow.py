"""Evaluation and sweep results in a real MLflow server: names of metrics, params, artifacts."""

import json

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from evaluation.cli import compare_main, evaluate_main
from evaluation.compare import CHART_DPI, SWEEP_TAG, chart_size

METRICS = [
    "eval/accuracy", "eval/samples", "eval/generated_tokens", "eval/visual_entries_per_token",
    "eval/dense_entries_per_token", "eval/entries_ratio", "eval/kv_savings_pct",
    "eval/attention_flops_ratio", "eval/decode_tokens_per_s", "eval/routing_hit_rate",
    "eval/routing_hit_rate_random", "eval/routing_hit_rate/layer_0",
    "eval/routing_hit_rate/layer_1", "eval/routing_hit_rate_random/layer_0",
]  # fmt: skip


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_evaluate_logs_a_linked_run(mlflow_server, tiny_dir, json_data, tmp_path):
    report = evaluate_main([
        "--model", str(tiny_dir), "--data", str(json_data), "--keep-ratio", "0.25",
        "--max-new-tokens", "3", "--pictures", "2", "--picture-tokens", "3",
        "--tracking-uri", mlflow_server.uri, "--experiment", "eval-test", "--out", str(tmp_path),
    ])  # fmt: skip
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("eval-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert set(METRICS) <= set(run.data.metrics)
    assert run.data.metrics["eval/samples"] == 3
    assert run.data.params["eval.keep_ratio"] == "0.25"
    assert run.data.params["eval.attn"] == "gaze"
    assert run.data.tags["gazeattn.model"] == str(tiny_dir)
    files = _artifacts(client, run.info.run_id)
    assert "eval/gaze-keep0.25/samples.json" in files
    pictures = sorted(f for f in files if f.startswith("gaze_pictures/gaze-keep0.25/"))
    assert pictures == [
        "gaze_pictures/gaze-keep0.25/test-0.png", "gaze_pictures/gaze-keep0.25/test-1.png"
    ]  # fmt: skip
    local = client.download_artifacts(run.info.run_id, pictures[0], str(tmp_path / "dl"))
    with Image.open(local) as image:
        assert image.format == "PNG"
        # 3 token columns of 1.8 in, 2 layer rows + 0.7 in of captions, at 100 dpi
        assert image.size == (540, 430)
    assert report.metrics["eval/samples"] == 3


def test_evaluate_an_mlflow_model_into_its_training_run(mlflow_server, tiny_dir, json_data,
                                                        tmp_path):  # fmt: skip
    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment("train-test")
    train = client.create_run(exp_id, run_name="finetune").info.run_id
    client.log_param(train, "lr", "0.001")
    # the pyfunc model's layout: the HF export at <model>/artifacts/model_dir
    client.log_artifacts(train, str(tiny_dir), "model/artifacts/model_dir")
    evaluate_main([
        "--model", f"runs:/{train}/model", "--data", str(json_data), "--attn", "dense",
        "--max-new-tokens", "2", "--pictures", "0", "--run-id", train,
        "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path),
    ])  # fmt: skip
    run = client.get_run(train)
    assert run.data.params["eval.attn"] == "dense"
    assert run.data.params["eval.model"] == f"runs:/{train}/model"
    assert run.data.metrics["eval/entries_ratio"] == 1.0
    assert "eval/routing_hit_rate" not in run.data.metrics
    assert "eval/dense/samples.json" in _artifacts(client, train)
    assert len(client.search_runs([exp_id])) == 1  # no extra run


@pytest.fixture(scope="module")
def sweep(mlflow_server, tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("sweepdata")
    from tests.eval.conftest import write_json_data

    path = write_json_data(data)
    out = tmp_path_factory.mktemp("sweep")
    result = compare_main([
        "--model", str(tiny_dir), "--data", str(path), "--points", "dense", "0.5", "0.25", "1",
        "--max-new-tokens", "2", "--pictures", "1", "--picture-tokens", "2",
        "--tracking-uri", mlflow_server.uri, "--experiment", "compare-test", "--out", str(out),
    ])  # fmt: skip
    return result


def test_sweep_table_has_one_row_per_budget(sweep, mlflow_server, tmp_path):
    assert [r.label for r in sweep.rows] == ["dense", "gaze-keep0.5", "gaze-keep0.25", "gaze-top1"]
    lines = [line for line in sweep.markdown.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4  # header + one row per point
    dense = sweep.rows[0]
    assert dense.entries_pct == 100.0 and dense.hit_rate is None
    for row in sweep.rows[1:]:
        assert row.entries < dense.entries and row.hit_rate is not None
    client = MlflowClient(mlflow_server.uri)
    table = client.download_artifacts(sweep.run_id, "comparison/table.json", str(tmp_path))
    data = json.loads(open(table).read())
    assert len(data["data"]) == 4
    assert "accuracy" in data["columns"] and "entries" in data["columns"]


def test_sweep_runs_share_one_experiment(sweep, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("compare-test")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert all(r.data.tags[SWEEP_TAG] == "compare" for r in runs)
    assert {r.info.run_id for r in children} == {r.run_id for r in sweep.rows}
    files = _artifacts(client, sweep.run_id)
    assert {"comparison/table.md", "comparison/accuracy_vs_entries.png"} <= set(files)
    chart = client.download_artifacts(sweep.run_id, "comparison/accuracy_vs_entries.png",
                                      str(tmp_path))  # fmt: skip
    with Image.open(chart) as image:
        assert image.format == "PNG"
        # two panels, a bar per row: 9.6 x 4 in at 100 dpi for the 4 rows
        width, height = chart_size(len(sweep.rows))
        assert image.size == (round(width * CHART_DPI), round(height * CHART_DPI)) == (960, 400)


def _chromium(args, timeout=120):
    import subprocess

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1400,1000", "--virtual-time-budget=20000"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


CHROMIUM = __import__("shutil").which("chromium")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install -y chromium)",
)
def test_mlflow_compare_page_shows_the_sweep(sweep, mlflow_server):
    """The MLflow UI's compare page lists every point's run; the sweep run lists the chart.

    Screenshots are kept under outputs/test-artifacts/ (or $TEST_ARTIFACTS_DIR).
    """
    import os
    from pathlib import Path

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("compare-test").experiment_id
    ids = [r.run_id for r in sweep.rows]
    compare = f'{mlflow_server.uri}/#/compare-runs?runs={json.dumps(ids)}&experiments=["{exp}"]'
    chart = (f"{mlflow_server.uri}/#/experiments/{exp}/runs/{sweep.run_id}"
             "/artifacts/comparison/accuracy_vs_entries.png")  # fmt: skip
    dom = _chromium(["--dump-dom", compare]).stdout
    assert f"Comparing {len(ids)} Runs" in dom
    for row in sweep.rows:
        assert f"compare/{row.label}" in dom
    assert "accuracy_vs_entries.png" in _chromium(["--dump-dom", chart]).stdout
    keep = Path(os.environ.get("TEST_ARTIFACTS_DIR", "outputs/test-artifacts"))
    keep.mkdir(parents=True, exist_ok=True)
    for name, url in (("mlflow_compare.png", compare), ("mlflow_sweep_chart.png", chart)):
        _chromium([f"--screenshot={(keep / name).resolve()}", url])
        with Image.open(keep / name) as image:
            assert image.size == (1400, 1000)


def test_resolve_the_finetune_jobs_pyfunc_model(mlflow_server, tiny_dir):
    """The fine-tuning job's MLflow model (an MLflow 3 logged model) by runs:/, by registered
    version and alias, and by its logged-model id; each names the run that logged it."""
    from tracking.models import log_model, resolve_model

    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment("pyfunc-test")
    run_id = client.create_run(exp_id).info.run_id
    log_model(mlflow_server.uri, run_id, tiny_dir, "eval-test-model")
    registry = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    registry.set_registered_model_alias("eval-test-model", "champion", "1")
    (logged,) = [m.model_id for m in client.search_logged_models(experiment_ids=[exp_id])]
    uris = [
        f"runs:/{run_id}/model",
        "models:/eval-test-model/1",
        "models:/eval-test-model@champion",
    ]
    for uri in [*uris, f"models:/{logged}"]:
        resolved = resolve_model(uri, mlflow_server.uri)
        assert (resolved.path / "config.json").is_file()
        assert resolved.path.parent.name == "artifacts"
        assert resolved.run_id == run_id
