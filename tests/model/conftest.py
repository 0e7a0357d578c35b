"""Tiny offline models shared by the model tests (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest

from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_tiny


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("stock"), gaze=False)


@pytest.fixture(scope="session")
def gaze_dir(tmp_path_factory):
    return build_tiny(
        tmp_path_factory.mktemp("gaze"),
        gaze_config=GazeConfig(keep_ratio=0.3, num_context_tokens=4),
    )


def random_image(seed: int, size=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def image_chat(
    text: str = "what color is the circle?", answer: str | None = "red", n_images: int = 1
) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def video_chat(text: str = "which frame has the star?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
