"""A training rank's micro-batches across epochs, and the data position a checkpoint keeps.

The job's datasets are two readings of the same shards: ``train`` (a whole epoch) and
``resume`` (the rest of an interrupted epoch, without the samples every rank already trained
on: ``pipelines.resume``). ``DataStream`` reads the one its position calls for and moves on
to whole epochs; ``DataStream.state`` is the position of all ranks together, which the
checkpoint writes and a resumed worker group starts from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import torch

from pipelines.config import DataConfig

# the data position (DataPosition) in a checkpoint
DATA_STATE = "data_state.json"
# the names of the job's datasets (Ray Train's dataset shards)
TRAIN_DATASET = "train"
RESUME_DATASET = "resume"


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


def ingest_config():
    """Ray Train's dataset config for the job's datasets: its default, without the deprecated
    ``exclude_resources`` that Ray Train's own default passes (a RayDeprecationWarning in
    every run's log)."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig as IngestConfig

    current = DataContext.get_current().execution_options
    return IngestConfig(
        execution_options=ExecutionOptions(
            resource_limits=current.resource_limits,
            preserve_order=current.preserve_order,
            verbose_progress=current.verbose_progress,
        )
    )


class DataStream:
    """This rank's micro-batches of ``micro_batch_size`` across epochs, resumed at a
    ``DataPosition``; yields ``(batch, sample ids)``.

    The rest of an interrupted epoch comes from the ``resume`` dataset, which drops (before
    the split) the samples every rank already trained on; later epochs from ``train``.
    """

    def __init__(self, data: DataConfig, micro_batch_size: int, processor, position: DataPosition):
        self.data = data
        self.micro_batch_size = micro_batch_size
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
                self.data,
                batch_size=self.micro_batch_size,
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
                raise NoBatches.of(self.epoch, self.micro_batch_size, stats)
            resuming = False
            self.epoch += 1
            self.consumed = []

    def state(self) -> DataPosition:
        """The position of all ranks together (a collective: every rank calls it)."""
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.consumed)
        return DataPosition(epoch=self.epoch, consumed=[i for ids in gathered for i in ids])
