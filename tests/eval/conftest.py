"""Shared fixtures of the evaluation tests: a tiny gaze model and samples with known targets."""

import json

import numpy as np
import pytest
from PIL import Image

from evaluation.runner import question_sample


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from gazeattn.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from gazeattn.model import load_model

    model, processor = load_model(tiny_dir)
    return model.eval(), processor


def square_image(box, size=(96, 96), colour=(220, 30, 30)):
    """A grey image (w, h = size) with a coloured rectangle at box [x0, y0, x1, y1]."""
    image = np.full((size[1], size[0], 3), 60, np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = colour
    return image


@pytest.fixture
def samples():
    boxes = [[60, 10, 90, 40], [5, 50, 30, 90], [40, 40, 70, 70]]
    out = [
        question_sample(
            f"img{i}", "What colour is the square?", "red", images=[square_image(b)], target_box=b
        )  # fmt: skip
        for i, b in enumerate(boxes)
    ]
    frames = [square_image([0, 0, 1, 1], colour=(60, 60, 60)), square_image([10, 10, 40, 40])]
    out.append(
        question_sample(
            "vid0",
            "What colour is the shape that appears?",
            "red",
            videos=[frames],
            target_box=[10, 10, 40, 40],
            target_frame=1,
        )  # fmt: skip
    )
    return out


@pytest.fixture
def json_data(tmp_path):
    return write_json_data(tmp_path)


def write_json_data(tmp_path, *, with_size: bool = True):
    """A LLaVA-format test.json with media/ beside it (the synthetic data's layout): 128 x 96
    images, not the processor's 96 x 96 square; ``with_size=False`` leaves the records
    without ``image_size`` (the box's frame is then the decoded image's own size)."""
    media = tmp_path / "media"
    media.mkdir(parents=True)
    records = []
    for i, box in enumerate([[60, 10, 90, 40], [5, 50, 30, 90], [40, 40, 70, 70]]):
        Image.fromarray(square_image(box, size=(128, 96))).save(media / f"t{i}.png")
        records.append({
            "id": f"test-{i}", "image": f"t{i}.png", "target_box": box,
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                              {"from": "gpt", "value": "red"}],
            **({"image_size": [128, 96]} if with_size else {}),
        })  # fmt: skip
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return path
