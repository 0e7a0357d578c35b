"""Typed settings of the data pipeline (the ``data:`` section of job configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class SyntheticSettings:
    """Generated data for the demo and tests (used when ``shards`` is empty)."""

    n_train: int = 64
    n_test: int = 16
    video_fraction: float = 0.25
    image_size: int = 96
    frames: int = 4
    seed: int = 0


@dataclass(kw_only=True)
class DataConfig:
    # tar shard paths, globs or URIs (s3://, gs://: anything pyarrow's filesystems open)
    shards: list[str] = field(default_factory=list)
    # where generated data goes when shards is empty
    synthetic_dir: str = "outputs/data"
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)
    frames_per_video: int = 4
    max_length: int = 4096
    length_policy: Literal["truncate", "drop"] = "drop"
    shuffle_files: bool = True
    shuffle_buffer: int = 64
    seed: int = 0
    # decode + encode actors (each holds a processor) and the CPUs each reserves
    decode_workers: int = 1
    decode_cpus: float = 0.25
    progress_bars: bool = True
