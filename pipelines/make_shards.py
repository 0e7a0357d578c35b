"""LLaVA-style conversation data -> WebDataset tar shards plus a manifest.

    python -m pipelines.make_shards --input data.json --media-root DIR --out OUT \
        [--shard-size 512MB] [--max-samples N]

Input: a JSON list or JSONL of records with ``id``, ``image`` (a path or a list
of paths) or ``video`` (a path), and ``conversations`` of ``{"from": "human" |
"gpt", "value": ...}`` with ``<image>``/``<video>`` markers; extra fields are
kept. Each sample becomes ``KEY.json`` (the record, media fields renamed to its
members) and ``KEY.img0.jpg`` ... / ``KEY.video.mp4`` members in their original
encoding, grouped and sorted by key. Shards rotate at ``--shard-size``. The
manifest (``manifest.json``) lists shards, counts and skipped records with
reasons. Rerunning with the same input and options does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
VIDEO_EXTS = {"mp4", "webm"}
MANIFEST = "manifest.json"


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a size from {text!r} (e.g. 512MB)")
    unit = (match.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit])


def load_records(path: Path) -> list[dict]:
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _media_members(record: dict, media_root: Path) -> tuple[dict, list[tuple[str, bytes]]]:
    """The record as stored (media renamed to member names) and its media members."""
    stored = dict(record)
    members: list[tuple[str, bytes]] = []
    if "image" in record and "video" in record:
        raise ValueError("both image and video")
    if "image" in record:
        paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
        names = []
        for i, rel in enumerate(paths):
            ext = Path(rel).suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                raise ValueError(f"unsupported image format .{ext}")
            names.append(f"img{i}.{ext}")
            members.append((names[-1], (media_root / rel).read_bytes()))
        stored["image"] = names
    if "video" in record:
        ext = Path(record["video"]).suffix.lower().lstrip(".")
        if ext not in VIDEO_EXTS:
            raise ValueError(f"unsupported video format .{ext}")
        members.append((f"video.{ext}", (media_root / record["video"]).read_bytes()))
        stored["video"] = f"video.{ext}"
    return stored, members


def _check_record(record: dict) -> None:
    if not isinstance(record, dict) or "id" not in record:
        raise ValueError("record without id")
    conv = record.get("conversations")
    if (
        not isinstance(conv, list)
        or not conv
        or not all(isinstance(t, dict) and "value" in t for t in conv)
    ):
        raise ValueError("missing or invalid conversations")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_shards(
    input_path: str | Path,
    media_root: str | Path,
    out: str | Path,
    *,
    shard_size: int | str = "512MB",
    max_samples: int | None = None,
    progress: bool = True,
) -> dict:
    """Write shards and the manifest; returns the manifest (unchanged when already done)."""
    input_path, media_root, out = Path(input_path), Path(media_root), Path(out)
    limit = parse_size(shard_size)
    options = {"shard_size": limit, "max_samples": max_samples, "input_sha256": _sha256(input_path)}
    done = _existing(out, options)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(input_path)
    if max_samples is not None:
        records = records[:max_samples]
    shards: list[dict] = []
    skipped: list[dict] = []
    tar = None
    written = 0
    for index, record in enumerate(
        tqdm(records, desc=f"sharding {input_path.name}", disable=not progress)
    ):
        try:
            _check_record(record)
            stored, members = _media_members(record, media_root)
        except (ValueError, OSError) as err:
            reason = "missing_media" if isinstance(err, OSError) else str(err)
            skipped.append(
                {
                    "index": index,
                    "id": record.get("id") if isinstance(record, dict) else None,
                    "reason": reason,
                }
            )
            continue
        payload = [("json", json.dumps(stored).encode()), *members]
        size = sum(len(b) for _, b in payload) + 512 * (len(payload) + 1)
        if tar is None or (shards[-1]["samples"] and shards[-1]["bytes"] + size > limit):
            if tar is not None:
                tar.close()
            name = f"shard-{len(shards):06d}.tar"
            tar = tarfile.open(out / f"{name}.tmp", "w")
            shards.append({"name": name, "samples": 0, "bytes": 0})
        key = f"{index:09d}"
        for member, data in sorted(payload):
            _add(tar, f"{key}.{member}", data)
        shards[-1]["samples"] += 1
        shards[-1]["bytes"] += size
        written += 1
    if tar is not None:
        tar.close()
    for shard in shards:
        (out / f"{shard['name']}.tmp").replace(out / shard["name"])
        shard["bytes"] = (out / shard["name"]).stat().st_size
    manifest = {
        **options,
        "input": str(input_path),
        "samples": written,
        "shards": shards,
        "skipped": skipped,
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _existing(out: Path, options: dict) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    same = all(manifest.get(k) == v for k, v in options.items())
    complete = all(
        (out / s["name"]).exists() and (out / s["name"]).stat().st_size == s["bytes"]
        for s in manifest["shards"]
    )
    return manifest if same and complete else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True)
    parser.add_argument("--media-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-size", default="512MB")
    parser.add_argument("--max-samples", type=int, default=None)
    args = parser.parse_args()
    manifest = make_shards(
        args.input,
        args.media_root,
        args.out,
        shard_size=args.shard_size,
        max_samples=args.max_samples,
    )
    print(
        f"{manifest['samples']} samples in {len(manifest['shards'])} shards under {args.out}; "
        f"skipped {len(manifest['skipped'])} {manifest['skipped_by_reason']}"
    )


if __name__ == "__main__":
    main()
