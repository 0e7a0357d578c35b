"""`ray job submit` of the fine-tuning job to a local `ray start --head` cluster, as on a real cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"

pytestmark = pytest.mark.slow


@pytest.fixture
def head_node():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Ray's socket paths must stay under the OS limit: a short temp dir, not pytest's
    temp = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    dashboard = free_port()
    cmd = [str(RAY), "start", "--head", "--port", str(free_port()), "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard), "--temp-dir", temp]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(RAY), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_finetuning_job(head_node, tmp_path):
    address, env = head_node
    sets = {
        "train.max_steps": 2,
        "train.micro_batch_size": 2,
        "data.synthetic.n_train": 12,
        "data.synthetic.n_test": 2,
        "data.synthetic_dir": tmp_path / "data",
        "run.storage_path": tmp_path / "ray",
        "mlflow.enabled": "false",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    submit = [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO),
              "--runtime-env", str(REPO / "runtime_env.yaml"), "--",
              sys.executable, "jobs/finetune.py", "--config", "configs/demo.yaml", *args]  # fmt: skip
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert (tmp_path / "ray" / "gaze-demo" / "export" / "config.json").exists()
