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
    shapes_per_image: int = 3
    seed: int = 0
    shard_size: str = "512MB"


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how samples are decoded, shuffled and cut to length.

    - ``shards``: tar paths, directories, local globs or URIs that pyarrow/fsspec read
      (``s3://bucket/train/`` is listed by pyarrow, not globbed here). Empty: the synthetic
      dataset is generated and sharded under ``synthetic_dir``.
    - ``image_size``: images and video frames are resized to this square side at decode time;
      None: the processor's image size (so the processor does no second resize).
    - ``length_policy``: a sample longer than ``max_length`` tokens is ``truncate``d (only when
      the cut falls in the text after the last image/frame; otherwise dropped) or ``drop``ped;
      both counted.
    - ``text_only``: ``dummy_image`` gives a text-only sample a black image in its first user
      turn so that every batch runs the vision tower exactly once (ZeRO-3 ranks must make the
      same calls); ``drop`` drops text-only samples (counted).
    - ``shuffle_buffer``: rows in each worker's local shuffle buffer (0: no local shuffle).
    - ``decode_workers``: concurrent decode(+encode) tasks; ``decode_cpus``: CPUs each reserves
      (small, since the pipeline shares the machine with the training workers).
    """

    shards: list[str] = field(default_factory=list)
    synthetic_dir: str = "outputs/data"
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)
    image_size: int | None = None
    frames_per_video: int = 4
    max_length: int = 4096
    length_policy: Literal["truncate", "drop"] = "drop"
    text_only: Literal["dummy_image", "drop"] = "dummy_image"
    shuffle_files: bool = True
    shuffle_buffer: int = 64
    seed: int = 0
    decode_workers: int = 1
    decode_cpus: float = 0.25
    decode_batch_size: int = 16
    progress_bars: bool = True

    def __post_init__(self) -> None:
        if self.length_policy not in ("truncate", "drop"):
            raise ValueError(
                f"length_policy must be 'truncate' or 'drop', not {self.length_policy!r}"
            )
        if self.text_only not in ("dummy_image", "drop"):
            raise ValueError(f"text_only must be 'dummy_image' or 'drop', not {self.text_only!r}")
        if (self.image_size or 1) < 1 or self.frames_per_video < 1 or self.max_length < 1:
            raise ValueError("image_size, frames_per_video and max_length must be positive")
        if isinstance(self.shards, str):
            self.shards = [self.shards]


# the name this module used before the merge with main
SyntheticConfig = SyntheticSettings
