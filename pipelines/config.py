"""Typed settings of the data pipeline (the ``data:`` section of job configs)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from gazeattn.typed_config import Settings

GridKind = Literal["colour", "position", "shape", "shape_at"]
GRID_KINDS: tuple[GridKind, ...] = get_args(GridKind)
# the shapes' colours (pipelines.synthetic draws them; their RGB values live there)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan", "pink")
# what the grid task asks unless told: both questions about places
DEFAULT_GRID_KINDS: tuple[GridKind, ...] = ("colour", "position")


class SyntheticSettings(Settings):
    """Generated data for the demo and tests (used when ``shards`` is empty): the one
    declaration of the synthetic task's settings; ``pipelines.synthetic.generate`` and its
    command line take these (the CLI's flags and help come from the fields)."""

    n_train: int = Field(64, ge=0, description="training records")
    n_test: int = Field(16, ge=0, description="held-out records (no image of training)")
    video_fraction: float = Field(
        0.25, ge=0, le=1, description="share of the records that are videos"
    )
    image_size: int = Field(96, ge=24, description="side of the square images and frames (even)")
    frames: int = Field(4, ge=1, description="frames per video (the shape shows in one)")
    task: Literal["grid", "scatter"] = Field(
        "grid", description="grid: a grid x grid arrangement, the answer in one cell"
    )
    grid: int = Field(
        2, ge=1, le=4,
        description="cells per side (task grid; with 4, 16 cells and 9 colours, only the "
        "asked colour is unique in its image)",
    )  # fmt: skip
    shape_fill: float = Field(
        2 / 3, gt=0, le=1, description="a shape's side as a share of its cell's side"
    )
    train_questions: int = Field(
        1, ge=1, le=16,
        description="questions per training image (task grid: further turns about other "
        "cells); held-out records have one",
    )  # fmt: skip
    grid_kinds: tuple[GridKind, ...] = Field(
        DEFAULT_GRID_KINDS, min_length=1,
        description="question kinds (task grid): colour (of the shape at a position), "
        "position (of the shape of a colour), shape (which shape the one of a colour is), "
        "shape_at (which shape is at a position)",
    )  # fmt: skip
    question_first: bool = Field(
        False,
        description="the first question in a user turn of its own before the media's turn, "
        "not after the media in one turn (LLaVA's <image>\\n{question}): then no question "
        "token can attend to the media (causal); further turns (train_questions) follow it",
    )
    spaced_answers: bool = Field(
        False,
        description='answers written with a leading space (" square"), as a word inside a '
        'sentence: the tiny tokenizer keeps " square", " circle", " triangle" in one '
        'token where "square" is two (s, quare), so the answer is the one token that decides',
    )
    shapes_per_image: int = Field(3, ge=1, le=9, description="shapes per image (task scatter)")
    seed: int = Field(0, description="everything generated is a function of it")
    shard_size: str = Field("512MB", description="target size of a shard")

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticSettings:
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (videos), got {self.image_size}")
        if self.train_questions > self.grid * self.grid:
            raise ValueError(
                f"train_questions must be in [1, {self.grid * self.grid}] (one per cell of the "
                f"{self.grid} x {self.grid} grid), got {self.train_questions}"
            )
        if (
            self.grid * self.grid > len(COLOUR_NAMES)
            and self.train_questions > 1
            and {"position", "shape"} & set(self.grid_kinds)
        ):
            raise ValueError(
                f"a {self.grid} x {self.grid} grid repeats colours: only the asked cell's "
                "colour is unique, so questions that name a colour (grid_kinds position, "
                f"shape) take train_questions 1, got {self.train_questions}"
            )
        if len(set(self.grid_kinds)) != len(self.grid_kinds):
            raise ValueError(f"grid_kinds must be distinct, got {list(self.grid_kinds)}")
        return self


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
