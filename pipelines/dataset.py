"""The Ray Data pipeline: WebDataset shards -> decoded samples -> per-worker encoded batches.

    ds = build_train_dataset(cfg)                       # in the driver
    TorchTrainer(..., datasets={"train": ds})           # Ray Train splits it (equal=True)
    for batch in iter_train_batches(get_dataset_shard("train"), processor, cfg,
                                    batch_size=8, epoch=epoch):
        loss = model(**batch).loss                      # in each worker

Decoding (PIL images, PyAV videos with the processor's frame budget; media keep
their own size, ``cfg.max_image_side`` bounding the longer side) runs in Ray
Data tasks on the CPU pool; tokenising with the processor runs in each worker,
where the processor is, or also in the pipeline when ``build_train_dataset`` is
given the processor (faster: the CPU pool does it, see bench/data.py). Every bad sample or tar is dropped, logged once with
the tar and the key, and counted per reason (``pipelines.accounting``).

ZeRO-3 needs every rank to take the same number of steps and make the same
collective calls:
- the split is ``equal=True`` (Ray Train's default for ``streaming_split``) and
  batches are full (drop_last);
- when encoding in the workers, samples can still be dropped at encode time
  (too long, rejected by the processor) after the split, so when torch.distributed is initialised the
  ranks agree before each step (an all-reduce MIN of "I have a batch"): all stop
  at the first step some rank cannot fill;
- the model calls the vision tower once per forward when the batch has any
  image, so text-only samples get a dummy black image (``cfg.text_only``) and
  every batch carries media.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource, FileShuffleConfig

from gazeattn.processing import VisualBudget
from gazeattn.sample import EncodedSample
from pipelines.accounting import drop_counter, drop_counts, report_drops, truncated_count
from pipelines.config import DataConfig
from pipelines.conversation import add_dummy_image, to_messages
from pipelines.decode import BadSample, Decoded, decode_sample

__all__ = [
    "build_dataset",
    "build_train_dataset",
    "drop_counts",
    "encode_row",
    "iter_train_batches",
    "truncated_count",
]

log = logging.getLogger("pipelines.data")

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("error", pa.string()),  # "" or why the tar could not be read further
        ("names", pa.list_(pa.string())),  # member suffixes: json, img0.png, vid0.mp4, ...
        ("blobs", pa.list_(pa.binary())),
    ]
)
DECODED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("record", pa.string()),  # the LLaVA record as JSON (extra fields kept)
        ("num_images", pa.int64()),
        ("video_frames", pa.list_(pa.int64())),  # frames of each video
        ("media_shapes", pa.list_(pa.list_(pa.int64()))),  # (h, w) of each image and frame
        ("media", pa.binary()),  # images, then frames, each [h, w, 3] uint8, C order
    ]
)
# the encoded sample's own columns (gazeattn.sample) after where it came from
ENCODED_SCHEMA = pa.schema(
    [("key", pa.string()), ("url", pa.string()), *EncodedSample.arrow_fields()]
)
READ_CHUNK = 64
# a text-only sample's black image: the processor resizes it as any other
DUMMY_SIDE = 64


class TolerantWebDataset(FileBasedDatasource):
    """WebDataset tars -> raw sample rows; a truncated or unreadable tar keeps its good samples.

    ``read_webdataset`` fails the whole job on a damaged tar; here every sample
    known to be complete before the damage is kept and one ``error`` row names
    the tar and the reason. A sample is known complete once a member of the next
    key has been seen; the sample being read when the damage shows is dropped.
    """

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths, **kwargs):
        # a directory of shards lists its tars only (not make_shards' manifest.json)
        kwargs.setdefault("file_extensions", self._FILE_EXTENSIONS)
        super().__init__(paths, **kwargs)

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        key, sample, seen = None, {}, set()
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                if not info.isreg():
                    continue
                name_key, _, suffix = info.name.partition(".")
                if name_key != key:
                    if sample:
                        rows.append(_raw_row(key, path, "", sample))
                    if name_key in seen:
                        raise ValueError(f"members of key {name_key!r} are not contiguous")
                    seen.add(name_key)
                    key, sample = name_key, {}
                    if len(rows) >= READ_CHUNK:
                        yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                        rows = []
                sample[suffix] = tar.extractfile(info).read()
            if sample:
                rows.append(_raw_row(key, path, "", sample))
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            where = f"while reading key {key!r}" if key is not None else "at the start"
            detail = f"{type(error).__name__}: {error} ({where}; {len(seen) - 1} samples before)"
            rows.append(_raw_row("", path, detail, {}))
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _raw_row(key: str, url: str, error: str, sample: dict[str, bytes]) -> dict:
    return {
        "key": key,
        "url": url,
        "error": error,
        "names": list(sample),
        "blobs": list(sample.values()),
    }


def resolve_shards(cfg: DataConfig, split: str = "train") -> list[str]:
    """The configured shards (local globs expanded; directories and URIs passed on, pyarrow
    lists them), or the synthetic dataset generated and sharded under ``cfg.synthetic_dir``."""
    if not cfg.shards:
        from pipelines.synthetic import build

        return build(cfg.synthetic_dir, cfg.synthetic, progress=cfg.progress_bars)[split]
    out = []
    for item in cfg.shards:
        if "://" not in item and any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no shards match {item!r}")
            out += matches
        else:
            out.append(item)
    return out


def decode_batch(batch: pa.Table, *, frames: int, counter, max_side: int | None = None) -> pa.Table:
    """Raw rows -> decoded rows; bad ones are dropped and reported to the counter."""
    rows, events = [], []
    for row in batch.to_pylist():
        if row["error"]:
            events.append((row["url"], "", "bad_tar", row["error"]))
            continue
        members = dict(zip(row["names"], row["blobs"], strict=True))
        try:
            sample = decode_sample(members, frames=frames, max_side=max_side)
        except BadSample as bad:
            events.append((row["url"], row["key"], bad.reason, bad.detail))
            continue
        rows.append(decoded_row(row["key"], row["url"], sample))
    report_drops(counter, events)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def decoded_row(key: str, url: str, sample: Decoded) -> dict[str, Any]:
    """A decoded sample as a row of ``DECODED_SCHEMA``."""
    media = sample.images + [frame for video in sample.videos for frame in video]
    return {
        "key": key,
        "url": url,
        "record": json.dumps(sample.record),
        "num_images": len(sample.images),
        "video_frames": [len(v) for v in sample.videos],
        "media_shapes": [list(m.shape[:2]) for m in media],
        "media": b"".join(np.ascontiguousarray(m).tobytes() for m in media),
    }


def build_dataset(
    cfg: DataConfig,
    processor=None,
    split: str = "train",
    *,
    resume: bool = False,
    budget: VisualBudget | None = None,
) -> ray.data.Dataset:
    """Shards -> a dataset of decoded samples (columns of ``DECODED_SCHEMA``).

    Videos are sampled to the frames of the processor's visual budget (``budget`` when no
    processor is given; the default budget when neither is).

    With ``resume``, the samples that the job's resume state holds are dropped first
    (``pipelines.resume``: the rest of an interrupted epoch).

    With ``processor`` (a GazeProcessor or the directory it was saved in) the samples are
    also encoded in the pipeline (columns of ``ENCODED_SCHEMA``): the CPU pool does the
    tokenising and resizing, and every drop happens before the split, so each worker gets
    the same number of samples. Call it in the driver of a Ray job (it creates the job's
    drop counter there).
    """
    if isinstance(processor, str | Path):
        from gazeattn.processing import GazeProcessor

        processor = GazeProcessor.from_pretrained(processor)
    if processor is not None:
        budget = processor.visual_budget
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    # without bars, no execution plan either: a pass over the data is one line in the log
    ctx.print_on_execution_start = cfg.progress_bars
    counter = drop_counter(create=True)
    shuffle = cfg.shuffle_files and split == "train"
    source = TolerantWebDataset(
        resolve_shards(cfg, split),
        shuffle=FileShuffleConfig(seed=cfg.seed) if shuffle else None,
    )
    stage = dict(
        batch_format="pyarrow",
        batch_size=cfg.decode_batch_size,
        num_cpus=cfg.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.decode_workers),
    )
    ds = ray.data.read_datasource(source, num_cpus=cfg.decode_cpus)
    if resume:
        from pipelines.resume import SkipConsumed, resume_state

        resume_state(create=True)
        ds = ds.map_batches(
            SkipConsumed,
            batch_format="pyarrow",
            num_cpus=0,
            compute=ray.data.ActorPoolStrategy(size=1),
        )
    decode = partial(
        decode_batch,
        frames=(budget or VisualBudget()).frames_per_video,
        max_side=cfg.max_image_side,
        counter=counter,
    )
    ds = ds.map_batches(decode, **stage)
    if processor is not None:
        ds = ds.map_batches(
            partial(encode_batch, processor=processor, cfg=cfg, counter=counter), **stage
        )
    return ds


def build_train_dataset(
    cfg: DataConfig, processor=None, *, resume: bool = False, budget: VisualBudget | None = None
):
    """The training split (see ``build_dataset``)."""
    return build_dataset(cfg, processor, "train", resume=resume, budget=budget)


def encode_batch(batch: pa.Table, *, processor, cfg: DataConfig, counter) -> pa.Table:
    """Decoded rows -> encoded rows (``ENCODED_SCHEMA``); drops and truncations are reported."""
    rows, events = [], []
    for row in batch.to_pylist():
        try:
            sample = encode_row(row, processor, cfg)
        except BadSample as bad:
            events.append((row["url"], row["key"], bad.reason, bad.detail))
            continue
        if sample.truncated:
            events.append((row["url"], row["key"], "truncated", ""))
        rows.append({"key": row["key"], "url": row["url"], **sample.arrow_row()})
    report_drops(counter, events)
    return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


def encoded_table_samples(table: pa.Table) -> Iterator[EncodedSample]:
    """Encoded rows (``ENCODED_SCHEMA``) -> their samples, with their sample ids."""
    keys, urls = table.column("key").to_pylist(), table.column("url").to_pylist()
    ids = [sample_id(url, key) for url, key in zip(urls, keys, strict=True)]
    return EncodedSample.from_arrow(table, ids)


def decoded_media(row: dict[str, Any]) -> tuple[list, list]:
    """A decoded row -> (images [h, w, 3] list, videos as lists of [h, w, 3] frames)."""
    frames, start = [], 0
    for h, w in row["media_shapes"]:
        size = int(h) * int(w) * 3
        frames.append(np.frombuffer(row["media"][start : start + size], np.uint8).reshape(h, w, 3))
        start += size
    n = int(row["num_images"])
    images, videos, start = frames[:n], [], n
    for count in row["video_frames"]:
        videos.append(frames[start : start + int(count)])
        start += int(count)
    return images, videos


def encode_row(row: dict[str, Any], processor, cfg: DataConfig) -> EncodedSample:
    """A decoded row -> the processor's encoded sample (``truncated`` when the length policy
    cut it); raises BadSample when it must be dropped."""
    from gazeattn.processing import ProcessorInputError, SequenceTooLong

    record = json.loads(row["record"])
    images, videos = decoded_media(row)
    try:
        messages = to_messages(record["conversations"])
    except ValueError as error:
        raise BadSample("bad_json", str(error)) from error
    if not images and not videos:
        if cfg.text_only == "drop":
            raise BadSample("text_only")
        messages = add_dummy_image(messages)
        images = [np.zeros((DUMMY_SIDE, DUMMY_SIDE, 3), np.uint8)]
    try:
        sample = processor.encode_sample(messages, images=images, videos=videos, max_length=None)
    except SequenceTooLong as error:
        raise BadSample("too_long", str(error)) from error
    except ProcessorInputError as error:
        raise BadSample("encode_error", str(error)) from error
    return fit_length(sample, cfg)


def fit_length(sample: EncodedSample, cfg: DataConfig) -> EncodedSample:
    """Apply the length policy: keep, truncate in the trailing text, or raise too_long."""
    if len(sample) <= cfg.max_length:
        return sample
    too_long = BadSample("too_long", f"{len(sample)} tokens > {cfg.max_length}")
    if cfg.length_policy == "drop":
        raise too_long
    try:
        cut = sample.truncated_to(cfg.max_length)
    except ValueError:  # the cut would reach into a media item
        raise too_long from None
    # the answer comes last: a cut can take all of it, and a batch of such samples has no
    # token to learn from (its loss is 0 / 0 = nan)
    if not (cut.labels >= 0).any():
        raise BadSample("answer_truncated", f"{len(sample)} tokens cut to {cfg.max_length}")
    return cut


def sample_id(url: str, key: str) -> str:
    """A sample's id in the whole dataset: its tar and its key in the tar."""
    return f"{url}#{key}"


def _all_ranks_have(have: bool) -> bool:
    """True when every rank has a batch (always ``have`` without torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return have
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(have)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def encoded_samples(shard, processor, cfg: DataConfig, *, epoch: int, stats: dict) -> Iterator:
    """Encoded samples of this worker's share, in (locally shuffled) order."""
    counter = drop_counter()
    batches = shard.iter_batches(
        batch_size=cfg.decode_batch_size,
        batch_format="pyarrow",
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed + epoch if cfg.shuffle_buffer else None,
    )
    for table in batches:
        if "input_ids" in table.column_names:
            # encoded in the pipeline (build_train_dataset(cfg, processor)); counted there
            yield from encoded_table_samples(table)
            continue
        events = []
        for row in table.to_pylist():
            try:
                sample = encode_row(row, processor, cfg)
            except BadSample as bad:
                events.append((row["url"], row["key"], bad.reason, bad.detail))
                continue
            if sample.truncated:
                stats["truncated"] += 1
                events.append((row["url"], row["key"], "truncated", ""))
            sample.sample_id = sample_id(row["url"], row["key"])
            yield sample
        stats["dropped"] += sum(e[2] != "truncated" for e in events)
        report_drops(counter, events)


def iter_train_batches(
    shard,
    processor,
    cfg: DataConfig,
    *,
    batch_size: int,
    epoch: int = 0,
    stats: dict[str, int] | None = None,
    with_ids: bool = False,
) -> Iterator[dict] | Iterator[tuple[dict, list[str]]]:
    """This worker's batches for one epoch, ready for ``model(**batch)`` (full batches only);
    with ``with_ids``, ``(batch, sample ids)`` pairs (``sample_id``: the tar and the key).

    ``shard`` is a ``ray.train.get_dataset_shard(...)`` iterator (or any Ray Data
    DataIterator/Dataset of decoded rows). Ranks stay in lockstep (see the module doc).
    ``stats`` (when given) receives this worker's running counts: ``samples`` kept,
    ``truncated`` and ``dropped`` (at encode time, here); the job-wide counts are
    ``drop_counts()`` and ``truncated_count()``.
    """
    stats = stats if stats is not None else {}
    for name in ("samples", "truncated", "dropped"):
        stats.setdefault(name, 0)
    pending: list[EncodedSample] = []
    for sample in encoded_samples(shard, processor, cfg, epoch=epoch, stats=stats):
        stats["samples"] += 1
        pending.append(sample)
        if len(pending) < batch_size:
            continue
        if not _all_ranks_have(True):
            return
        batch = processor.collate(pending)
        ids = [s.sample_id for s in pending]
        pending = []
        yield (batch, ids) if with_ids else batch
    _all_ranks_have(False)
