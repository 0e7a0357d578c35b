"""The per-worker training function: DeepSpeed ZeRO-3 over a gaze model, inside Ray Train.

Every rank runs ``train_loop``. Rank 0 logs to MLflow. Checkpoints go through
``ray.train.report`` so Ray merges the rank shards into one directory; a rerun
with the same run name (or a restart after a worker failure) resumes from it.
The last checkpoint also holds a consolidated Hugging Face export under ``hf/``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import ray.train
import torch

from gazeattn.typed_config import from_dict
from training.config import FinetuneConfig
from training.metrics import step_metrics
from training.tracking import Tracker

CKPT_TAG = "zero"
EXPORT_SUBDIR = "hf"


def deepspeed_config(cfg: FinetuneConfig, repo: Path) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the typed config."""
    path = Path(cfg.train.deepspeed_config)
    ds = json.loads((path if path.is_absolute() else repo / path).read_text())
    fills = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    params = ds.get("optimizer", {}).get("params", {})
    for key, value in {
        "lr": cfg.optim.lr,
        "betas": list(cfg.optim.betas),
        "weight_decay": cfg.optim.weight_decay,
    }.items():
        if params.get(key) == "auto":
            params[key] = value
    return ds


def lr_lambda(cfg: FinetuneConfig):
    warm, total = cfg.optim.warmup_steps, max(cfg.train.max_steps, 1)

    def scale(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return scale


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry; ``loop_config`` holds the config dict and driver-resolved paths."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    cfg = from_dict(FinetuneConfig, loop_config["config"])
    repo = Path(loop_config["repo"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    print(f"[train] worker rank {rank}/{ctx.get_world_size()} on node {node}", flush=True)
    torch.manual_seed(cfg.train.seed + rank)
    deepspeed.init_distributed("nccl" if cfg.scaling.use_gpu else "gloo")

    ds_config = deepspeed_config(cfg, repo)
    # alive while loading, so transformers partitions the weights at load (ZeRO-3 init)
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model, processor = _build_model(cfg, loop_config["model_path"])
    trainable = [p for p in model.parameters() if p.requires_grad]

    def make_scheduler(optimizer):
        # DeepSpeed builds its optimizer from the JSON and hands it here
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config, lr_scheduler=make_scheduler
    )

    step = _resume(engine)
    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = Tracker(
            loop_config["mlflow_uri"],
            loop_config["mlflow_run_id"],
            system_metrics=cfg.mlflow.system_metrics,
        )
    batches = _batches(cfg, processor)
    world = ctx.get_world_size()
    attempt_steps = 0
    try:
        while step < cfg.train.max_steps:
            _maybe_crash(loop_config, rank, step)
            batch = next(batches)
            budget = _apply_schedule(cfg, model, processor, step)
            start = time.perf_counter()
            out = engine(**batch, gaze_report=True, gaze_selection=True)
            engine.backward(out.loss)
            engine.step()
            seconds = time.perf_counter() - start
            step += 1
            attempt_steps += 1
            row = step_metrics(
                out.loss, batch, seconds, world, scheduler.get_last_lr()[0], out.gaze_report, budget
            )
            row.update(_drop_metrics())
            if rank == 0 and step % cfg.train.log_every == 0:
                savings = row.get("kv_savings_pct", 0.0)
                print(
                    f"[train] step {step}/{cfg.train.max_steps} loss {row['loss']:.4f} "
                    f"budget {budget} kv savings {savings:.1f}% {row['samples_per_s']:.2f} samples/s",
                    flush=True,
                )
                if tracker:
                    tracker.log_metrics(row, step)
            last = step >= cfg.train.max_steps
            stop = cfg.train.stop_after is not None and attempt_steps >= cfg.train.stop_after
            if last or stop or step % cfg.train.checkpoint_every == 0:
                _checkpoint(engine, model, processor, step, row, export=last)
            if stop and not last:
                break
    finally:
        if tracker:
            tracker.close()


def _build_model(cfg: FinetuneConfig, model_path: str):
    from gazeattn import load_model

    model, processor = load_model(model_path, gaze=cfg.model.gaze_config())
    if cfg.model.freeze_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        # non-reentrant checkpointing fails with frozen parameters under ZeRO-3 (STACK.md)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model.train()
    return model, processor


def _resume(engine) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        _, client_state = engine.load_checkpoint(path, tag=CKPT_TAG)
    step = int(client_state["step"])
    print(f"[train] resumed from step {step}", flush=True)
    return step


def _checkpoint(engine, model, processor, step: int, row: dict, *, export: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step})
        if export:
            _export(model, processor, Path(tmp) / EXPORT_SUBDIR)
        ray.train.report({**row, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export(model, processor, out: Path) -> None:
    """Consolidated full weights (gathered from every rank) in HF format, written by rank 0."""
    import deepspeed

    rank = ray.train.get_context().get_world_rank()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        processor.save_pretrained(out)


def _apply_schedule(cfg: FinetuneConfig, model, processor, step: int) -> float | None:
    """Progressive Top-K: set this step's budget; returns it (regions, or the keep ratio)."""
    from gazeattn.model import set_gaze_budget
    from gazeattn.ops import keep_ratio_schedule, top_k_schedule

    target = cfg.model.gaze_config()
    if cfg.model.attn == "dense":
        return None
    warmup, kind = cfg.top_k_schedule.warmup_steps, cfg.top_k_schedule.kind
    if target.keep_ratio is not None:
        ratio = keep_ratio_schedule(step, target=target.keep_ratio, warmup_steps=warmup, kind=kind)
        set_gaze_budget(model, keep_ratio=ratio)
        return ratio
    if target.top_k == "all":
        return None
    # dense at step 0 means every region of the largest sample the data can hold
    total = max(target.top_k, processor.regions_per_frame * max(cfg.data.frames_per_video, 1))
    k = top_k_schedule(
        step, total_regions=total, target=target.top_k, warmup_steps=warmup, kind=kind
    )
    set_gaze_budget(model, top_k=k)
    return float(k)


def _drop_metrics() -> dict[str, float]:
    from pipelines.dataset import drop_counts

    return {f"data_dropped.{reason}": float(n) for reason, n in drop_counts().items()}


def _batches(cfg: FinetuneConfig, processor):
    from pipelines.dataset import iter_train_batches

    shard = ray.train.get_dataset_shard("train")
    epoch = 0
    while True:
        yield from iter_train_batches(
            shard, processor, cfg.data, batch_size=cfg.train.micro_batch_size, epoch=epoch
        )
        epoch += 1


def _maybe_crash(loop_config: dict, rank: int, step: int) -> None:
    """Fault injection for tests: the process of ``rank`` dies once at ``step``."""
    crash = loop_config.get("crash")
    if not crash or rank != crash["rank"] or step != crash["step"]:
        return
    marker = Path(crash["marker"])
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os._exit(1)
