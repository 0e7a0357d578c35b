"""Decode one WebDataset sample (json + image/video bytes) into a record and uint8 frames.

Images and frames keep their own size (``max_side``, when set, bounds the longer
side): the checkpoint's image processor resizes them once, as it does at serving
time. Video frames are sampled by ``gazeattn.video`` (the sampler evaluation and
serving use). Each failure raises ``BadSample`` with one of the ``REASONS``; the
caller drops the sample, logs it once (tar + key + reason) and counts it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gazeattn.video import EmptyVideo, fit_within, read_video, sample_indices

__all__ = [
    "BadSample",
    "Decoded",
    "decode_image",
    "decode_sample",
    "decode_video",
    "sample_indices",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")

REASONS = (
    "bad_tar",  # a truncated or unreadable tar (its samples after the damage are lost)
    "missing_json",
    "bad_json",  # not JSON, not an object, or no list of conversations
    "bad_image",  # bytes PIL cannot decode
    "bad_video",  # bytes PyAV cannot decode
    "empty_video",  # a video without frames
    "marker_mismatch",  # <image>/<video> markers do not match the stored media
    "text_only",  # dropped by DataConfig.text_only == "drop"
    "too_long",  # longer than max_length and not truncatable (or length_policy == "drop")
    "answer_truncated",  # truncation to max_length cut every answer token (no label left)
    "encode_error",  # the processor rejected the sample (ProcessorInputError)
)


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(kw_only=True)
class Decoded:
    record: dict
    images: list[np.ndarray]  # each [H, W, 3] uint8
    videos: list[np.ndarray]  # each [F, H, W, 3] uint8


def decode_image(data: bytes, max_side: int | None = None) -> np.ndarray:
    """Image bytes (jpg, png, webp) -> [H, W, 3] uint8 at its own size (longer side bounded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = fit_within(image.convert("RGB"), max_side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadSample("bad_image", str(error)) from error
    return np.asarray(rgb, dtype=np.uint8)


def decode_video(data: bytes, frames: int, max_side: int | None = None) -> np.ndarray:
    """Video bytes -> [frames, H, W, 3] uint8, frames sampled uniformly over the clip."""
    try:
        out = read_video(data, frames, max_side=max_side)
    except EmptyVideo as error:
        raise BadSample("empty_video", str(error)) from error
    except ValueError as error:
        raise BadSample("bad_video", str(error)) from error
    return np.stack(out)


def parse_record(data) -> dict:
    if data is None or (isinstance(data, bytes) and not data):
        raise BadSample("missing_json")
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadSample("bad_json", str(error)) from error
    if not isinstance(record, dict):
        raise BadSample("bad_json", "not a JSON object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_json", "no conversations")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise BadSample("bad_json", "a turn without a string 'value'")
    return record


def media_order(names: list[str]) -> tuple[list[str], list[str]]:
    """Member suffixes ('img0.png', 'vid0.mp4', ...) -> image and video suffixes in index order."""

    def index(name: str) -> int:
        stem = name.split(".", 1)[0]
        return int(stem[3:]) if stem[3:].isdigit() else 0

    images = sorted((n for n in names if n.split(".")[-1].lower() in IMAGE_EXTS), key=index)
    videos = sorted((n for n in names if n.split(".")[-1].lower() in VIDEO_EXTS), key=index)
    return images, videos


def decode_sample(
    members: dict[str, bytes], *, frames: int, max_side: int | None = None
) -> Decoded:
    """The members of one sample (suffix -> bytes) -> a Decoded sample, or raises BadSample."""
    record = parse_record(members.get("json"))
    image_names, video_names = media_order([n for n in members if n != "json"])
    text = "".join(t["value"] for t in record["conversations"])
    n_image, n_video = text.count("<image>"), text.count("<video>")
    if n_image != len(image_names) or n_video != len(video_names):
        raise BadSample(
            "marker_mismatch",
            f"{n_image} <image> for {len(image_names)} images, "
            f"{n_video} <video> for {len(video_names)} videos",
        )
    images = [decode_image(members[n], max_side) for n in image_names]
    videos = [decode_video(members[n], frames, max_side) for n in video_names]
    return Decoded(record=record, images=images, videos=videos)
