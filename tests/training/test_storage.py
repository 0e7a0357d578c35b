"""Object storage: checkpoints, resume, export and serving through an S3-compatible server.

moto's S3 server runs on 127.0.0.1; the job finds it as a user's job finds theirs, through
the AWS environment (AWS_ENDPOINT_URL and keys), set before Ray starts so that every Ray
worker inherits it (on a cluster: the job's runtime_env env_vars).
"""

from __future__ import annotations

import pytest

from tests.servers import free_port
from training.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BUCKET = "gazeattn-ckpts"


@pytest.fixture(scope="module")
def s3():
    """(endpoint, boto3 client) of a moto S3 server with an empty bucket; AWS env set."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def cache(s3, tmp_path_factory):
    """The local model cache, set before Ray starts so that replicas use it too."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GAZEATTN_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def s3_run(s3, cache, tmp_path_factory):
    """A run stopped at step 2 and resumed to 3, all in the bucket: (first, second, keys)."""
    import ray

    from training.trainer import run_finetune

    _, client = s3
    data = tmp_path_factory.mktemp("s3data")
    sets = {
        "run.name": "s3-run",
        "run.storage_path": f"s3://{BUCKET}/runs",
        "data.synthetic_dir": str(data),
        "data.synthetic.n_train": 8,
        "data.synthetic.n_test": 2,
        "data.progress_bars": False,
        "train.micro_batch_size": 2,
        "train.max_steps": 3,
        "train.checkpoint_every": 1,
        "train.stop_after": 2,
        "mlflow.enabled": False,
    }
    cfg = load_config("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()])
    # started after the AWS environment is set: every Ray worker inherits it
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        first = run_finetune(cfg)
        keys = _keys(client, "runs/s3-run/")
        cfg.train.stop_after = None
        second = run_finetune(cfg)
    finally:
        ray.shutdown()
    return first, keys, second


def test_train_stop_resume_and_export_in_the_bucket(s3, s3_run):
    _, client = s3
    first, keys, second = s3_run
    assert first.metrics["step"] == 2
    # the converted model, and the checkpoints with their ZeRO shards and data position
    assert "runs/s3-run/gaze-init/config.json" in keys
    checkpoints = {k.split("/")[2] for k in keys if "/zero/" in k}
    assert len(checkpoints) == 2, checkpoints  # steps 1 and 2 (num_to_keep=2)
    assert sum(k.endswith("/data_state.json") for k in keys) == 2
    # the rerun of the same name resumed from the bucket (not from step 0) and exported there
    assert second.metrics["step"] == 3
    assert second.export_dir == f"s3://{BUCKET}/runs/s3-run/export"
    exported = _keys(client, "runs/s3-run/export/")
    assert "runs/s3-run/export/config.json" in exported
    assert any(k.endswith(".safetensors") for k in exported)


def test_load_and_serve_the_export_from_the_bucket(s3_run, cache):
    import httpx
    from ray import serve

    from serving.app import app
    from serving.local import local_serve
    from serving.settings import ServeSettings
    from tests.serve.harness import user
    from tracking.models import resolve_model

    export = s3_run[2].export_dir
    with local_serve(num_cpus=2) as url:
        serve.run(app(ServeSettings(model=export, model_name="s3")), name="s3", route_prefix="/")
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "s3", "messages": user(text="what colour?"), "max_tokens": 3},
            timeout=120,
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "s3" and 1 <= body["usage"]["completion_tokens"] <= 3
    # the replica read the model from its copy in the cache; load_model users find it there
    local = resolve_model(export).path
    assert local.is_relative_to(cache) and (local / "config.json").is_file()
    # beside the starting model that the training workers copied
    names = sorted(p.name for p in (cache / "models").iterdir())
    assert [n.split("-")[0] for n in names] == ["export", "gaze"] and local.name in names


def test_bad_storage_fails_at_submission(s3, tmp_path):
    import ray

    from tracking.storage import StorageError
    from training.trainer import run_finetune

    cfg = load_config(
        "configs/demo.yaml",
        ["run.storage_path=s3://no-such-bucket/runs", f"data.synthetic_dir={tmp_path}"],
    )
    # before Ray or any worker starts
    with pytest.raises(StorageError, match="run.storage_path s3://no-such-bucket/runs"):
        run_finetune(cfg)
    cfg = load_config("configs/demo.yaml", ["model.name_or_path=/no/such/model"])
    cfg.run.storage_path = str(tmp_path / "ray")
    with pytest.raises(FileNotFoundError, match="model.name_or_path /no/such/model"):
        run_finetune(cfg)
    assert not ray.is_initialized()
