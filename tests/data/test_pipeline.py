"""Synthetic data, shards and the Ray Data pipeline: round trip, bad inputs with exact counts,
frame sampling, equal disjoint splits, batches feeding the tiny model."""

from __future__ import annotations

import io
import json
import tarfile
import threading

import numpy as np
import pytest
import ray
import torch
from PIL import Image as PILImage

from gazeattn.model import load_model
from gazeattn.ops import GazeConfig, TokenKind
from gazeattn.tiny import build_tiny
from pipelines.config import DataConfig
from pipelines.dataset import (
    DROP_ACTOR,
    build_dataset,
    decode_video,
    drop_counts,
    iter_train_batches,
    split_tar,
    to_messages,
)
from pipelines.make_shards import load_records, make_shards, parse_size
from pipelines.synthetic import encode_mp4, generate


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, n_train=10, n_test=2, video_fraction=0.3, seed=3)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("model"), gaze_config=GazeConfig(keep_ratio=0.5))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _read_tar(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_shards_round_trip_and_manifest(data_root, tmp_path):
    records = load_records(data_root / "train.json")
    manifest = make_shards(data_root / "train.json", data_root / "media", tmp_path, shard_size="20KB", progress=False)
    assert manifest["samples"] == len(records) == 10 and len(manifest["shards"]) > 1
    rows = [row for s in manifest["shards"] for row in split_tar({"path": s["name"], "bytes": (tmp_path / s["name"]).read_bytes()})]
    assert [json.loads(dict(zip(r["names"], r["blobs"], strict=True))["json"])["id"] for r in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records, strict=True):
        stored = json.loads(dict(zip(row["names"], row["blobs"], strict=True))["json"])
        assert stored["conversations"] == record["conversations"] and stored["target_box"] == record["target_box"]
        media = record.get("image") or record.get("video")
        ext = media.rsplit(".", 1)[-1]
        blob = next(b for n, b in zip(row["names"], row["blobs"], strict=True) if n.endswith(ext))
        assert blob == (data_root / "media" / media).read_bytes()
    # members are grouped and sorted by key inside every tar
    for s in manifest["shards"]:
        names = [n for n, _ in _read_tar(tmp_path / s["name"])]
        assert names == sorted(names)
    # idempotent: the second call returns the manifest without rewriting
    mtime = (tmp_path / manifest["shards"][0]["name"]).stat().st_mtime_ns
    assert make_shards(data_root / "train.json", data_root / "media", tmp_path, shard_size="20KB", progress=False) == manifest
    assert (tmp_path / manifest["shards"][0]["name"]).stat().st_mtime_ns == mtime


def test_make_shards_skips_bad_records_with_reasons(data_root, tmp_path):
    records = load_records(data_root / "train.json")[:3]
    bad = [
        {"id": "no-conv", "image": records[0].get("image", "x.jpg")},
        {"id": "missing", "image": "nowhere.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "gif", "image": "a.gif", "conversations": [{"from": "human", "value": "<image>"}]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records + bad))
    manifest = make_shards(path, data_root / "media", tmp_path / "out", progress=False)
    assert manifest["samples"] == 3
    assert manifest["skipped_by_reason"] == {"missing or invalid conversations": 1, "missing_media": 1, "unsupported image format .gif": 1}
    assert parse_size("512MB") == 512 * 2**20 and parse_size("2KiB") == 2048


def test_video_frames_are_sampled_uniformly():
    frames = [np.full((16, 16, 3), 20 * i, np.uint8) for i in range(9)]
    got = decode_video(encode_mp4(frames), 3)
    means = [int(round(f.mean() / 20)) for f in got]
    assert len(got) == 3 and means == [0, 4, 8]
    assert len(decode_video(encode_mp4(frames[:2]), 4)) == 2


def test_llava_turns_become_messages():
    messages = to_messages([{"from": "human", "value": "<image>\nWhat is <video> here?"}, {"from": "gpt", "value": "red"}])
    assert messages[0] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is "}, {"type": "video"}, {"type": "text", "text": " here?"}]}
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}


def _tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for name, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(i: int, image: bytes) -> tuple[str, dict[str, bytes]]:
    rec = {"id": f"s{i}", "image": ["img0.png"], "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    return f"{i:04d}", {"json": json.dumps(rec).encode(), "img0.png": image}


def test_bad_inputs_are_dropped_counted_and_good_ones_kept(local_ray, model_dir, tmp_path):
    png = io.BytesIO()
    PILImage.new("RGB", (20, 20), (200, 10, 10)).save(png, format="PNG")
    png = png.getvalue()
    video_rec = {"id": "v", "video": "video.mp4", "conversations": [{"from": "human", "value": "<video>\nWhich frame?"}, {"from": "gpt", "value": "1"}]}
    no_marker = {"id": "m", "image": ["img0.png"], "conversations": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]}
    mixed = [
        _good(0, png),
        ("0001", {"json": _good(1, png)[1]["json"], "img0.png": b"not an image"}),
        ("0002", {"img0.png": png}),
        ("0003", {"json": b"{broken", "img0.png": png}),
        ("0004", {"json": json.dumps(video_rec).encode(), "video.mp4": b"\x00" * 64}),
        ("0005", {"json": json.dumps(no_marker).encode(), "img0.png": png}),
        _good(6, png),
    ]
    (tmp_path / "mixed.tar").write_bytes(_tar_bytes(mixed))
    whole = _tar_bytes([_good(i, png) for i in range(10, 14)])
    (tmp_path / "truncated.tar").write_bytes(whole[: int(len(whole) * 0.7)])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    cfg = DataConfig(shards=[str(tmp_path / "*.tar")], progress_bars=False, shuffle_files=False)
    rows = build_dataset(cfg, str(model_dir)).take_all()
    kept = sorted(r["id"] for r in rows)
    # the truncated tar keeps its complete samples before the break
    assert kept[:2] == ["s0", "s10"] and "s6" in kept and "s1" not in kept
    counts = drop_counts()
    truncated_kept = sum(1 for k in kept if k.startswith("s1") and len(k) == 3)
    assert 1 <= truncated_kept < 4
    assert counts == {
        "corrupt_image": 1,
        "missing_json": 1,
        "invalid_json": 1,
        "bad_video": 1,
        "media_marker_mismatch": 1,
        "truncated_tar": 1,
        "unreadable_tar": 1,
    }
    assert len(kept) == 2 + truncated_kept
    ray.kill(ray.get_actor(DROP_ACTOR))


def test_split_streams_into_two_consumers_and_feeds_the_model(local_ray, data_root, model_dir, tmp_path):
    make_shards(data_root / "train.json", data_root / "media", tmp_path, shard_size="30KB", progress=False)
    cfg = DataConfig(shards=[str(tmp_path / "*.tar")], progress_bars=False, shuffle_buffer=4)
    model, processor = load_model(model_dir)
    parts = build_dataset(cfg, str(model_dir)).streaming_split(2, equal=True)
    seen: dict[int, list] = {}

    def consume(i, shard):
        seen[i] = list(shard.iter_rows())

    threads = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(parts)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    ids = [[row["id"] for row in seen[i]] for i in (0, 1)]
    # equal, disjoint and together complete
    assert len(ids[0]) == len(ids[1]) == 5
    assert sorted(ids[0] + ids[1]) == sorted(r["id"] for r in load_records(data_root / "train.json"))

    shard = build_dataset(cfg, str(model_dir)).streaming_split(1)[0]
    batches = list(iter_train_batches(shard, processor, cfg, batch_size=4))
    assert len(batches) == 2  # 10 samples, drop_last
    batch = batches[0]
    layout = batch["gaze_layout"]
    assert torch.equal(layout.kinds == TokenKind.VISUAL, batch["input_ids"] == processor.image_token_id)
    assert torch.equal(layout.kinds == TokenKind.CONTEXT, batch["input_ids"] == processor.context_token_id)
    assert torch.equal(layout.kinds == TokenKind.PAD, batch["attention_mask"] == 0)
    out = model(**batch)
    assert torch.isfinite(out.loss)
