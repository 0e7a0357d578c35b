"""Held-out WebDataset shards through the data pipeline (``pipelines``) into the evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evaluation.ray_eval import evaluate_dataset, row_sample
from evaluation.runner import EvalConfig, EvalReport, EvalSample


def shard_rows(shards: Sequence[str], limit: int | None = None):
    """Grouped tar rows of the test split (synthetic test shards when ``shards`` is empty)."""
    import ray

    from pipelines.config import DataConfig
    from pipelines.dataset import resolve_shards, split_tar, start_drop_counter

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start_drop_counter()
    paths = resolve_shards(DataConfig(shards=list(shards), progress_bars=False), "test")
    # light reservations, so the reads never wait behind the model actors for a CPU
    cpus = {"num_cpus": 0.25}
    rows = ray.data.read_binary_files(paths, include_paths=True, ray_remote_args=cpus)
    rows = rows.flat_map(split_tar, **cpus)
    return rows.limit(limit) if limit is not None else rows


def evaluate_shards(
    shards: Sequence[str],
    model_path: str | Path,
    config: EvalConfig,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0,
    limit: int | None = None,
    frames_per_video: int = 4,
) -> EvalReport:
    """Batched greedy evaluation of the shards' samples with ``workers`` model actors."""
    rows = shard_rows(shards, limit)
    return evaluate_dataset(rows, model_path, config, frames_per_video=frames_per_video,
                            workers=workers, num_gpus=gpus_per_worker)  # fmt: skip


def shard_samples(
    shards: Sequence[str], *, limit: int | None = None, frames_per_video: int = 4
) -> list[EvalSample]:
    """The first ``limit`` samples of the shards, decoded in this process (pictures, sweeps)."""
    rows = shard_rows(shards, limit).take_all()
    samples = (row_sample(row, frames_per_video) for row in rows)
    return [s for s in samples if s is not None]
