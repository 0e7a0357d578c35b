"""Tiny offline checkpoints of every family, saved in the hub's layout (built once per session)."""

from __future__ import annotations

import numpy as np
import pytest

from gazeattn.ops import GazeConfig
from gazeattn.tiny import build_stock, build_tiny

FAMILIES = ("llava", "llava-1.5", "qwen2.5-vl", "qwen2-vl")


@pytest.fixture(scope="session")
def stock_dirs(tmp_path_factory):
    """family -> a stock checkpoint directory."""
    root = tmp_path_factory.mktemp("stock")
    return {family: build_stock(root / family, family=family) for family in FAMILIES}


@pytest.fixture(scope="session")
def stock_dir(stock_dirs):
    return stock_dirs["llava"]


@pytest.fixture(scope="session")
def gaze_dirs(tmp_path_factory):
    """family -> a converted gaze checkpoint (keep_ratio 0.3, 4 context tokens)."""
    root = tmp_path_factory.mktemp("gaze")
    config = GazeConfig(keep_ratio=0.3, num_context_tokens=4)
    return {f: build_tiny(root / f, family=f, gaze_config=config) for f in FAMILIES}


@pytest.fixture(scope="session")
def gaze_dir(gaze_dirs):
    return gaze_dirs["llava"]


@pytest.fixture(scope="session")
def family_processors(tmp_path_factory):
    """family -> the processor of a tiny gaze checkpoint, for every family ``gazeattn.tiny``
    builds (keep_ratio 0.3, 2 context tokens). Shared: a test that changes one restores it."""
    from gazeattn.processing import GazeProcessor
    from gazeattn.tiny import FAMILIES as ALL

    root = tmp_path_factory.mktemp("processors")
    config = GazeConfig(keep_ratio=0.3, num_context_tokens=2)
    return {
        f: GazeProcessor.from_pretrained(str(build_tiny(root / f, family=f, gaze_config=config)))
        for f in ALL
    }


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
