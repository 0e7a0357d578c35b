"""A generated dataset whose answers depend on one small region, with ground-truth boxes.

    python -m pipelines.synthetic --out DIR --n-train N --n-test N [--image-size 96] [--frames 4]

Images: several coloured shapes on a gray background; the question asks for the
colour of the shape at a named position (or the position of a coloured shape).
Videos: a shape that appears in exactly one frame; the question asks for its
colour, or in which frame it appears. Every record carries ``target_box``
([x0, y0, x1, y1] in pixels of its image/frame) and, for video, ``target_frame``.
Written as LLaVA-style JSON (``train.json``, ``test.json``) plus media files,
then sharded with ``pipelines.make_shards`` (``--shards``).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# quadrant name -> (column, row) in a 2 x 2 grid
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
BACKGROUND = (128, 128, 128)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _shape_box(rng: random.Random, size: int, col: int, row: int) -> tuple[int, int, int, int]:
    """A box of about a sixth of the image inside quadrant (col, row)."""
    half = size // 2
    side = max(6, size // 6)
    x0 = col * half + rng.randint(2, half - side - 2)
    y0 = row * half + rng.randint(2, half - side - 2)
    return (x0, y0, x0 + side, y0 + side)


def make_image_record(rng: random.Random, idx: int, size: int, media_dir: Path, split: str) -> dict:
    """Shapes in some quadrants; ask about one of them."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    quadrants = rng.sample(list(POSITIONS), k=rng.randint(2, 4))
    colors = rng.sample(list(COLORS), k=len(quadrants))
    placed = []
    for name, color in zip(quadrants, colors, strict=True):
        shape = rng.choice(SHAPES)
        box = _shape_box(rng, size, *POSITIONS[name])
        _draw(draw, shape, box, COLORS[color])
        placed.append((name, color, shape, box))
    name, color, shape, box = rng.choice(placed)
    if rng.random() < 0.5:
        question, answer = f"What color is the {shape} in the {name}?", color
    else:
        question, answer = f"Where is the {color} {shape}?", name
    ext = rng.choice(["jpg", "png", "webp"])
    rel = f"{split}/img{idx:06d}.{ext}"
    path = media_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if ext != "png" else image.save(path)
    return {
        "id": f"{split}-img-{idx:06d}",
        "image": rel,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "target_box": list(box),
    }


def encode_mp4(frames: list[np.ndarray], fps: int = 4) -> bytes:
    """H.264 (yuv420p) mp4 bytes of HWC uint8 frames, via PyAV."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video_record(
    rng: random.Random, idx: int, size: int, n_frames: int, media_dir: Path, split: str
) -> dict:
    """A shape that appears in one frame only."""
    frame_idx = rng.randrange(n_frames)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    box = _shape_box(rng, size, rng.randint(0, 1), rng.randint(0, 1))
    frames = []
    for f in range(n_frames):
        image = Image.new("RGB", (size, size), BACKGROUND)
        if f == frame_idx:
            _draw(ImageDraw.Draw(image), shape, box, COLORS[color])
        frames.append(np.asarray(image))
    if rng.random() < 0.5:
        question, answer = f"What color is the {shape} that appears in the video?", color
    else:
        question, answer = f"In which frame does the {shape} appear?", str(frame_idx + 1)
    rel = f"{split}/vid{idx:06d}.mp4"
    path = media_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames))
    return {
        "id": f"{split}-vid-{idx:06d}",
        "video": rel,
        "conversations": [
            {"from": "human", "value": f"<video>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "target_box": list(box),
        "target_frame": frame_idx,
        "num_frames": n_frames,
    }


def generate(
    out: str | Path,
    *,
    n_train: int,
    n_test: int,
    image_size: int = 96,
    frames: int = 4,
    video_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``train.json``/``test.json`` and media under ``out``; returns the json paths."""
    out = Path(out)
    media = out / "media"
    paths = {}
    for split, count, offset in (("train", n_train, 0), ("test", n_test, 1)):
        rng = random.Random(seed * 1000 + offset)
        records = []
        for i in range(count):
            if rng.random() < video_fraction:
                records.append(make_video_record(rng, i, image_size, frames, media, split))
            else:
                records.append(make_image_record(rng, i, image_size, media, split))
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--video-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shards", action="store_true", help="also write WebDataset shards under OUT/shards/"
    )
    args = parser.parse_args()
    paths = generate(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        image_size=args.image_size,
        frames=args.frames,
        video_fraction=args.video_fraction,
        seed=args.seed,
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if args.shards:
        from pipelines.make_shards import make_shards

        for split, path in paths.items():
            manifest = make_shards(
                path, Path(args.out) / "media", Path(args.out) / "shards" / split
            )
            print(f"{split}: {manifest['samples']} samples in {len(manifest['shards'])} shards")


if __name__ == "__main__":
    main()
