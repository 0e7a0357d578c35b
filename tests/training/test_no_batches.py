"""A run whose data give no batch stops with an error that names the drops, instead of starting
epoch after epoch (every sample dropped, or fewer samples than a micro-batch)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import ray.train

from pipelines.dataset import DECODED_SCHEMA
from pipelines.stream import DataPosition, DataStream, NoBatches
from training.config import load_config

# a loop that starts more epochs than this is the bug: the test stops it
EPOCHS_BOUND = 5


class Shard:
    def __init__(self, rows):
        self.rows = rows

    def iter_batches(self, **_):
        yield pa.Table.from_pylist(self.rows, schema=DECODED_SCHEMA)


def _row(i: int, media: bool) -> dict:
    value = "<image> colour?" if media else "colour?"
    record = {"conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "red"}]}
    return {"key": f"{i:03d}", "url": "x.tar", "record": json.dumps(record),
            "num_images": int(media), "video_frames": [], "media_shapes": [[16, 16]] * int(media),
            "media": np.zeros((int(media), 16, 16, 3), np.uint8).tobytes()}  # fmt: skip


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from gazeattn.processing import GazeProcessor
    from gazeattn.tiny import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("tiny"), image_size=16, patch_size=8)
    return GazeProcessor.from_pretrained(path)


def _stream(monkeypatch, processor, rows, **sets) -> DataStream:
    epochs = []

    def shard(name):
        epochs.append(name)
        if len(epochs) > EPOCHS_BOUND:
            raise AssertionError(f"{len(epochs)} epochs started without a batch")
        return Shard(rows)

    monkeypatch.setattr(ray.train, "get_dataset_shard", shard)
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    return DataStream(cfg.data, cfg.train.micro_batch_size, processor, DataPosition())


def test_every_sample_dropped_stops_naming_the_drops(monkeypatch, processor):
    rows = [_row(i, media=False) for i in range(4)]
    stream = _stream(monkeypatch, processor, rows, **{"data.text_only": "drop"})
    with pytest.raises(NoBatches, match=r"4 samples.*4 dropped"):
        next(iter(stream))


def test_fewer_samples_than_a_micro_batch_stops(monkeypatch, processor):
    rows = [_row(i, media=True) for i in range(3)]
    stream = _stream(monkeypatch, processor, rows, **{"train.micro_batch_size": 4})
    with pytest.raises(NoBatches, match=r"3 samples.*micro-batch of 4"):
        next(iter(stream))


def test_a_later_epoch_without_a_batch_stops_too(monkeypatch, processor):
    rows = [_row(i, media=True) for i in range(4)]
    stream = _stream(monkeypatch, processor, rows, **{"train.micro_batch_size": 2})
    batches = iter(stream)
    assert [len(ids) for _, ids in (next(batches), next(batches))] == [2, 2]
    rows[:] = rows[:1]
    with pytest.raises(NoBatches, match="epoch 1"):
        next(batches)
