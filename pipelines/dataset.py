"""The Ray Data pipeline: WebDataset tar shards -> decoded media -> GazeProcessor samples -> batches.

    shards --read_binary_files--> tar members grouped by key (flat_map)
           --decode + encode (PIL / PyAV, GazeProcessor.encode_sample)--> samples
           --Ray Train streaming_split(equal=True)--> iter_train_batches -> processor.collate

The tars are parsed here rather than by ``read_webdataset`` so that a truncated
or unreadable tar costs only its incomplete tail: the complete samples before
the break are kept, and the break is counted. Every dropped sample (or shard)
is logged once with its tar and key and counted per reason in a named Ray actor
(``drop_counts()``), which the trainer reports as metrics.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import ray
from PIL import Image as PILImage

from pipelines.config import DataConfig

log = logging.getLogger(__name__)

DROP_ACTOR = "gazeattn-data-drops"
MARKERS = re.compile(r"(<image>|<video>)")
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


# ---- drop accounting


@ray.remote(num_cpus=0)
class DropCounter:
    """Per-reason counts of dropped samples, shared by every process of a job."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.seen: set[tuple[str, str, str]] = set()

    def add(self, shard: str, key: str, reason: str) -> bool:
        """Count a drop; True the first time this (shard, key, reason) is seen."""
        if (shard, key, reason) in self.seen:
            return False
        self.seen.add((shard, key, reason))
        self.counts[reason] += 1
        return True

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def start_drop_counter():
    """Create (or find) the job's drop counter; call from the driver, which keeps it alive."""
    return DropCounter.options(name=DROP_ACTOR, get_if_exists=True).remote()


def record_drop(shard: str, key: str, reason: str, detail: str = "") -> None:
    """Count and log (once) a dropped sample; works inside Ray tasks and locally."""
    try:
        first = ray.get(ray.get_actor(DROP_ACTOR).add.remote(shard, key, reason))
    except ValueError:
        # no counter (plain local use): log every drop
        first = True
    if first:
        log.warning(
            "dropped sample %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else ""
        )


def drop_counts() -> dict[str, int]:
    """Drops per reason so far in this job ({} when no pipeline ran)."""
    try:
        return ray.get(ray.get_actor(DROP_ACTOR).get.remote())
    except ValueError:
        return {}


# ---- reading tars


def split_tar(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One tar file's bytes -> one row per complete sample (members grouped by key)."""
    shard = str(row["path"])
    samples: list[dict[str, Any]] = []
    group: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=io.BytesIO(row["bytes"]), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                data = tar.extractfile(member).read()
                if group is None or group["key"] != key:
                    if group is not None:
                        samples.append(group)
                    group = {"key": key, "shard": shard, "names": [], "blobs": []}
                group["names"].append(ext)
                group["blobs"].append(data)
    except (tarfile.TarError, EOFError, OSError) as err:
        # the group being read when the tar broke may be incomplete: drop it, keep the rest
        where = group["key"] if group is not None else "*"
        record_drop(
            shard, where, "truncated_tar" if samples or group else "unreadable_tar", str(err)
        )
        return samples
    if group is not None:
        samples.append(group)
    return samples


# ---- decoding


def decode_image(data: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def decode_video(data: bytes, num_frames: int) -> list[np.ndarray]:
    """``num_frames`` frames sampled uniformly over the video (all of them if fewer)."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames")
    if len(frames) <= num_frames:
        return frames
    picks = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [frames[i] for i in picks]


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns (``from``/``value`` with <image>/<video> markers) -> processor messages."""
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r}")
        parts = []
        for piece in MARKERS.split(str(turn["value"])):
            if piece == "<image>":
                parts.append({"type": "image"})
            elif piece == "<video>":
                parts.append({"type": "video"})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
        if parts:
            messages.append({"role": role, "content": parts})
    return messages


def decode_sample(row: dict[str, Any], frames_per_video: int) -> dict[str, Any] | None:
    """A grouped tar row -> record, messages and decoded media; None (counted) when bad."""
    shard, key = row["shard"], row["key"]
    members = dict(zip(row["names"], row["blobs"], strict=True))
    if "json" not in members:
        record_drop(shard, key, "missing_json")
        return None
    try:
        record = json.loads(members["json"])
        conversations = record["conversations"]
    except (ValueError, KeyError, TypeError) as err:
        record_drop(shard, key, "invalid_json", str(err))
        return None
    names = record.get("image") or []
    names = names if isinstance(names, list) else [names]
    try:
        images = [decode_image(members[n]) for n in names]
    except (KeyError, OSError, ValueError, PILImage.DecompressionBombError) as err:
        record_drop(shard, key, "corrupt_image", str(err))
        return None
    videos = []
    if record.get("video"):
        try:
            videos = [decode_video(members[record["video"]], frames_per_video)]
        except (KeyError, OSError, ValueError, av.error.FFmpegError) as err:
            record_drop(shard, key, "bad_video", str(err))
            return None
    text = " ".join(str(t.get("value", "")) for t in conversations)
    if text.count("<image>") != len(images) or text.count("<video>") != len(videos):
        record_drop(shard, key, "media_marker_mismatch")
        return None
    try:
        messages = to_messages(conversations)
    except (ValueError, KeyError, TypeError) as err:
        record_drop(shard, key, "invalid_conversation", str(err))
        return None
    return {"record": record, "messages": messages, "images": images, "videos": videos}


class SampleEncoder:
    """Ray Data stage: decode a grouped tar row and encode it with the GazeProcessor."""

    def __init__(self, processor_dir: str, cfg: DataConfig):
        from gazeattn.processing import GazeProcessor

        self.processor = GazeProcessor.from_pretrained(processor_dir)
        self.cfg = cfg

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        decoded = decode_sample(row, self.cfg.frames_per_video)
        if decoded is None:
            return []
        return encode_decoded(self.processor, decoded, row["shard"], row["key"], self.cfg)


def encode_decoded(
    processor, decoded: dict, shard: str, key: str, cfg: DataConfig
) -> list[dict[str, Any]]:
    from gazeattn.processing import ProcessorInputError, SequenceTooLong

    try:
        sample = processor.encode_sample(
            decoded["messages"],
            images=decoded["images"],
            videos=decoded["videos"],
            max_length=10**9,
        )
    except ProcessorInputError as err:
        record_drop(shard, key, "invalid_conversation", str(err))
        return []
    if len(sample["input_ids"]) > cfg.max_length:
        try:
            sample = truncate(sample, cfg.max_length, cfg.length_policy)
        except SequenceTooLong:
            record_drop(shard, key, "too_long", f"{len(sample['input_ids'])} > {cfg.max_length}")
            return []
    record = decoded["record"]
    return [
        {
            "key": key,
            "shard": shard,
            "id": str(record.get("id", key)),
            "input_ids": sample["input_ids"],
            "labels": sample["labels"],
            "pixel_values": sample["pixel_values"],
            "parts": json.dumps(sample["parts"]),
        }
    ]


def truncate(sample: dict, max_length: int, policy: str) -> dict:
    """Cut the text tail to ``max_length`` (policy "truncate", never through media), else raise."""
    from gazeattn.processing import SequenceTooLong

    n = len(sample["input_ids"])
    parts = sample["parts"]
    if policy != "truncate" or parts[-1][0] != "text" or n - parts[-1][1] >= max_length:
        raise SequenceTooLong(n, max_length)
    cut = n - max_length
    parts = [*parts[:-1], ["text", parts[-1][1] - cut]]
    return {
        **sample,
        "input_ids": sample["input_ids"][:max_length],
        "labels": sample["labels"][:max_length],
        "parts": parts,
    }


# ---- datasets and iterators


def resolve_shards(cfg: DataConfig, split: str = "train") -> list[str]:
    """The configured shards (globs expanded), or generated synthetic shards when none are set."""
    if cfg.shards:
        out = []
        for pattern in cfg.shards:
            if "://" in pattern or not any(c in pattern for c in "*?["):
                out.append(pattern)
            else:
                out.extend(sorted(glob.glob(pattern)))
        if not out:
            raise FileNotFoundError(f"no shards match {cfg.shards}")
        return out
    from pipelines.make_shards import make_shards
    from pipelines.synthetic import generate

    root = Path(cfg.synthetic_dir).resolve()
    syn = cfg.synthetic
    if not (root / f"{split}.json").exists():
        generate(
            root,
            n_train=syn.n_train,
            n_test=syn.n_test,
            image_size=syn.image_size,
            frames=syn.frames,
            video_fraction=syn.video_fraction,
            seed=syn.seed,
        )
    manifest = make_shards(
        root / f"{split}.json", root / "media", root / "shards" / split, progress=cfg.progress_bars
    )
    return [str(root / "shards" / split / s["name"]) for s in manifest["shards"]]


def build_dataset(cfg: DataConfig, processor_dir: str, split: str = "train") -> ray.data.Dataset:
    """Encoded samples from the shards, streamed; start the drop counter first (driver side)."""
    from ray.data import DataContext
    from ray.data.datasource import FileShuffleConfig

    DataContext.get_current().enable_progress_bars = cfg.progress_bars
    start_drop_counter()
    paths = resolve_shards(cfg, split)
    shuffle = FileShuffleConfig(seed=cfg.seed) if cfg.shuffle_files and split == "train" else None
    # small CPU reservations: the pipeline shares the machine with the training workers
    cpus = {"num_cpus": cfg.decode_cpus}
    raw = ray.data.read_binary_files(
        paths, include_paths=True, shuffle=shuffle, ray_remote_args=cpus
    )
    rows = raw.flat_map(split_tar, **cpus)
    return rows.flat_map(
        SampleEncoder,
        fn_constructor_args=(processor_dir, cfg),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.decode_workers)),
        **cpus,
    )


def build_train_dataset(cfg: DataConfig, processor_dir: str) -> ray.data.Dataset:
    return build_dataset(cfg, processor_dir, "train")


def rows_to_samples(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A numpy batch from Ray Data -> the per-sample dicts ``processor.collate`` takes."""
    n = len(batch["input_ids"])
    return [
        {
            "input_ids": np.asarray(batch["input_ids"][i], np.int64),
            "labels": np.asarray(batch["labels"][i], np.int64),
            "pixel_values": np.asarray(batch["pixel_values"][i], np.float32),
            "parts": json.loads(batch["parts"][i]),
        }
        for i in range(n)
    ]


def iter_train_batches(
    shard, processor, cfg: DataConfig, *, batch_size: int, epoch: int = 0
) -> Iterator[dict]:
    """Per-worker batches for ``model(**batch)`` from a Ray Train dataset shard (drop_last)."""
    buffer = cfg.shuffle_buffer or None
    for batch in shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=None if buffer is None else cfg.seed + epoch,
    ):
        yield processor.collate(rows_to_samples(batch))
