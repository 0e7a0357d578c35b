"""The one encoded-sample type (gazeattn.sample): its Arrow round trip, growth and cuts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gazeattn.ops import Image, Video
from gazeattn.sample import IGNORE, EncodedSample, part_json, part_of_json


def _sample(parts, seed=0) -> EncodedSample:
    n = sum(p if isinstance(p, int) else 5 for p in parts)
    rng = np.random.default_rng(seed)
    labels = np.full(n, IGNORE, np.int64)
    labels[-2:] = 7
    return EncodedSample(
        input_ids=rng.integers(0, 100, n),
        labels=labels,
        vision={"pixel_values": rng.random((2, 3, 4, 4), np.float32), "grid": np.ones((1, 3))},
        parts=parts,
    )


def test_arrow_blocks_carry_samples_exactly():
    samples = [_sample([3, Image(2, 2, lead=1), 4]), _sample([Video(2, 3, 1), 6], seed=1)]
    table = pa.Table.from_pylist(
        [s.arrow_row() for s in samples], schema=pa.schema(EncodedSample.arrow_fields())
    )
    back = list(EncodedSample.from_arrow(table, ids=["a#0", "a#1"]))
    for got, want in zip(back, samples, strict=True):
        assert got.parts == want.parts
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.vision.keys() == want.vision.keys()
        for key, array in want.vision.items():
            np.testing.assert_array_equal(got.vision[key], array)
            assert got.vision[key].dtype == array.dtype
        got.input_ids[0] = -1  # writable copies, not Arrow's read-only buffers
    assert [s.sample_id for s in back] == ["a#0", "a#1"]
    assert back[1].grids == [[2, 3, 1]] and back[0].grids == [[1, 2, 2]]


def test_generated_tokens_extend_the_trailing_text():
    sample = _sample([3, Image(2, 2), 4])
    longer = sample.followed_by([9, 9])
    assert longer.parts == [3, Image(2, 2), 6] and len(longer) == len(sample) + 2
    assert longer.input_ids[-2:].tolist() == [9, 9] and (longer.labels[-2:] == IGNORE).all()
    assert sample.followed_by([1]).followed_by([2]).parts == [3, Image(2, 2), 6]
    ends_with_media = _sample([3, Image(2, 2)])
    assert ends_with_media.followed_by([1]).parts == [3, Image(2, 2), 1]


def test_a_cut_stays_in_the_trailing_text():
    sample = _sample([3, Image(2, 2), 4])
    cut = sample.truncated_to(len(sample) - 3)
    assert cut.truncated and cut.parts == [3, Image(2, 2), 1] and len(cut.labels) == len(cut)
    assert sample.truncated_to(len(sample)) is sample
    with pytest.raises(ValueError, match="trailing text"):
        sample.truncated_to(len(sample) - 4)
    with pytest.raises(ValueError, match="labels"):
        EncodedSample(input_ids=np.arange(3), labels=np.arange(2), vision={}, parts=[3])


def test_part_json():
    for part in (5, Image(3, 4), Image(3, 4, lead=1), Video(2, 3, 4), Video(2, 3, 4, lead=1)):
        assert part_of_json(part_json(part)) == part
    assert part_json(Image(3, 4)) == ["image", 3, 4]
    for bad in (["text"], ["image", 1], ["audio", 3], ["video", 1, 2]):
        with pytest.raises(ValueError, match="not a sample part"):
            part_of_json(bad)
