"""The Ray Data pipeline end to end: shards -> decode -> split -> encode -> collate -> forward."""

import json
import os
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from gazeattn.processing import VisualBudget
from pipelines.accounting import drop_counts, reset_drop_counts, truncated_count
from pipelines.config import DataConfig
from pipelines.dataset import build_train_dataset, decoded_media, iter_train_batches
from pipelines.make_shards import make_shards, shard_paths, write_tar
from pipelines.synthetic import generate, write_mp4

pytestmark = pytest.mark.ray

IMAGE_SIZE = 48


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 synthetic records (images, videos and one text-only) sharded into several tars."""
    root = tmp_path_factory.mktemp("data")
    paths = generate(root, n_train=11, n_test=1, image_size=IMAGE_SIZE, video_fraction=0.3)
    records = json.loads(paths["train"].read_text())
    records.append(
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "Say red."},
                {"from": "gpt", "value": "red"},
            ],
        }
    )
    (root / "data.json").write_text(json.dumps(records))
    manifest = make_shards(
        root / "data.json", root / "media", root / "shards", shard_size="40KB", progress=False
    )
    assert manifest["num_samples"] == 12 and len(manifest["shards"]) > 1
    return root, records, shard_paths(root / "shards")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gazeattn.model import load_model
    from gazeattn.tiny import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("tiny"), image_size=IMAGE_SIZE, patch_size=8)
    model, processor = load_model(path)
    processor.with_budget(VisualBudget(frames_per_video=3))
    return model.eval(), processor


def config(shards, **kw) -> DataConfig:
    base = dict(
        shards=shards,
        shuffle_files=False,
        progress_bars=False,
    )
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("given", ["tars", "directory"])
def test_round_trip_through_ray(ray_session, data, given):
    root, records, shards = data
    reset_drop_counts()
    # a directory of make_shards output holds manifest.json beside the tars: only tars are read
    assert (root / "shards" / "manifest.json").is_file()
    source = shards if given == "tars" else [str(root / "shards")]
    budget = VisualBudget(frames_per_video=3)
    rows = build_train_dataset(config(source), budget=budget).take_all()
    rows = sorted(rows, key=lambda r: r["key"])
    assert [json.loads(r["record"]) for r in rows] == records
    for row, record in zip(rows, records, strict=True):
        images, videos = decoded_media(row)
        if "image" in record:
            assert len(images) == 1 and not videos
            original = Image.open(root / "media" / record["image"]).convert("RGB")
            assert np.abs(images[0].astype(int) - np.asarray(original)).mean() < 3
        elif "video" in record:
            assert not images and [len(v) for v in videos] == [3]
        else:
            assert not images and not videos
    assert drop_counts() == {}


def png(colour) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(key: str, text: str, **media) -> list[tuple[str, bytes]]:
    record = {
        "id": key,
        "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}],
    }
    members = [(f"{key}.json", json.dumps(record).encode())]
    members += [(f"{key}.{name.replace('_', '.')}", data) for name, data in media.items()]
    return sorted(members)


def test_bad_inputs_dropped_counted_once(ray_session, data, tmp_path):
    _, _, shards = data
    frames = [np.full((16, 16, 3), 90, np.uint8)] * 2
    mixed = [
        *sample("a0", "<image>", img0_png=png("red")),
        *sample("a1", "<image>", img0_png=b"corrupt image bytes"),
        *sample("a2", "<video>", vid0_mp4=b"\x00not a video" * 20),
        *sample("a3", "<video>", vid0_mp4=b""),
        ("a4.img0.png", png("blue")),  # no json
        ("a5.json", b"{invalid"),
        *sample("a6", "no marker", img0_png=png("green")),
        *sample("a7", "<video>", vid0_mp4=write_mp4(frames)),
    ]
    write_tar(tmp_path / "mixed.tar", mixed)
    # a copy of the first good shard cut inside the data of its 4th sample: 3 samples survive
    source = shards[0]
    with tarfile.open(source) as tar:
        members = [m for m in tar if m.isfile()]
    keys = sorted({m.name.split(".")[0] for m in members})
    assert len(keys) >= 4
    fourth = next(m for m in members if m.name.startswith(keys[3]))
    cut = fourth.offset_data + 10
    (tmp_path / "truncated.tar").write_bytes(open(source, "rb").read()[:cut])
    (tmp_path / "garbage.tar").write_bytes(os.urandom(3000))
    reset_drop_counts()
    ds = build_train_dataset(config([str(tmp_path / "*.tar")]))
    for _ in range(2):  # a second epoch re-reads the bad samples: counted and logged once
        got = sorted((os.path.basename(r["url"]), r["key"]) for r in ds.take_all())
        assert got == [("mixed.tar", "a0"), ("mixed.tar", "a7")] + [
            ("truncated.tar", k) for k in keys[:3]
        ]
        assert drop_counts() == {
            "bad_image": 1,
            "bad_video": 2,  # junk bytes, zero bytes
            "missing_json": 1,
            "bad_json": 1,
            "marker_mismatch": 1,
            "bad_tar": 2,  # truncated, garbage
        }


def consume_in_threads(iterators, fn):
    results = [None] * len(iterators)

    def run(i):
        results[i] = fn(iterators[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_streaming_split_two_consumers(ray_session, data):
    _, records, shards = data
    splits = build_train_dataset(config(shards)).streaming_split(2, equal=True)
    keys = consume_in_threads(splits, lambda it: [r["key"] for r in it.iter_rows()])
    assert len(keys[0]) == len(keys[1]) == 6
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(12)]


def check_layout(batch, processor):
    from gazeattn.ops.layout import TokenKind

    ids, kinds, mask = batch["input_ids"], batch["gaze_layout"].kinds, batch["attention_mask"]
    assert batch["gaze_layout"].length == ids.shape[1]
    assert torch.equal(kinds == TokenKind.VISUAL, ids == processor.image_token_id)
    assert torch.equal(kinds == TokenKind.CONTEXT, ids == processor.context_token_id)
    assert torch.equal(kinds == TokenKind.PAD, mask == 0)
    # the tiny tower's 48 x 48 input at patch 8: a 6 x 6 grid per image or frame
    grid = IMAGE_SIZE // 8
    assert batch["pixel_values"].shape[0] * grid * grid == int(
        (ids == processor.image_token_id).sum()
    )
    # every batch runs the vision tower (text-only samples carry a dummy image)
    assert batch["pixel_values"].shape[0] > 0


@pytest.mark.parametrize("encode_in", ["worker", "pipeline"])
def test_split_batches_feed_the_tiny_model(ray_session, data, tiny, encode_in):
    model, processor = tiny
    _, _, shards = data
    cfg = config(shards, shuffle_buffer=4)
    ds = build_train_dataset(cfg, processor if encode_in == "pipeline" else None)
    splits = ds.streaming_split(2, equal=True)
    batches = consume_in_threads(
        splits, lambda it: list(iter_train_batches(it, processor, cfg, batch_size=4, epoch=0))
    )
    # 6 rows each, batches of 4, drop_last: one full batch per consumer
    assert [len(b) for b in batches] == [1, 1]
    for batch in batches[0] + batches[1]:
        assert batch["input_ids"].shape[0] == 4
        check_layout(batch, processor)
    with torch.no_grad():
        out = model(**batches[0][0])
    assert torch.isfinite(out.loss)


def _tail(sample) -> int:
    """Tokens of the sample's trailing text (0 when it ends with a media item)."""
    return sample.parts[-1] if isinstance(sample.parts[-1], int) else 0


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_length_policy_and_text_only_drop(ray_session, data, tiny, policy):
    from pipelines.dataset import encode_row

    _, _, shards = data
    _, processor = tiny
    ds = build_train_dataset(config(shards), budget=processor.visual_budget)
    full = [
        (json.loads(r["record"])["id"], encode_row(r, processor, config(shards, max_length=10**6)))
        for r in ds.take_all()
    ]
    media = [s for rid, s in full if rid != "text-only"]

    def cut(limit):
        """(longer than limit, cut inside the last text part, of those: an answer token left)"""
        over = [s for s in media if len(s.input_ids) > limit]
        in_tail = [s for s in over if len(s) - limit < _tail(s)]
        kept = [s for s in in_tail if (np.asarray(s.labels[:limit]) >= 0).any()]
        return over, in_tail, kept

    # the smallest limit that cuts some sample inside its last text part and leaves part of
    # its answer (truncated) and, if the data allow it, drops some other (under either policy)
    lengths = range(1, max(len(s.input_ids) for s in media))
    candidates = [n for n in lengths if cut(n)[2]]
    both = [n for n in candidates if len(cut(n)[0]) > len(cut(n)[2])]
    limit = min(both or candidates)
    over, in_tail, kept = cut(limit)
    assert over and kept
    reset_drop_counts()
    stats = {}
    cfg = config(shards, max_length=limit, length_policy=policy, text_only="drop")
    batches = list(iter_train_batches(ds, processor, cfg, batch_size=1, epoch=0, stats=stats))
    too_long = len(over) if policy == "drop" else len(over) - len(in_tail)
    # a cut that takes the whole answer leaves nothing to learn from: dropped, named
    answer_cut = 0 if policy == "drop" else len(in_tail) - len(kept)
    truncated = 0 if policy == "drop" else len(kept)
    expected = {"text_only": 1, "too_long": too_long, "answer_truncated": answer_cut}
    assert drop_counts() == {reason: n for reason, n in expected.items() if n}
    assert truncated_count() == stats["truncated"] == truncated
    assert stats["dropped"] == 1 + too_long + answer_cut
    assert len(batches) == 12 - 1 - too_long - answer_cut
    assert all(b["input_ids"].shape[1] <= limit for b in batches)
    assert all((b["labels"] >= 0).any() for b in batches)
    for batch in batches:
        check_layout(batch, processor)


def test_pipeline_encoding_equals_worker_encoding(ray_session, data, tiny):
    from pipelines.dataset import encode_row, encoded_table_samples

    _, _, shards = data
    _, processor = tiny
    cfg = config(shards)
    decoded = build_train_dataset(cfg, budget=processor.visual_budget).take_all()
    decoded = {r["key"]: r for r in decoded}
    encoded = build_train_dataset(cfg, processor).to_arrow_refs()
    import pyarrow as pa
    import ray

    table = pa.concat_tables(ray.get(encoded))
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(decoded)
    for key, sample in zip(keys, encoded_table_samples(table), strict=True):
        expected = encode_row(decoded[key], processor, cfg)
        np.testing.assert_array_equal(sample.input_ids, expected.input_ids)
        np.testing.assert_array_equal(sample.labels, expected.labels)
        assert sample.vision.keys() == expected.vision.keys()
        for name, array in expected.vision.items():
            np.testing.assert_array_equal(sample.vision[name], array)
        assert sample.parts == expected.parts
