"""Evaluation samples from LLaVA-format records (the synthetic data's ``test.json``).

A record has ``conversations`` (human/gpt turns with ``<image>``/``<video>`` markers),
``image`` or ``video`` (file names under the media folder) and optionally
``options``, ``target_box``, ``target_frame``, ``image_size``. The last gpt turn is
the reference answer; the turns before it are the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evaluation.runner import EvalSample
from pipelines.conversation import to_messages


def sample_from_record(
    record: dict, images: Sequence[Any] = (), videos: Sequence[Sequence[Any]] = ()
) -> EvalSample:
    """One evaluation sample from a record and its decoded media."""
    messages = to_messages(record["conversations"])
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"record {record.get('id')!r} does not end with the answer (a gpt turn)")
    answer = messages[-1]["content"][0].get("text", "")
    frame = record.get("target_frame")
    return EvalSample(
        id=str(record.get("id", "")),
        messages=messages[:-1],
        answer=answer,
        images=list(images),
        videos=[list(v) for v in videos],
        options=record.get("options"),
        target_box=record.get("target_box"),
        target_frame=None if frame is None or frame != frame else int(frame),  # NaN from Ray
        image_size=record.get("image_size"),
    )


def read_video(path: str | Path | bytes) -> list[np.ndarray]:
    """Every frame of a video file (or its bytes) as HWC uint8 RGB."""
    import io

    import av

    source = io.BytesIO(path) if isinstance(path, bytes) else str(path)
    with av.open(source) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def load_json(path: str | Path, *, media_dir: str | Path | None = None, limit: int | None = None):
    """Samples of a JSON list of records; media paths are relative to ``media_dir``
    (default: ``media/`` beside the JSON file)."""
    path = Path(path)
    media = Path(media_dir) if media_dir else path.parent / "media"
    records = json.loads(path.read_text())[:limit]
    samples = []
    for record in records:
        images = (
            [np.asarray(Image.open(media / record["image"]).convert("RGB"))]
            if record.get("image")
            else []
        )
        videos = [read_video(media / record["video"])] if record.get("video") else []
        samples.append(sample_from_record(record, images, videos))
    return samples
