"""A sample whose answer the length policy cut away is dropped and counted, not trained on
(all its labels masked: the loss of such a batch is 0 / 0 = nan)."""

import numpy as np
import pytest

from gazeattn.ops import Image
from gazeattn.sample import IGNORE, EncodedSample
from pipelines.config import DataConfig
from pipelines.dataset import fit_length
from pipelines.decode import BadSample


def _sample(prompt: int, answer: int) -> EncodedSample:
    """An image of 9 tokens, then ``prompt`` text tokens and an ``answer`` of labelled ones."""
    n = 9 + prompt + answer
    labels = np.full(n, IGNORE)
    labels[n - answer :] = np.arange(n - answer, n)
    parts = [Image(3, 3), prompt + answer]
    return EncodedSample(input_ids=np.arange(n), labels=labels, vision={}, parts=parts)


def test_a_cut_that_keeps_part_of_the_answer_keeps_the_sample():
    cfg = DataConfig(max_length=9 + 5 + 1, length_policy="truncate")
    kept = fit_length(_sample(prompt=5, answer=3), cfg)
    assert kept.truncated and (kept.labels >= 0).sum() == 1


def test_a_cut_that_takes_the_whole_answer_drops_the_sample():
    cfg = DataConfig(max_length=9 + 5, length_policy="truncate")
    with pytest.raises(BadSample) as info:
        fit_length(_sample(prompt=5, answer=3), cfg)
    assert info.value.reason == "answer_truncated"
