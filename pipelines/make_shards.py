"""LLaVA-style conversation records -> WebDataset tar shards, plus a manifest.

    python -m pipelines.make_shards --input data.json --media-root DIR --out OUT \\
        [--shard-size 512MB] [--max-samples N] [--no-progress]

Input: a JSON list or JSONL of records with ``id``, ``image`` (a path or a list
of paths) or ``video`` (a path), and ``conversations`` of ``{"from", "value"}``
turns with ``<image>``/``<video>`` markers; other fields are kept.

Each sample is stored under the key ``{record index:09d}`` (keys sort in input
order and never contain dots) as:

- ``KEY.json``: the record exactly as read (all extra fields kept),
- ``KEY.img{i}.{ext}``: the i-th image's file, in its original encoding,
- ``KEY.vid0.{ext}``: the video's file (mp4, webm, ...).

Members of a sample are contiguous and sorted by name, samples in key order
(readers split unsorted tars into partial samples). A new shard starts when the
next sample would pass ``--shard-size``. Records that cannot be stored are
skipped and listed with their reason in ``OUT/manifest.json``. Tars are
deterministic (fixed mtime/owner): rerunning on unchanged input finds the
manifest up to date and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT_VERSION = 1


def parse_size(text: str | int) -> int:
    """'512MB', '1.5GiB', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read size {text!r} (e.g. 512MB)")
    unit = match.group(2).rstrip("b").rstrip("i")
    scale = 1024 if "i" in match.group(2) else 1000
    return int(float(match.group(1)) * scale ** " kmgt".index(unit or " "))


def read_records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one record per line; a bad line becomes a string, then skipped)."""
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return records
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(line)
    return records


def media_paths(record: dict) -> tuple[list[str], list[str]]:
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    video = record.get("video")
    return images, [video] if video else []


class SkipRecord(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def sample_members(record: Any, key: str, media_root: Path) -> list[tuple[str, bytes]]:
    """The tar members of one record, sorted by name; raises SkipRecord when it cannot be stored."""
    if not isinstance(record, dict):
        raise SkipRecord("invalid_record", "not a JSON object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SkipRecord("invalid_record", "no conversations")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise SkipRecord("invalid_record", "a turn without a string 'value'")
    images, videos = media_paths(record)
    if images and videos:
        raise SkipRecord("invalid_record", "both image and video")
    text = "".join(t["value"] for t in turns)
    if text.count("<image>") != len(images) or text.count("<video>") != len(videos):
        raise SkipRecord(
            "marker_mismatch",
            f"{text.count('<image>')} <image> for {len(images)} images, "
            f"{text.count('<video>')} <video> for {len(videos)} videos",
        )
    members = [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]
    for kind, paths, allowed in (("img", images, IMAGE_EXTS), ("vid", videos, VIDEO_EXTS)):
        for i, rel in enumerate(paths):
            ext = Path(rel).suffix.lower().lstrip(".")
            if ext not in allowed:
                raise SkipRecord("unsupported_media", f"{rel} (.{ext})")
            path = media_root / rel
            if not path.is_file():
                raise SkipRecord("missing_media", str(rel))
            members.append((f"{key}.{kind}{i}.{ext}", path.read_bytes()))
    return sorted(members)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A deterministic tar (fixed mtime, owner and mode), written atomically."""
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def up_to_date(out: Path, fingerprint: dict) -> dict | None:
    """The existing manifest when it was made from the same input and options and its tars are intact."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return None
    return manifest


def make_shards(
    input: str | Path,
    media_root: str | Path,
    out: str | Path,
    *,
    shard_size: int | str = "512MB",
    max_samples: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the shards and ``manifest.json`` under ``out``; returns the manifest."""
    input, media_root, out = Path(input), Path(media_root), Path(out)
    limit = parse_size(shard_size)
    fingerprint = {
        "format": FORMAT_VERSION,
        "input_sha256": file_sha256(input),
        "media_root": str(media_root.resolve()),
        "shard_size": limit,
        "max_samples": max_samples,
    }
    out.mkdir(parents=True, exist_ok=True)
    if (manifest := up_to_date(out, fingerprint)) is not None:
        return manifest
    records = read_records(input)
    shards: list[dict] = []
    skipped: list[dict] = []
    pending: list[tuple[str, bytes]] = []
    pending_keys: list[str] = []

    def flush() -> None:
        if not pending_keys:
            return
        path = out / SHARD_PATTERN.format(len(shards))
        write_tar(path, pending)
        shards.append(
            {
                "name": path.name,
                "samples": len(pending_keys),
                "bytes": path.stat().st_size,
                "first_key": pending_keys[0],
                "last_key": pending_keys[-1],
            }
        )
        pending.clear()
        pending_keys.clear()

    def tar_bytes(members) -> int:
        # a 512-byte header per member plus its data rounded up to 512
        return sum(512 + -(-len(data) // 512) * 512 for _, data in members)

    stored = 0
    bar = tqdm(records, desc=f"shards {out.name}", unit="rec", disable=not progress)
    for index, record in enumerate(bar):
        if max_samples is not None and stored >= max_samples:
            break
        key = f"{index:09d}"
        try:
            members = sample_members(record, key, media_root)
        except SkipRecord as skip:
            rid = record.get("id") if isinstance(record, dict) else None
            skipped.append(
                {"index": index, "id": rid, "reason": skip.reason, "detail": skip.detail}
            )
            continue
        # the end-of-archive blocks (1024 bytes) and the record padding count against the limit
        if pending and tar_bytes(pending) + tar_bytes(members) + 10240 > limit:
            flush()
        pending.extend(members)
        pending_keys.append(key)
        stored += 1
    flush()
    bar.close()
    names = {s["name"] for s in shards}
    for stale in out.glob("shard-*.tar"):
        if stale.name not in names:
            stale.unlink()
    manifest = {
        "fingerprint": fingerprint,
        "input": str(input),
        "num_records": len(records),
        "num_samples": stored,
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped": skipped,
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def shard_paths(out: str | Path) -> list[str]:
    """The tar paths listed in ``out/manifest.json``, in order."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    return [str(out / s["name"]) for s in manifest["shards"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="LLaVA-style JSON list or JSONL")
    parser.add_argument("--media-root", required=True, help="image/video paths are relative to it")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-size", default="512MB")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    manifest = make_shards(
        args.input,
        args.media_root,
        args.out,
        shard_size=args.shard_size,
        max_samples=args.max_samples,
        progress=not args.no_progress,
    )
    print(
        f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards "
        f"({manifest['total_bytes'] / 1e6:.1f} MB), {manifest['num_skipped']} skipped "
        f"{manifest['skipped_by_reason']} -> {Path(args.out) / MANIFEST}"
    )


if __name__ == "__main__":
    main()
