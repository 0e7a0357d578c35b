"""Video frames with PyAV: uniform sampling over the clip, frames kept at their own size.

The one frame sampler of the project: the processor reads video paths with it, and
the data pipeline decodes shard members with it, so training, evaluation and
serving pick the same frames for the same ``VisualBudget.frames_per_video``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class EmptyVideo(ValueError):
    """A video without a video stream or without frames."""


@dataclass(frozen=True, kw_only=True)
class Clip:
    """Video frames with their timing, for families whose prompts show it (Qwen3-VL).

    ``frames[i]`` is frame ``indices[i]`` of a video of ``fps`` frames per second.
    ``indices`` None: the frames are the video's consecutive frames, which the family may
    sample further; ``fps`` None: unknown (the family's default is used, and said).
    """

    frames: Sequence[Any]
    fps: float | None = None
    indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.indices is not None and len(self.indices) != len(self.frames):
            raise ValueError(f"{len(self.frames)} frames but {len(self.indices)} indices")


def fit_within(image, max_side: int | None):
    """A PIL image with its longer side at most ``max_side`` (aspect kept); None: unchanged."""
    from PIL import Image

    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def sample_indices(total: int, count: int) -> np.ndarray:
    """``count`` frame indices spread uniformly over ``total`` frames (repeats when too few)."""
    if total <= 0:
        raise EmptyVideo("the video has no frames")
    # the centre of each of `count` equal segments
    return np.minimum(((np.arange(count) + 0.5) * total / count).astype(np.int64), total - 1)


def read_video(source: str | Path | bytes, frames: int, *, max_side: int | None = None) -> list:
    """A video file or its bytes -> ``frames`` HxWx3 uint8 frames sampled uniformly.

    ``max_side`` bounds the longer side (aspect kept) to limit memory; None keeps the
    decoded size. Raises EmptyVideo for a clip without frames, ValueError for one PyAV
    cannot decode.
    """
    return list(read_clip(source, frames, max_side=max_side).frames)


def read_clip(source: str | Path | bytes, frames: int, *, max_side: int | None = None) -> Clip:
    """``read_video``'s frames as a Clip: with their indices and the stream's frame rate."""
    import av

    data = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with av.open(data) as container:
            if not container.streams.video:
                raise EmptyVideo("no video stream")
            # decode every frame: container frame counts are missing or wrong for webm and
            # some mp4 files; the clips in training data are short
            rate = container.streams.video[0].average_rate
            decoded = list(container.decode(video=0))
            out = []
            picked = sample_indices(len(decoded), frames)
            for i in picked:
                image = fit_within(decoded[i].to_image(), max_side)
                out.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except (av.FFmpegError, OSError, IndexError) as error:
        raise ValueError(f"cannot decode the video: {error}") from error
    fps = float(rate) if rate else None
    return Clip(frames=out, fps=fps, indices=tuple(int(i) for i in picked))
