"""Held-out WebDataset shards through the data pipeline (``pipelines``) into the evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evaluation.ray_eval import evaluate_dataset, row_sample
from evaluation.runner import EvalConfig, EvalReport, EvalSample


def shard_rows(shards: Sequence[str], limit: int | None = None):
    """Raw tar rows (``key``, ``url``, ``names``, ``blobs``) of the test split (the synthetic
    test shards when ``shards`` is empty), read by the pipeline's tolerant tar datasource."""
    import ray

    from pipelines.config import DataConfig
    from pipelines.dataset import TolerantWebDataset, resolve_shards

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    paths = resolve_shards(DataConfig(shards=list(shards), progress_bars=False), "test")
    # light reservations, so the reads never wait behind the model actors for a CPU
    rows = ray.data.read_datasource(TolerantWebDataset(paths), num_cpus=0.25)
    # a damaged tar shows up as one row with its error and no sample
    rows = rows.filter(lambda row: not row["error"], num_cpus=0.25)
    return rows.limit(limit) if limit is not None else rows


def evaluate_shards(
    shards: Sequence[str],
    model_path: str | Path,
    config: EvalConfig,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0,
    limit: int | None = None,
    frames_per_video: int | None = None,
) -> EvalReport:
    """Batched greedy evaluation of the shards' samples with ``workers`` model actors
    (videos sampled to the model's own frame budget unless ``frames_per_video`` is given)."""
    rows = shard_rows(shards, limit)
    return evaluate_dataset(rows, model_path, config, frames_per_video=frames_per_video,
                            workers=workers, num_gpus=gpus_per_worker)  # fmt: skip


def shard_samples(
    shards: Sequence[str],
    *,
    limit: int | None = None,
    frames_per_video: int,
) -> list[EvalSample]:
    """The first ``limit`` samples of the shards, decoded in this process (pictures, sweeps)."""
    rows = shard_rows(shards, limit).take_all()
    samples = (row_sample(row, frames_per_video) for row in rows)
    return [s for s in samples if s is not None]
