"""The per-worker training function: DeepSpeed ZeRO-3 over a gaze model, inside Ray Train.

Every rank runs ``train_loop``. Rank 0 logs to MLflow. Checkpoints go through
``ray.train.report`` so Ray merges the rank shards into one directory; a rerun
with the same run name (or a restart after a worker failure) resumes from it.
The last checkpoint also holds a consolidated Hugging Face export under ``hf/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import torch

from training.config import IN_WORKER, FinetuneConfig, deepspeed_config_path
from training.metrics import step_metrics
from training.schedules import TopKClock, apply_top_k, budget_metric, lr_lambda
from training.tracking import Tracker

CKPT_TAG = "zero"
EXPORT_SUBDIR = "hf"
# the data position (DataPosition) in a checkpoint
DATA_STATE = "data_state.json"
TRAIN_DATASET = "train"
# the rest of an interrupted epoch (pipelines.resume)
RESUME_DATASET = "resume"


def deepspeed_config(cfg: FinetuneConfig) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the typed config."""
    ds = json.loads(deepspeed_config_path(cfg).read_text())
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


class NonFiniteLoss(RuntimeError):
    """``train.max_nonfinite_in_a_row`` micro-batches or updates in a row were not finite."""


class NonFiniteWeights(RuntimeError):
    """Weights that are not finite, which are never checkpointed or exported."""


@dataclass(kw_only=True)
class NonFiniteGuard:
    """Counts the micro-batches whose loss was not finite (skipped before their backward) and
    the updates DeepSpeed skipped for non-finite gradients; too many in a row stop the run."""

    limit: int
    skipped: int = 0
    in_a_row: int = 0

    def skip(self, what: str) -> None:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"{self.in_a_row} micro-batches in a row had a non-finite loss or gradients "
                f"(the last: {what}; {self.skipped} skipped in all): the model or its data is "
                "broken (a learning rate too high, bad samples); stopping at "
                "train.max_nonfinite_in_a_row"
            )

    def applied(self) -> None:
        self.in_a_row = 0


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks then skip or step together)."""
    finite = torch.isfinite(loss.detach().float()).all()
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return bool(finite)
    flag = finite.to(torch.int32).reshape(1).to(loss.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def check_weights_finite(model, what: str) -> None:
    """Raise NonFiniteWeights, before ``what`` is written, when a weight is not finite (each
    rank checks its ZeRO-3 partition; the ranks agree)."""
    bad = [
        name
        for name, p in model.named_parameters()
        if not bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all())
    ]
    count = torch.tensor([len(bad)], dtype=torch.int64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            count = count.cuda()
        torch.distributed.all_reduce(count)
    if int(count.item()):
        raise NonFiniteWeights(
            f"not writing the {what}: {int(count.item())} parameter partitions hold nan or inf "
            f"(on this rank: {', '.join(bad[:5]) or 'none'})"
        )


@dataclass(kw_only=True)
class StepResult:
    """One optimizer step: the mean micro-batch loss, the micro-batches, the last gaze report."""

    loss: float
    batches: list[dict]
    reports: dict | None
    sample_ids: list[str]
    seconds: float


def optimizer_step(
    engine,
    batches: Iterator[tuple[dict, list[str]]],
    grad_accum: int,
    guard: NonFiniteGuard,
):
    """``grad_accum`` micro-batches forward and backward; DeepSpeed steps the optimizer (and
    the LR scheduler) at the last one, the accumulation boundary.

    A micro-batch whose loss is not finite on some rank is skipped by every rank before its
    backward (another takes its place) and counted by ``guard``, as is an update that
    DeepSpeed skipped for non-finite gradients."""
    start = time.perf_counter()
    before = engine.global_steps
    losses, used, ids, out = [], [], [], None
    while len(losses) < grad_accum:
        batch, batch_ids = next(batches)
        out = engine(**batch, gaze_report=True, gaze_selection=True)
        if not _finite_on_every_rank(out.loss):
            guard.skip(f"the micro-batch of {', '.join(batch_ids) or 'unnamed samples'}")
            continue
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        used.append(batch)
        ids += batch_ids
    if engine.global_steps != before + 1:
        raise RuntimeError(
            f"{grad_accum} micro-batches made {engine.global_steps - before} optimizer steps: "
            "the DeepSpeed config's gradient_accumulation_steps must equal train.grad_accum"
        )
    if engine.was_step_applied():
        guard.applied()
    elif not engine.fp16_enabled():
        # (fp16's dynamic loss scaler skips overflowing steps by design while it finds its
        # scale: those are its own business, not counted here)
        guard.skip(f"the update of step {engine.global_steps} (non-finite gradients)")
    return StepResult(
        loss=sum(losses) / len(losses),
        batches=used,
        reports=out.gaze_report,
        sample_ids=ids,
        seconds=time.perf_counter() - start,
    )


def run_steps(
    cfg: FinetuneConfig,
    engine,
    model,
    processor,
    scheduler,
    batches,
    step: int,
    world: int = 1,
    clock: TopKClock | None = None,
):
    """Optimizer steps from ``step`` on; yields ``(step, metrics row, StepResult)`` after each
    (``step`` counts optimizer steps, as every schedule and interval of the config does;
    ``world``: the number of ranks, for the throughput metrics; ``clock``: the progressive
    Top-K's, a resumed run's or a new one)."""
    clock = clock or TopKClock.start(cfg.top_k_schedule)
    guard = NonFiniteGuard(limit=cfg.train.max_nonfinite_in_a_row)
    while step < cfg.train.max_steps:
        budget = apply_top_k(cfg, model, clock.progress(step))
        # the LR this step's update used (the scheduler moves on at the boundary)
        lr = scheduler.get_last_lr()[0]
        result = optimizer_step(engine, batches, cfg.train.grad_accum, guard)
        step += 1
        if clock.started_at is None:  # the same on every rank: they observe the same mean
            clock.observe(step, _mean_over_ranks(result.loss, world))
        reported = budget_metric(budget, result.batches[-1])
        row = step_metrics(
            result.loss, result.batches, result.seconds, world, lr, result.reports, reported
        )
        if cfg.model.attn == "gaze":
            row["top_k_progress"] = clock.progress(step)
        row["nonfinite_skipped"] = guard.skipped
        yield step, row, result


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1 or not torch.distributed.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return float(total) / world


def train_loop(loop_config: dict) -> None:
    """Ray Train worker entry; ``loop_config`` holds the config dict and driver-resolved paths."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    cfg = FinetuneConfig.model_validate(loop_config["config"], context={IN_WORKER: True})
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    say(f"[train] worker rank {rank}/{ctx.get_world_size()} on node {node}")
    torch.manual_seed(cfg.train.seed + rank)
    deepspeed.init_distributed("nccl" if cfg.scaling.use_gpu else "gloo")

    ds_config = loop_config["deepspeed"]
    # alive while loading, so transformers partitions the weights at load (ZeRO-3 init)
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model, processor = _build_model(cfg, loop_config["model_path"], report=rank == 0)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def make_scheduler(optimizer):
        # DeepSpeed builds its optimizer from the JSON and hands it here
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config, lr_scheduler=make_scheduler
    )

    step, position, started_at = _resume(engine)
    clock = TopKClock.start(cfg.top_k_schedule, started_at)
    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = Tracker(
            loop_config["mlflow_uri"],
            loop_config["mlflow_run_id"],
            system_metrics=cfg.mlflow.system_metrics,
        )
    stream = DataStream(cfg, processor, position)
    heldout = HeldOut.load(loop_config.get("heldout"), cfg)
    attempt_steps = 0
    try:
        _maybe_crash(loop_config, rank, step)
        steps = run_steps(
            cfg, engine, model, processor, scheduler, iter(stream), step, ctx.get_world_size(),
            clock,
        )  # fmt: skip
        for step, row, result in steps:
            attempt_steps += 1
            row.update(_drop_metrics())
            _trace(loop_config, rank, step, stream.epoch, result.sample_ids)
            if rank == 0 and clock.started_at == step and cfg.top_k_schedule.start == "loss":
                say(f"[train] step {step}: the loss reached {cfg.top_k_schedule.start_loss}; "
                    "the progressive Top-K starts")  # fmt: skip
            if rank == 0 and step % cfg.train.log_every == 0:
                savings = row.get("kv_savings_pct", 0.0)
                say(
                    f"[train] step {step}/{cfg.train.max_steps} loss {row['loss']:.4f} "
                    f"budget {_budget_text(row.get('top_k'))} kv savings {savings:.1f}% "
                    f"{row['samples_per_s']:.2f} samples/s"
                )
                if tracker:
                    tracker.log_metrics(row, step)
            last = step >= cfg.train.max_steps
            if heldout is not None and (last or step % cfg.train.heldout_every == 0):
                # every rank runs the same generation (ZeRO-3 gathers in lockstep)
                scores = heldout.score(model, processor)
                if rank == 0:
                    say(f"[train] step {step} held-out: {_heldout_text(scores)}")
                    if tracker:
                        tracker.log_metrics(scores, step)
            stop = cfg.train.stop_after is not None and attempt_steps >= cfg.train.stop_after
            if last or stop or step % cfg.train.checkpoint_every == 0:
                _checkpoint(
                    engine, model, processor, step, row, stream.state(),
                    export=last, adapter_base=loop_config.get("adapter_base"),
                    top_k_started_at=clock.started_at,
                )  # fmt: skip
            if stop and not last:
                break
            _maybe_crash(loop_config, rank, step)
    finally:
        if tracker:
            tracker.close()


@dataclass(kw_only=True)
class HeldOut:
    """The first ``train.heldout_samples`` of the generated held-out split, scored during
    training with the evaluation's own code (greedy answers at the model's current budget)."""

    samples: list

    @classmethod
    def load(cls, path: str | None, cfg: FinetuneConfig) -> HeldOut | None:
        if path is None:
            return None
        from evaluation.data import load_json

        return cls(samples=load_json(path, limit=cfg.train.heldout_samples))

    def score(self, model, processor) -> dict[str, float]:
        from evaluation.compare import last_layer_hits, routing_lift
        from evaluation.runner import EvalConfig, evaluate_samples

        model.eval()
        try:
            with torch.no_grad():
                config = EvalConfig(pictures=0, max_new_tokens=4, batch_size=16)
                report = evaluate_samples(model, processor, self.samples, config)
        finally:
            model.train()
        out = {"heldout/accuracy": report.metrics["eval/accuracy"]}
        hit, random = last_layer_hits(report.metrics)
        if hit is not None:
            out["heldout/routing_hit_rate"] = hit
            out["heldout/routing_hit_rate_random"] = random
            lift = routing_lift(hit, random)
            if lift is not None:
                out["heldout/routing_lift"] = lift
        return out


def _heldout_text(scores: dict[str, float]) -> str:
    text = f"accuracy {100 * scores['heldout/accuracy']:.1f}%"
    if "heldout/routing_hit_rate" in scores:
        text += (
            f", routing hit {100 * scores['heldout/routing_hit_rate']:.1f}% (random "
            f"{100 * scores['heldout/routing_hit_rate_random']:.1f}%)"
        )
    return text


def _build_model(cfg: FinetuneConfig, model_path: str, *, report: bool = False):
    """The model and processor a worker trains: frozen parts, LoRA adapters and gradient
    checkpointing as configured; ``report`` prints the per-module trainable parameters."""
    from gazeattn import load_model
    from gazeattn.adapters import apply_lora, freeze, trainable_report
    from tracking.storage import is_uri, local_copy

    settings = cfg.model
    # a model on object storage is read from this node's copy (downloaded once per node)
    source = local_copy(model_path) if is_uri(model_path) else model_path
    model, processor = load_model(source, gaze=settings.gaze_config())
    processor.with_budget(settings.visual_budget)
    freeze(model, vision=settings.freeze_vision, projector=settings.freeze_projector)
    if settings.gradient_checkpointing:
        # non-reentrant checkpointing fails with frozen parameters under ZeRO-3 (STACK.md)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    if settings.lora is not None:
        model = apply_lora(
            model,
            settings.lora,
            vision=not settings.freeze_vision,
            projector=not settings.freeze_projector,
        )
    if report:
        say(f"[train] trainable parameters:\n{trainable_report(model)}")
    model.train()
    return model, processor


def say(text: str) -> None:
    """One progress line on the worker's stdout, once.

    Not ``print``: Ray Train patches it in its workers to log each line and, whenever
    ``sys.stdout`` is wrapped (it is there), to print it as well, so the driver showed
    every line twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _budget_text(budget) -> str:
    """The progressive budget for a log line: regions (int) or a keep ratio, rounded."""
    return "-" if budget is None else f"{budget:.3g}" if isinstance(budget, float) else str(budget)


def _resume(engine) -> tuple[int, DataPosition, int | None]:
    """The optimizer step, the data position and the step the progressive Top-K started at
    (None: not yet, or a new run) of the checkpoint Ray Train restored."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, DataPosition(), None
    with checkpoint.as_directory() as path:
        _, client_state = engine.load_checkpoint(path, tag=CKPT_TAG)
        position = DataPosition.load(Path(path))
    step = int(client_state["step"])
    say(
        f"[train] resumed from step {step} (epoch {position.epoch}, "
        f"{len(position.consumed)} of its samples done)"
    )
    return step, position, client_state.get("top_k_started_at")


def _checkpoint(
    engine,
    model,
    processor,
    step: int,
    row: dict,
    position: DataPosition,
    *,
    export: bool,
    adapter_base: str | None = None,
    top_k_started_at: int | None = None,
) -> None:
    """A checkpoint (every rank's shards, the data position); with ``export`` also the HF
    export under ``hf/`` (``adapter_base``: see ``_export``)."""
    rank = ray.train.get_context().get_world_rank()
    # a model that went non-finite must not rotate the last good checkpoint out
    check_weights_finite(model, "export" if export else "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        state = {"step": step, "top_k_started_at": top_k_started_at}
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=state)
        if rank == 0:
            position.save(Path(tmp))
        if export:
            _export(model, processor, Path(tmp) / EXPORT_SUBDIR, adapter_base=adapter_base)
        ray.train.report({**row, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export(model, processor, out: Path, *, adapter_base=None) -> None:
    """Consolidated weights (gathered from every rank), written by rank 0: the full model in
    HF format, or for a LoRA model its adapter in peft's format beside ``adapter_base``."""
    import deepspeed

    from gazeattn.adapters import save_adapter

    rank = ray.train.get_context().get_world_rank()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if rank != 0:
        return
    if adapter_base is not None:
        save_adapter(model, processor, out, base=adapter_base, state_dict=state)
    else:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        processor.save_pretrained(out)


def _drop_metrics() -> dict[str, float]:
    from pipelines.dataset import drop_counts

    return {f"data_dropped.{reason}": float(n) for reason, n in drop_counts().items()}


@dataclass(kw_only=True)
class DataPosition:
    """Where the data stream of all ranks is: the epoch, and the ids of its samples trained on."""

    epoch: int = 0
    consumed: list[str] = field(default_factory=list)

    def save(self, checkpoint_dir: Path) -> None:
        (checkpoint_dir / DATA_STATE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, checkpoint_dir: Path) -> DataPosition:
        path = checkpoint_dir / DATA_STATE
        # checkpoints written before the data position was kept: from the start of epoch 0
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()


class NoBatches(RuntimeError):
    """An epoch gave no batch: every sample was dropped, or too few were left for a full
    micro-batch on every rank (starting another epoch would loop for ever)."""

    @classmethod
    def of(cls, epoch: int, micro_batch: int, stats: dict[str, int]) -> NoBatches:
        from pipelines.dataset import drop_counts, truncated_count

        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        read = stats["samples"] + stats["dropped"]
        return cls(
            f"epoch {epoch} gave no batch: this rank read {read} samples, {stats['dropped']} "
            f"dropped here and {stats['samples']} kept ({stats['truncated']} truncated), and "
            f"every rank needs a full micro-batch of {micro_batch} ({world} ranks); the job's "
            f"drops so far by reason: {drop_counts() or 'none'} ({truncated_count()} "
            "truncated). Check data.max_length, data.length_policy, data.text_only and the "
            "shards (bad_tar), or lower train.micro_batch_size"
        )


class DataStream:
    """This rank's micro-batches across epochs, resumed at a ``DataPosition``.

    The rest of an interrupted epoch comes from the ``resume`` dataset, which drops (before
    the split) the samples every rank already trained on; later epochs from ``train``.
    """

    def __init__(self, cfg: FinetuneConfig, processor, position: DataPosition):
        self.cfg = cfg
        self.processor = processor
        self.epoch = position.epoch
        self.consumed = list(position.consumed)

    def __iter__(self) -> Iterator[tuple[dict, list[str]]]:
        from pipelines.dataset import iter_train_batches
        from pipelines.resume import set_skip

        resuming = bool(self.consumed)
        if resuming:
            if ray.train.get_context().get_world_rank() == 0:
                set_skip(self.consumed)
            # no rank reads the resume dataset before rank 0 has set what it skips
            torch.distributed.barrier()
        while True:
            shard = ray.train.get_dataset_shard(RESUME_DATASET if resuming else TRAIN_DATASET)
            stats: dict[str, int] = {}
            batches = 0
            for batch, ids in iter_train_batches(
                shard,
                self.processor,
                self.cfg.data,
                batch_size=self.cfg.train.micro_batch_size,
                epoch=self.epoch,
                stats=stats,
                with_ids=True,
            ):
                batches += 1
                self.consumed += ids
                yield batch, ids
            # the ranks agree on every batch, so all of them stop here together; the rest of
            # a resumed epoch may be empty (it ended at the checkpoint), a whole epoch not
            if not batches and not resuming:
                raise NoBatches.of(self.epoch, self.cfg.train.micro_batch_size, stats)
            resuming = False
            self.epoch += 1
            self.consumed = []

    def state(self) -> DataPosition:
        """The position of all ranks together (a collective: every rank calls it)."""
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.consumed)
        return DataPosition(epoch=self.epoch, consumed=[i for ids in gathered for i in ids])


def _trace(loop_config: dict, rank: int, step: int, epoch: int, ids: list[str]) -> None:
    """For tests: the sample ids of each optimizer step, one file per rank (with the process
    id, which tells a restarted attempt's run of a step from the failed attempt's)."""
    trace = loop_config.get("trace")
    if trace:
        with open(Path(trace) / f"rank{rank}.tsv", "a") as f:
            f.writelines(f"{step}\t{epoch}\t{os.getpid()}\t{i}\n" for i in ids)


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
