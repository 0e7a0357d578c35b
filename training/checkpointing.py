"""Checkpoints of a fine-tuning run: written and restored by the workers, checked by the driver.

A checkpoint is every rank's ZeRO-3 shards (DeepSpeed's ``save_checkpoint``, tag ``zero``)
with the step, the step the progressive Top-K started at and the data position
(``pipelines.stream.DataPosition``); the last one also holds the consolidated Hugging Face
export under ``hf/``. Ray Train merges the ranks' files into one directory per checkpoint
under ``<run.storage_path>/<run.name>/`` and restores the latest one to a rerun of the same
name, which is how a stopped or failed job goes on.

A rerun of a name restores that checkpoint whatever its configuration says, so the driver
keeps the configuration that wrote it beside the checkpoints (``RUN_RECORD``) and refuses
(``ResumeMismatch``) a rerun whose configuration differs in anything but ``RESUMABLE``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import torch

from gazeattn.typed_config import flatten, to_dict
from pipelines.stream import DataPosition
from tracking.storage import Location
from training.config import FinetuneConfig

CKPT_TAG = "zero"
EXPORT_SUBDIR = "hf"
# the configuration that wrote a run's checkpoints, beside them
RUN_RECORD = "gazeattn_run.json"
# Ray Train names each checkpoint directory of a run so
CHECKPOINT_PREFIX = "checkpoint_"
# settings a resumed run may change (a dotted key, or a whole section): how long it
# goes on and how it reports, where it exports, how its workers and decoders are resourced.
# Anything else (the model, its budget, the data, the optimizer and its schedules, the number
# of ZeRO-3 ranks) must be what the checkpoints were written with.
RESUMABLE = (
    "train.max_steps",
    "train.stop_after",
    "train.checkpoint_every",
    "train.log_every",
    "train.heldout_every",
    "train.heldout_samples",
    "train.max_nonfinite_in_a_row",
    "data.decode_workers",
    "data.decode_cpus",
    "data.progress_bars",
    "scaling.cpus_per_worker",
    "scaling.gpus_per_worker",
    "scaling.resources_per_worker",
    "scaling.placement_strategy",
    "scaling.collective_timeout_s",
    "run",
    "mlflow",
)


class NonFiniteWeights(RuntimeError):
    """Weights that are not finite, which are never checkpointed or exported."""


class ResumeMismatch(ValueError):
    """A rerun of a run name whose checkpoints were written with another configuration."""


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
class Resumed:
    """What a worker group starts from: step 0 of a new run, or a restored checkpoint's."""

    step: int = 0
    position: DataPosition
    # the step the progressive Top-K started at (None: not yet, or a new run)
    top_k_started_at: int | None = None


def restore(engine, say) -> Resumed:
    """The checkpoint Ray Train restored to this worker group, loaded into ``engine``
    (``say``: the progress line writer)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Resumed(position=DataPosition())
    with checkpoint.as_directory() as path:
        _, client_state = engine.load_checkpoint(path, tag=CKPT_TAG)
        position = DataPosition.load(Path(path))
    step = int(client_state["step"])
    say(
        f"[train] resumed from step {step} (epoch {position.epoch}, "
        f"{len(position.consumed)} of its samples done)"
    )
    return Resumed(
        step=step, position=position, top_k_started_at=client_state.get("top_k_started_at")
    )


def save(
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
    """A checkpoint (every rank's shards, the data position), reported to Ray Train with the
    step's metrics; with ``export`` also the HF export under ``hf/`` (``adapter_base``: see
    ``export_weights``)."""
    rank = ray.train.get_context().get_world_rank()
    # a model that went non-finite must not rotate the last good checkpoint out
    check_weights_finite(model, "export" if export else "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        state = {"step": step, "top_k_started_at": top_k_started_at}
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=state)
        if rank == 0:
            position.save(Path(tmp))
        if export:
            export_weights(model, processor, Path(tmp) / EXPORT_SUBDIR, adapter_base=adapter_base)
        ray.train.report({**row, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def export_weights(model, processor, out: Path, *, adapter_base=None) -> None:
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


def has_checkpoints(run: Location) -> bool:
    """Whether Ray Train would restore a checkpoint of the run at ``run`` (its directory)."""
    entries = run.filesystem.get_file_info(pafs.FileSelector(run.path, allow_not_found=True))
    return any(
        e.type == pafs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX)
        for e in entries
    )


def _resumable(key: str) -> bool:
    return any(key == r or key.startswith(f"{r}.") for r in RESUMABLE)


def config_changes(recorded: dict, cfg: FinetuneConfig) -> list[str]:
    """``key: recorded -> now`` for every setting not in ``RESUMABLE`` that differs."""
    before, now = flatten(recorded), flatten(to_dict(cfg))
    return [
        f"{key}: {before.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in sorted(before.keys() | now.keys())
        if not _resumable(key) and before.get(key) != now.get(key)
    ]


def check_resume(cfg: FinetuneConfig, run: Location) -> list[str]:
    """Before a run starts: when ``run`` (its directory) holds checkpoints, refuse a
    configuration that differs from the recorded one (``ResumeMismatch``); then record this
    one. Returns the changes from the record of a run without checkpoints (a new start of
    its name: what it prepared for the old configuration may be stale). A run's checkpoints
    written before records were kept are resumed, with a note."""
    fs, record = run.filesystem, run.join(RUN_RECORD)
    changes = []
    if run.is_file(RUN_RECORD):
        with fs.open_input_stream(record.path) as f:
            changes = config_changes(json.loads(f.read().decode())["config"], cfg)
    if has_checkpoints(run):
        if not run.is_file(RUN_RECORD):
            print(
                f"[finetune] resuming {run.uri}, whose checkpoints predate {RUN_RECORD}: its "
                "configuration is not checked against this one",
                flush=True,
            )
        elif changes:
            raise ResumeMismatch(
                f"run.name {cfg.run.name!r} has checkpoints at {run.uri}, written with "
                f"another configuration; a rerun of the name resumes them, and these "
                f"settings differ: {'; '.join(changes)}. Pass --set run.name=NEW for a new "
                f"run, or delete {run.uri} to start this name again (only "
                f"{', '.join(RESUMABLE)} may change on a resume)"
            )
    fs.create_dir(run.path, recursive=True)
    with fs.open_output_stream(record.path) as f:
        f.write(json.dumps({"config": to_dict(cfg)}, indent=1).encode())
    return changes
