"""Processed images and videos by content (``gazeattn.media_cache``, a server's preparing
processes): a hit encodes exactly as processing does, other content is another item, and the
cache keeps to its budget."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gazeattn.media_cache import MediaCache, media_key
from gazeattn.prefix_cache import visual_prefix
from gazeattn.processing import GazeProcessor
from gazeattn.tiny import FAMILIES
from gazeattn.video import Clip


def _noise(seed: int, width: int = 40, height: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _encode(processor, image, video, system: str | None = None):
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what moves?"}]
    before = [{"role": "system", "content": system}] if system else []
    return processor.encode_sample(
        [*before, {"role": "user", "content": content}],
        images=[image],
        videos=[video],
        add_generation_prompt=True,
    )


def _assert_same(a, b) -> None:
    assert np.array_equal(a.input_ids, b.input_ids) and a.parts == b.parts
    assert sorted(a.vision) == sorted(b.vision)
    for name in a.vision:
        assert a.vision[name].dtype == b.vision[name].dtype
        assert np.array_equal(a.vision[name], b.vision[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cached_item_encodes_as_processing_it_does(family_processors, family):
    processor = family_processors[family]
    image, video = _noise(0), Clip(frames=[_noise(1), _noise(2)], fps=2.0, indices=(0, 1))
    try:
        plain = _encode(processor, image, video)
        processor.media_cache = MediaCache(2**26)
        first = _encode(processor, image, video)
        again = _encode(processor, image, video)
        stats = processor.media_cache.stats
        assert (stats.misses, stats.hits, stats.entries) == (2, 2, 2)
        _assert_same(plain, first)
        _assert_same(plain, again)
        assert plain.media_keys is None and len(again.media_keys) == 2
        assert again.media_keys == first.media_keys
        # the prefix's digest is the arrays' (as without the cache), computed once
        digest = visual_prefix(plain, processor)
        assert visual_prefix(first, processor) == digest
        assert visual_prefix(again, processor) == digest
        # other text before the media: another prefix, though its media are the same
        other = _encode(processor, image, video, system="be brief")
        assert other.media_keys == first.media_keys
        assert visual_prefix(other, processor)[1] != digest[1]
    finally:
        processor.media_cache = None


def test_other_content_is_another_item(family_processors):
    processor = family_processors["llava"]
    image = _noise(3)
    budget = processor.visual_budget
    key = media_key("image", [image], budget)
    changed = np.array(image)
    changed[5, 7, 1] ^= 1  # one bit of one pixel
    assert media_key("image", [Image.fromarray(changed)], budget) != key
    assert media_key("image", [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], budget) != key
    assert media_key("video", [image], budget) != key
    assert media_key("image", [image], budget.__class__(max_pixels=128 * 128)) != key
    frames = [_noise(4), _noise(5)]
    at = media_key("video", frames, budget, (2.0, (0, 1)))
    assert media_key("video", frames, budget, (1.0, (0, 1))) != at
    assert media_key("video", frames, budget, (2.0, (0, 2))) != at
    assert media_key("video", frames[::-1], budget, (2.0, (0, 1))) != at
    assert media_key("video", frames, budget, (2.0, (0, 1))) == at


def test_the_cache_keeps_to_its_budget(family_processors):
    processor = family_processors["llava"]
    size = _encode(processor, _noise(6), [_noise(7)]).vision["pixel_values"][:1].nbytes
    processor.media_cache = cache = MediaCache(int(2.5 * size))  # two single images fit
    try:
        a, b, c = (_noise(s) for s in (8, 9, 10))
        for image in (a, b, a, c):  # a is used again: b is the least recent when c comes
            processor.encode_sample(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                images=[image],
            )
        assert cache.stats.entries == 2 and cache.stats.bytes == 2 * size <= cache.max_bytes
        assert (cache.stats.hits, cache.stats.misses) == (1, 3)
        keys = {media_key("image", [x], processor.visual_budget) for x in (a, b, c)}
        assert set(cache._media) == keys - {media_key("image", [b], processor.visual_budget)}
        # larger than the whole budget: processed and encoded, not kept
        processor.media_cache = small = MediaCache(size // 2)
        sample = _encode(processor, a, [_noise(11)])
        assert small.stats.entries == 0 and small.stats.bytes == 0
        assert len(sample.media_keys) == 2
    finally:
        processor.media_cache = None


def test_a_processor_with_a_cache_saves_as_without(family_processors, tmp_path):
    processor = family_processors["llava"]
    processor.media_cache = MediaCache(2**20)
    try:
        assert "media_cache" not in processor.to_dict()
        processor.save_pretrained(tmp_path)
    finally:
        processor.media_cache = None
    assert GazeProcessor.from_pretrained(str(tmp_path)).media_cache is None
