"""Images and video frames shrunk as soon as they are decoded (``GazeProcessor.fit_image`` /
``fit_video``, #25 item 2) encode exactly as the originals do, in every family: the early
resize is the processing's own, and its later resize of the result keeps it as it is."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gazeattn.tiny import FAMILIES


def _noise(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _encode(processor, images=(), videos=()):
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "what?"}]}]
    return processor.encode_sample(
        messages, images=list(images), videos=list(videos), add_generation_prompt=True
    )


def _assert_same(a: dict, b: dict) -> None:
    assert np.array_equal(a.input_ids, b.input_ids) and a.parts == b.parts
    assert a.vision and list(a.vision) == list(b.vision)
    for key, array in a.vision.items():
        assert np.array_equal(array, b.vision[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fitted_image_encodes_as_the_original(family_processors, family):
    processor = family_processors[family]
    for seed, (width, height) in enumerate([(523, 301), (150, 700), (640, 640)]):
        original = _noise(seed, width, height)
        fitted = processor.fit_image(original)
        # every tiny family resizes these into fewer pixels
        assert fitted.width * fitted.height < width * height, (family, fitted.size)
        _assert_same(_encode(processor, images=[fitted]), _encode(processor, images=[original]))
    small = _noise(9, 12, 10)  # upscaled by the processing: kept as it is
    assert processor.fit_image(small) is small


@pytest.mark.parametrize("family", FAMILIES)
def test_fitted_video_frames_encode_as_the_originals(family_processors, family):
    processor = family_processors[family]
    frames = [_noise(10 + i, 300, 180) for i in range(6)]
    fitted = processor.fit_video(frames)
    assert len(fitted) == len(frames)
    assert len({f.size for f in fitted}) == 1 and fitted[0].width < 300, fitted[0].size
    _assert_same(_encode(processor, videos=[fitted]), _encode(processor, videos=[frames]))
    # frames of different sizes are left for the encoding to refuse
    mixed = [_noise(1, 300, 180), _noise(2, 200, 180)]
    if family.startswith("qwen3"):
        assert processor.fit_video(mixed) == mixed


def test_a_processor_of_another_backend_is_taken_on_pil(family_processors):
    """Where torchvision is installed, transformers loads its backend of the families' image
    processors; gazeattn takes the PIL backend's class with the same settings (the media
    rules hand it numpy arrays, and every machine then resizes as training did)."""
    from transformers.image_processing_utils import BaseImageProcessor

    from gazeattn.processing import ProcessorInputError, pil_backend

    for processor in family_processors.values():
        ours = processor.image_processor
        settings = {k: v for k, v in ours.to_dict().items() if k != "image_processor_type"}
        # a processor of another backend, named as transformers names the torchvision one
        other = type(type(ours).__name__.removesuffix("Pil"), (BaseImageProcessor,), {})
        taken = pil_backend(other(**settings))
        assert type(taken) is type(ours) and taken.to_dict() == ours.to_dict()
        assert pil_backend(ours) is ours
    with pytest.raises(ValueError, match="no PIL backend") as raised:
        pil_backend(type("NoSuchImageProcessor", (BaseImageProcessor,), {})())
    # a load-time configuration error, not a request's input error (a server's 400)
    assert not isinstance(raised.value, ProcessorInputError)
