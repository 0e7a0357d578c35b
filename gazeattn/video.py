"""Video frames with PyAV: uniform sampling over the clip, frames kept at their own size.

The one frame sampler of the project: the processor reads video paths with it, and
the data pipeline decodes shard members with it, so training, evaluation and
serving pick the same frames for the same ``VisualBudget.frames_per_video``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


class EmptyVideo(ValueError):
    """A video without a video stream or without frames."""


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
    import av

    data = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with av.open(data) as container:
            if not container.streams.video:
                raise EmptyVideo("no video stream")
            # decode every frame: container frame counts are missing or wrong for webm and
            # some mp4 files; the clips in training data are short
            decoded = list(container.decode(video=0))
            out = []
            for i in sample_indices(len(decoded), frames):
                image = fit_within(decoded[i].to_image(), max_side)
                out.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    except (av.FFmpegError, OSError, IndexError) as error:
        raise ValueError(f"cannot decode the video: {error}") from error
    return out
