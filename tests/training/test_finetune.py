"""Fine-tuning end to end on a local Ray: 2 ZeRO-3 workers, a real MLflow server, stop/resume,
a worker process killed mid-run, export and reload, the MLflow server going away mid-run or
absent from the start."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from gazeattn.model import load_model
from tests.servers import MlflowServer, free_port
from tests.training.faults import CrashOnce, TraceSteps
from training.checkpointing import ResumeMismatch
from training.config import load_config
from training.trainer import run_finetune

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _config(tmp_path, name, **sets):
    overrides = {
        "run.name": name,
        "run.storage_path": str(tmp_path / "ray"),
        "data.synthetic_dir": str(tmp_path / "data"),
        "data.synthetic.n_train": 24,
        "data.synthetic.n_test": 4,
        "data.progress_bars": False,
        "train.micro_batch_size": 2,
        "train.log_every": 1,
        "top_k_schedule.warmup_steps": 2,
        "mlflow.experiment": "tests",
        "mlflow.system_metrics": False,
        **sets,
    }
    return load_config("configs/demo.yaml", [f"{k}={v}" for k, v in overrides.items()])


def _fixed_batch(path, seed=0, data: Path | None = None):
    """A one-sample batch for the model at ``path``: the first training image record of the generated
    ``data`` (what training makes likelier), or a random image and a fixed question."""
    model, processor = load_model(path)
    if data is not None:
        from PIL import Image

        from pipelines.conversation import to_messages

        record = next(r for r in json.loads((data / "train.json").read_text()) if r.get("image"))
        image = np.asarray(Image.open(data / "media" / record["image"]).convert("RGB"))
        messages = to_messages(record["conversations"])
        return model, processor.collate([processor.encode_sample(messages, images=[image])])
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What color is the circle in the top left?"},
            ],
        },
        {"role": "assistant", "content": "red"},
    ]
    return model, processor.collate([processor.encode_sample(messages, images=[image])])


def read_trace(trace) -> dict[int, tuple[int, list[str]]]:
    """Step -> (epoch, the sample ids every rank trained on), from the loop's trace files; a
    step that a failed attempt ran and its restart ran again counts as the restart ran it.
    An id is the tar's name and the key (the tmp directories differ between tests)."""
    steps: dict[int, tuple[int, list[str]]] = {}
    for path in sorted(trace.glob("rank*.tsv")):
        mine: dict[int, tuple[int, list[str]]] = {}
        last = None
        for line in path.read_text().splitlines():
            step, epoch, pid, sample = line.split("\t")
            step = int(step)
            if (step, pid) != last:
                mine[step] = (int(epoch), [])  # a step run again replaces the earlier run
                last = (step, pid)
            mine[step][1].append(sample.rsplit("/", 1)[-1])
        for step, (epoch, ids) in mine.items():
            steps.setdefault(step, (epoch, []))[1].extend(ids)
    return steps


def training_ids(tmp_path) -> set[str]:
    """The ids of every training sample, from the shards' manifest."""
    shards = tmp_path / "data" / "shards" / "train"
    manifest = json.loads((shards / "manifest.json").read_text())
    ids = set()
    for shard in manifest["shards"]:
        first, last = int(shard["first_key"]), int(shard["last_key"])
        ids |= {f"{shard['name']}#{k:09d}" for k in range(first, last + 1)}
    assert len(ids) == EPOCH
    return ids


def epoch_samples(steps, epoch: int) -> Counter:
    return Counter(i for e, ids in steps.values() if e == epoch for i in ids)


# 24 training samples over 2 ranks x micro-batches of 2: an epoch is 6 optimizer steps
EPOCH = 24


def test_stop_resume_crash_recovery_export_and_tracking(local_ray, tmp_path, mlflow_server):
    name = "resume-crash"
    cfg = _config(
        tmp_path,
        name,
        **{
            # from random weights, so that six steps visibly lower the loss (the demo's
            # pretrained checkpoint starts near 0 on its task)
            "model.name_or_path": "tiny",
            "model.tiny_options": '{"image_size": 48, "init_range": 0.1}',
            "mlflow.tracking_uri": mlflow_server.uri,
            "train.max_steps": 6,
            "train.checkpoint_every": 2,
            "train.stop_after": 2,
        },
    )
    trace = tmp_path / "trace"
    trace.mkdir()
    first = run_finetune(cfg, hooks=[TraceSteps(str(trace))])
    assert first.metrics["step"] == 2 and first.registered_model is None

    # a rerun of the name with another learning rate would resume these checkpoints: refused
    # before Ray starts, naming the change
    other = cfg.model_copy(deep=True)
    other.optim.lr = 0.5
    with pytest.raises(ResumeMismatch, match="optim.lr"):
        run_finetune(other)

    # the rerun resumes at step 2; rank 1's process dies at step 3 and Ray restarts the group
    cfg.train.stop_after = None
    marker = tmp_path / "crashed"
    second = run_finetune(
        cfg, hooks=[TraceSteps(str(trace)), CrashOnce(rank=1, step=3, marker=str(marker))]
    )
    assert marker.exists(), "the worker process was not killed"
    assert second.metrics["step"] == 6
    assert second.mlflow_run_id == first.mlflow_run_id

    # exact data resume: stopped at step 2, restarted from it after the crash, the run still
    # trained on every sample of epoch 0 exactly once (a restarted epoch repeats samples)
    steps = read_trace(trace)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert {epoch for epoch, _ in steps.values()} == {0}
    seen = epoch_samples(steps, 0)
    assert sum(seen.values()) == EPOCH and set(seen.values()) == {1}, seen
    assert set(seen) == training_ids(tmp_path)

    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(second.mlflow_run_id, "loss")
    assert {m.step for m in history} == {1, 2, 3, 4, 5, 6}
    # the restarted group resumed from the step-2 checkpoint: a restart from step 0 would
    # have logged steps 1 and 2 again (a replayed step is logged once more)
    logged = Counter(m.step for m in history)
    assert logged[1] == logged[2] == 1, logged
    run = client.get_run(second.mlflow_run_id)
    for key in (
        "kv_savings_pct",
        "visual_attended",
        "visual_dense",
        "routing_entropy",
        "top_k",
        "tokens_per_s",
        "lr",
        "kv_savings_pct.layer_0",
    ):
        assert key in run.data.metrics, key
    assert run.data.params["model.attn"] == "gaze" and "git_commit" in run.data.params
    versions = client.search_model_versions("name='gazeattn-demo'")
    assert versions and versions[0].run_id == second.mlflow_run_id

    # the export loads, and its weights are the consolidated ZeRO-3 checkpoint's
    model, processor = load_model(second.export_dir)
    assert model.gaze_config.keep_ratio == cfg.model.gaze.keep_ratio
    init, batch = _fixed_batch(tmp_path / "ray" / name / "gaze-init", data=tmp_path / "data")
    with torch.no_grad():
        before = init(**batch).loss
        after = model(**batch).loss
    assert after < before, f"loss did not fall: {before} -> {after}"


def test_unreachable_mlflow_still_trains_and_the_export_equals_the_zero_checkpoint(
    local_ray, tmp_path
):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # no MLflow server at the configured address when the run starts
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = _config(
        tmp_path,
        "export",
        **{"mlflow.tracking_uri": uri, "train.max_steps": 2, "train.checkpoint_every": 2},
    )
    result = run_finetune(cfg)
    assert result.metrics["step"] == 2 and result.mlflow_run_id is None
    model, processor = load_model(result.export_dir)
    ckpt = sorted(p for p in (tmp_path / "ray" / "export").glob("checkpoint_*") if p.is_dir())[-1]
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="zero")
    reference, _ = load_model(result.export_dir)
    loaded = reference.load_state_dict(state, strict=False)
    # every saved tensor is a parameter of the model; only the tied output embedding (saved
    # once, as the input embedding) may be absent from the ZeRO checkpoint
    assert loaded.unexpected_keys == []
    tied = {"lm_head.weight"} if reference.config.get_text_config().tie_word_embeddings else set()
    assert set(loaded.missing_keys) <= tied, loaded.missing_keys
    _, batch = _fixed_batch(result.export_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=0, rtol=0)


def test_dense_baseline_lands_beside_gaze_and_survives_mlflow_going_down(local_ray, tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        dense = run_finetune(
            _config(
                tmp_path,
                "dense",
                **{"model.attn": "dense", "mlflow.tracking_uri": server.uri, "train.max_steps": 2},
            )
        )
        client = MlflowClient(server.uri)
        dense_metrics = client.get_run(dense.mlflow_run_id).data.metrics
        # the same entries on both sides: the twin attends its whole dense count
        assert dense_metrics["kv_savings_pct"] == pytest.approx(0.0)

        # the gaze run loses its server after its first metrics arrive, and still finishes
        cfg = _config(
            tmp_path,
            "gaze",
            **{
                "mlflow.tracking_uri": server.uri,
                "train.max_steps": 8,
                "mlflow.registered_model_name": "null",
            },
        )
        outcome = {}
        trace = tmp_path / "trace"
        trace.mkdir()
        thread = threading.Thread(
            target=lambda: outcome.update(result=run_finetune(cfg, hooks=[TraceSteps(str(trace))]))
        )
        thread.start()
        deadline = time.monotonic() + 300
        run_id = None
        while time.monotonic() < deadline and thread.is_alive():
            runs = client.search_runs(
                [client.get_experiment_by_name("tests").experiment_id],
                "tags.`gazeattn.run_name` = 'gaze'",
            )
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                run_id = runs[0].info.run_id
                break
            time.sleep(1)
        gaze_keys = set(client.get_run(run_id).data.metrics)
        server.stop()
        thread.join(600)
        assert not thread.is_alive() and outcome["result"].metrics["step"] == 8
        assert (Path(outcome["result"].export_dir) / "config.json").exists()
        # uninterrupted: epoch 0 is steps 1-6, every sample once; epoch 1 begins at step 7
        steps = read_trace(trace)
        assert [steps[s][0] for s in sorted(steps)] == [0] * 6 + [1] * 2
        seen = epoch_samples(steps, 0)
        assert sum(seen.values()) == EPOCH and set(seen.values()) == {1}, seen
        assert set(seen) == training_ids(tmp_path)
        # the dense twin and the gaze run report the same metric names
        assert {"loss", "kv_savings_pct", "visual_attended", "visual_dense"} <= gaze_keys & set(
            dense_metrics
        )
    finally:
        server.stop()
