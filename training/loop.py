"""The per-worker training function: DeepSpeed ZeRO-3 over a gaze model, inside Ray Train.

Every rank runs ``train_loop``: it builds the model and the DeepSpeed engine, restores the
checkpoint Ray Train gives it (``training.checkpointing``), reads its micro-batches from
``pipelines.stream.DataStream`` and runs optimizer steps (``run_steps``) under the LR and
progressive Top-K schedules (``training.schedules``). Rank 0 logs to MLflow. After every step
the loop calls the run's step hooks (``StepEvent``), which is how tests trace the samples of
each step and kill a worker at a step.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray.train
import torch

from pipelines.stream import DataStream
from training import checkpointing
from training.config import IN_WORKER, FinetuneConfig, deepspeed_config_path, name_the_accelerator
from training.metrics import step_metrics
from training.schedules import TopKClock, apply_top_k, budget_metric, lr_lambda
from training.tracking import Tracker


@dataclass(frozen=True, kw_only=True)
class StepEvent:
    """What a step hook sees: this rank, the optimizer steps done, the epoch, and the sample
    ids of this rank's last step (none in the event before the first step of an attempt)."""

    rank: int
    step: int
    epoch: int
    sample_ids: tuple[str, ...] = ()


# a step hook (``run_finetune(hooks=...)``): called on every rank before an attempt's first
# step and after each step (after its checkpoint); it must pickle (Ray sends it to the workers)
StepHook = Callable[[StepEvent], None]


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
    _quiet_reports()
    cfg = FinetuneConfig.model_validate(loop_config["config"], context={IN_WORKER: True})
    name_the_accelerator(cfg)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    say(f"[train] worker rank {rank}/{ctx.get_world_size()} on node {node}")
    torch.manual_seed(cfg.train.seed + rank)
    # on CPU it builds its shared-memory collectives and prints a line saying so (print, not
    # its logger), a line per worker in every run's log
    with _without_print():
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

    resumed = checkpointing.restore(engine, say)
    step = resumed.step
    clock = TopKClock.start(cfg.top_k_schedule, resumed.top_k_started_at)
    tracker = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        tracker = Tracker(
            loop_config["mlflow_uri"],
            loop_config["mlflow_run_id"],
            system_metrics=cfg.mlflow.system_metrics,
        )
    stream = DataStream(cfg.data, cfg.train.micro_batch_size, processor, resumed.position)
    heldout = HeldOut.load(loop_config.get("heldout"), cfg)
    hooks: list[StepHook] = loop_config.get("hooks") or []
    attempt_steps = 0
    try:
        for hook in hooks:
            hook(StepEvent(rank=rank, step=step, epoch=stream.epoch))
        steps = run_steps(
            cfg, engine, model, processor, scheduler, iter(stream), step, ctx.get_world_size(),
            clock,
        )  # fmt: skip
        for step, row, result in steps:
            attempt_steps += 1
            row.update(_drop_metrics())
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
                checkpointing.save(
                    engine, model, processor, step, row, stream.state(),
                    export=last, adapter_base=loop_config.get("adapter_base"),
                    top_k_started_at=clock.started_at,
                )  # fmt: skip
                if rank == 0:
                    say(
                        f"[train] step {step}: checkpoint saved" + (" and exported" if last else "")
                    )
            event = StepEvent(
                rank=rank, step=step, epoch=stream.epoch, sample_ids=tuple(result.sample_ids)
            )
            for hook in hooks:
                hook(event)
            if stop and not last:
                break
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


def _quiet_reports() -> None:
    """Ray Train's INFO lines for each report and checkpoint ("Reporting training result
    ...", "Checkpoint successfully created at ...", 16 of a demo's 164 lines) are dropped:
    the job says what it saved in its own lines. One logger is named by its module's file."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _without_print():
    """``print`` does nothing in the block: a redirect of stdout does not silence it in a Ray
    Train worker, whose patched ``print`` sends every line to the logger as well."""
    saved = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = saved


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


def _drop_metrics() -> dict[str, float]:
    from pipelines.dataset import drop_counts

    return {f"data_dropped.{reason}": float(n) for reason, n in drop_counts().items()}
