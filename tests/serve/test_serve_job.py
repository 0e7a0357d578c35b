"""``jobs/serve.py`` end to end: a model logged to a real MLflow server, served by its URI.

The model is logged as ``tracking.models.log_model`` does it (a registered pyfunc model
with the HF export under ``artifacts/model_dir``).

The job runs as a subprocess (its own local Ray and Serve on 127.0.0.1), prints
its URL, answers the openai client, and stops cleanly on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
from mlflow import MlflowClient

from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_tiny
from tests.serve.harness import ROOT, data_url, image_bytes, image_part, user
from tests.servers import free_port
from tracking.models import resolve_model

pytestmark = pytest.mark.ray

REGISTERED = "serve-job-gaze-tiny"


@pytest.fixture(scope="module")
def logged_run(mlflow_server, tmp_path_factory):
    """A run holding the tiny model as training logs it (pyfunc ``model``, registered), and a
    ``junk`` artifact that is no model."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from tracking.models import log_model

    model_dir = build_tiny(tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(top_k=2))
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"serve-job-{time.time_ns()}")
    run = client.create_run(experiment)
    # log_model sets the process-wide tracking URI; restore it to unset (None), so later
    # tests that choose theirs with MLFLOW_TRACKING_URI still get it
    with _use_tracking_uri(None):
        log_model(mlflow_server.uri, run.info.run_id, model_dir, REGISTERED)
    (model_dir.parent / "notes.txt").write_text("not a model")
    client.log_artifact(run.info.run_id, str(model_dir.parent / "notes.txt"), "junk")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_mlflow_uri_resolves_to_the_export(mlflow_server, logged_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    path = resolve_model(f"runs:/{logged_run}/model").path
    # MLflow keeps the artifact under the source directory's name, found through MLmodel
    assert path.parent.name == "artifacts" and (path / "config.json").is_file()
    assert (path.parents[1] / "MLmodel").is_file()
    with pytest.raises(FileNotFoundError, match="no model directory"):
        resolve_model(f"runs:/{logged_run}/junk")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model(str(ROOT / "serving"))


def test_job_serves_an_mlflow_model(mlflow_server, logged_run, tmp_path):
    uri = f"models:/{REGISTERED}/1"
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("GAZEATTN_API_KEY", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "jobs/serve.py", "--model", uri, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = wait_for_url(proc, log_path, timeout=240)
        assert url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == [uri]
        out = client.chat.completions.create(
            model=uri,
            messages=user(image_part(data_url(image_bytes(1)))),
            max_tokens=4,
            temperature=0,
        )
        assert out.model == uri and out.usage.prompt_tokens > 12 * 12
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_url(proc: subprocess.Popen, log_path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", text)
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"jobs/serve.py exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(1)
    raise TimeoutError(f"jobs/serve.py printed no URL in {timeout}s:\n{text[-3000:]}")
