"""Held-out WebDataset shards through the data pipeline (``pipelines``) into the evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evaluation.ray_eval import evaluate_dataset, row_sample
from evaluation.runner import EvalConfig, EvalReport, EvalSample


def processor_image_size(model_path: str | Path) -> int:
    from gazeattn.processing import GazeProcessor

    return int(GazeProcessor.from_pretrained(model_path).settings.image_size)


def decoded_dataset(shards: Sequence[str], image_size: int, limit: int | None = None):
    """The pipeline's decoded samples of ``shards``, in file order (no shuffling)."""
    import ray
    from pipelines.config import DataConfig
    from pipelines.dataset import build_train_dataset

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    cfg = DataConfig(
        shards=list(shards), image_size=image_size, shuffle_files=False, progress_bars=False
    )
    dataset = build_train_dataset(cfg)
    return dataset.limit(limit) if limit is not None else dataset


def evaluate_shards(
    shards: Sequence[str],
    model_path: str | Path,
    config: EvalConfig,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0,
    limit: int | None = None,
    image_size: int | None = None,
) -> EvalReport:
    """Batched greedy evaluation of the shards' samples with ``workers`` model actors."""
    size = image_size or processor_image_size(model_path)
    dataset = decoded_dataset(shards, size, limit)
    return evaluate_dataset(dataset, model_path, config, image_size=size, workers=workers,
                            num_gpus=gpus_per_worker)  # fmt: skip


def shard_samples(
    shards: Sequence[str],
    model_path: str | Path,
    *,
    limit: int | None = None,
    image_size: int | None = None,
) -> list[EvalSample]:
    """The first ``limit`` samples of the shards, in this process (pictures, sweeps)."""
    size = image_size or processor_image_size(model_path)
    rows = decoded_dataset(shards, size, limit).take_all()
    return [row_sample(row, size) for row in rows]
