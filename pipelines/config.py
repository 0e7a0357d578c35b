"""Typed settings of the data pipeline (the ``data:`` section of job configs)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from gazeattn.typed_config import Settings

GridKind = Literal["colour", "position", "shape"]
GRID_KINDS: tuple[GridKind, ...] = get_args(GridKind)
# what the grid task asks unless told: both questions about places
DEFAULT_GRID_KINDS: tuple[GridKind, ...] = ("colour", "position")


class SyntheticSettings(Settings):
    """Generated data for the demo and tests (used when ``shards`` is empty)."""

    n_train: int = Field(64, ge=0)
    n_test: int = Field(16, ge=0)
    video_fraction: float = Field(0.25, ge=0, le=1)
    image_size: int = Field(96, ge=24)
    frames: int = Field(4, ge=1)
    # "grid": a grid x grid arrangement, the answer in one cell (pipelines.synthetic)
    task: Literal["grid", "scatter"] = "grid"
    grid: int = Field(2, ge=1, le=3)
    # a shape's side as a share of its cell's side (grid task and videos)
    shape_fill: float = Field(2 / 3, gt=0, le=1)
    # questions per training image (grid task; further turns about other cells); held-out
    # records always have one
    train_questions: int = Field(1, ge=1, le=9)
    # the grid task's question kinds: "colour" (of the shape at a position), "position" (of
    # the shape of a colour), "shape" (which shape the one of a colour is)
    grid_kinds: tuple[GridKind, ...] = Field(DEFAULT_GRID_KINDS, min_length=1)
    shapes_per_image: int = Field(3, ge=1, le=9)  # task "scatter"
    seed: int = 0
    shard_size: str = "512MB"


class DataConfig(Settings):
    """Where the shards are and how samples are decoded, shuffled and cut to length.

    - ``shards``: tar paths, directories, local globs or URIs that pyarrow/fsspec read
      (``s3://bucket/train/`` is listed by pyarrow, not globbed here). Empty: the synthetic
      dataset is generated and sharded under ``synthetic_dir``.
    - ``max_image_side``: images and video frames keep their own size at decode time (the
      checkpoint's image processor resizes them once, as when serving); a number bounds the
      longer side first, to limit memory on very large media. How many frames a video gives
      is the model's visual budget (``model.visual_budget``), not a data setting.
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

    shards: list[str] = Field(default_factory=list)
    synthetic_dir: str = "outputs/data"
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    max_image_side: int | None = Field(None, ge=1)
    max_length: int = Field(4096, ge=1)
    length_policy: Literal["truncate", "drop"] = "drop"
    text_only: Literal["dummy_image", "drop"] = "dummy_image"
    shuffle_files: bool = True
    shuffle_buffer: int = Field(64, ge=0)
    seed: int = 0
    decode_workers: int = Field(1, ge=1)
    decode_cpus: float = Field(0.25, gt=0)
    decode_batch_size: int = Field(16, ge=1)
    progress_bars: bool = True

    @field_validator("shards", mode="before")
    @classmethod
    def _one_shard(cls, value):
        # `shards: s3://bucket/train/` (one path) is a list of one
        return [value] if isinstance(value, str) else value


# the name this module used before the merge with main
SyntheticConfig = SyntheticSettings
