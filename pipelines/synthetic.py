"""A generated dataset whose answers depend on one small region, in LLaVA format.

    python -m pipelines.synthetic --out DIR --n-train N --n-test N [--no-shard]

- ``task="grid"`` (the demo's): a ``grid x grid`` arrangement of coloured shapes, one per
  cell and every colour different (a 4 x 4 grid has more cells than colours: there only the
  asked cell's colour is unique, the others repeat), so that with regions of one cell (the demo's 6 x 6
  tokens in 2 x 2 regions, a 3 x 3 grid) the answer lives in exactly one region. The question
  names one shape by its position ("What colour is the shape in the top left?"), by its
  colour ("Where is the red shape?") or asks which shape the one of a colour is ("What shape
  is the red one?", the demo's); attending to another cell gives a wrong answer. The
  answers are balanced: questions alternate between the kinds asked (``kinds``: "colour" and
  "position" by default, any of the three), the asked cell and the asked colour (or shape)
  cycle through every value. A training image can carry more questions about
  its other cells as further turns (``train_questions``: more to learn from per image); a
  held-out record always has one.
- ``task="scatter"``: ``shapes_per_image`` shapes in distinct cells of a 3 x 3 placement
  (the earlier demo's task); the question asks for one shape's colour or position.
- Videos (mp4, written with PyAV): a plain background in which one shape appears in exactly
  one frame, in one cell of the grid; the question asks for its colour (balanced too).
  ``target_frame`` is that frame.
- ``question_first``: the first question comes before the media, in a user turn of its own
  (then a user turn "<image>", then the answer), instead of LLaVA's "<image>\n{question}";
  further turns follow the media. Its own turn, since a chat template may render a turn's
  media before its text whatever their order (the tiny checkpoint's does, as llava-hf's do).

``target_box`` = [x0, y0, x1, y1] is the box of the shape the answer depends on, in pixels of
the original image (``image_size`` = [w, h]). No image of the test split is an image of the
training split (checked on the pixels).

Writes ``DIR/media/*``, ``DIR/train.json`` and ``DIR/test.json`` (JSON lists of
records with ``id``, ``image`` or ``video``, ``conversations`` and the extra
fields), then ``DIR/shards/{train,test}`` via make_shards (unless ``--no-shard``).
Everything is a function of the seed: the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError

from gazeattn.typed_config import describe
from pipelines.config import COLOUR_NAMES, DEFAULT_GRID_KINDS, SyntheticSettings

RGB = (
    (220, 30, 30),
    (30, 180, 40),
    (30, 60, 220),
    (240, 220, 20),
    (150, 40, 190),
    (250, 140, 10),
    (250, 250, 250),
    (20, 200, 210),
    (250, 130, 190),
)
COLOURS = dict(zip(COLOUR_NAMES, RGB, strict=True))
SHAPES = ("square", "circle", "triangle")
BACKGROUNDS = ((40, 40, 40), (90, 90, 90), (20, 30, 60))
# image encodings cycle so every format the pipeline reads is exercised
IMAGE_FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


@dataclass(kw_only=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLOURS[shape.colour]
    if shape.kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape.kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def place_shapes(rng: np.random.Generator, size: int, count: int) -> list[Shape]:
    """``count`` shapes of distinct kind-colour pairs in distinct cells of a 3x3 grid."""
    cell = size // 3
    side = max(4, cell * 2 // 3)
    cells = rng.choice(9, size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    shapes = []
    for i, (c, k) in enumerate(zip(cells, colours, strict=True)):
        row, col = divmod(int(c), 3)
        x0 = col * cell + int(rng.integers(0, cell - side + 1))
        y0 = row * cell + int(rng.integers(0, cell - side + 1))
        shapes.append(
            Shape(
                kind=SHAPES[i % len(SHAPES)],
                colour=list(COLOURS)[int(k)],
                box=(x0, y0, x0 + side, y0 + side),
            )
        )
    return shapes


def position_words(box: tuple[int, int, int, int], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    vertical = ("top", "middle", "bottom")[min(2, int(3 * cy / size))]
    horizontal = ("left", "centre", "right")[min(2, int(3 * cx / size))]
    return (
        "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    )


def image_record(
    rng: np.random.Generator,
    rid: str,
    media: Path,
    size: int,
    index: int,
    count: int = 3,
    question_first: bool = False,
) -> dict:
    shapes = place_shapes(rng, size, count=count)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    ext, fmt = IMAGE_FORMATS[index % len(IMAGE_FORMATS)]
    name = f"{rid}.{ext}"
    image.save(media / name, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    target = shapes[int(rng.integers(len(shapes)))]
    if rng.random() < 0.5:
        task, question, answer = "colour", f"What colour is the {target.kind}?", target.colour
    else:
        task = "position"
        question = f"Where is the {target.colour} {target.kind}?"
        answer = position_words(target.box, size)
    return image_entry(rid, name, question, answer, task=task, box=target.box, size=size,
                       question_first=question_first)  # fmt: skip


def cell_words(row: int, col: int, grid: int) -> str:
    """The position of cell (row, col) of a ``grid x grid`` arrangement in words."""
    if grid == 1:
        return "centre"
    names = {2: (("top", "bottom"), ("left", "right")),
             3: (("top", "middle", "bottom"), ("left", "centre", "right")),
             4: (("top", "upper", "lower", "bottom"),
                 ("left", "centre left", "centre right", "right"))}[grid]  # fmt: skip
    vertical, horizontal = names[0][row], names[1][col]
    return (
        "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
    )


def cell_box(
    rng: np.random.Generator, row: int, col: int, cell: int, fill: float = 2 / 3
) -> tuple[int, int, int, int]:
    """A shape's box inside cell (row, col): ``fill`` of the cell's side, placed at random in it."""
    side = min(cell, max(4, int(cell * fill + 1e-9)))
    x0 = col * cell + int(rng.integers(0, cell - side + 1))
    y0 = row * cell + int(rng.integers(0, cell - side + 1))
    return (x0, y0, x0 + side, y0 + side)


def render(size: int, background, shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def grid_shapes(
    rng: np.random.Generator,
    size: int,
    grid: int,
    target_cell: int,
    target_colour: int,
    fill: float = 2 / 3,
    target_kind: str | None = None,
) -> list[Shape]:
    """One shape per cell, all colours different (when the grid has more cells than colours,
    the others repeat: ``target_colour`` stays unique); ``target_colour`` goes in
    ``target_cell`` (and ``target_kind``, when given, is its shape)."""
    cell = size // grid
    others = [c for c in range(len(COLOURS)) if c != target_colour]
    repeat = grid * grid - 1 > len(others)
    colours = list(rng.choice(others, size=grid * grid - 1, replace=repeat))
    colours.insert(target_cell, target_colour)
    kinds = [SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=grid * grid)]
    if target_kind is not None:
        kinds[target_cell] = target_kind
    return [
        Shape(
            kind=kinds[i],
            colour=list(COLOURS)[int(colours[i])],
            box=cell_box(rng, *divmod(i, grid), cell, fill),
        )
        for i in range(grid * grid)
    ]


def grid_record(
    rng: np.random.Generator,
    rid: str,
    media: Path,
    size: int,
    index: int,
    grid: int,
    seen: set,
    *,
    fill: float = 2 / 3,
    questions: int = 1,
    kinds: tuple[str, ...] = DEFAULT_GRID_KINDS,
    question_first: bool = False,
) -> dict:
    """One image of the grid task; ``index`` cycles the question kind, cell and colour.

    ``questions`` > 1 adds turns about other cells (in random order, the kinds alternating);
    the record's task, target box and first question are the first turn's (before the image
    when ``question_first``)."""
    cells, turn_of = grid * grid, index // len(kinds)
    kind = kinds[index % len(kinds)]
    target_cell = turn_of % cells
    target_colour = turn_of % len(COLOURS) if kind == "colour" else int(rng.integers(len(COLOURS)))
    # the answer of a shape question cycles through the shapes, shifted by one every pass
    # over the cells, so that each cell holds each answer as often (the place alone never
    # tells the shape)
    shifted = (turn_of + turn_of // cells) % len(SHAPES)
    target_kind = SHAPES[shifted] if kind in ("shape", "shape_at") else None
    for _ in range(100):  # a new drawing until its pixels are new to the dataset
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        shapes = grid_shapes(rng, size, grid, target_cell, target_colour, fill, target_kind)
        image = render(size, background, shapes)
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            break
    else:
        raise ValueError(f"no new {size} px image after 100 draws: use larger images or fewer")
    ext, fmt = IMAGE_FORMATS[index % len(IMAGE_FORMATS)]
    name = f"{rid}.{ext}"
    image.save(media / name, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    task, question, answer = grid_question(shapes, target_cell, grid, kind)
    record = image_entry(rid, name, question, answer, task=task, box=shapes[target_cell].box,
                         size=size, question_first=question_first)  # fmt: skip
    others = (
        [int(c) for c in rng.permutation(cells) if c != target_cell][: questions - 1]
        if questions > 1
        else []
    )
    for turn, c in enumerate(others, start=1):
        turn_kind = kinds[(kinds.index(kind) + turn) % len(kinds)]
        _, question, answer = grid_question(shapes, c, grid, turn_kind)
        record["conversations"] += [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
        ]
    return record


def grid_question(shapes: list[Shape], cell: int, grid: int, kind: str) -> tuple[str, str, str]:
    """(task, question, answer) about the shape in ``cell``: its colour (kind "colour"), where
    the shape of its colour is (kind "position") or which shape it is, asked by its colour
    (kind "shape") or by its position (kind "shape_at"): the question names where to look,
    the answer is what is seen there."""
    where = cell_words(*divmod(cell, grid), grid)
    shape = shapes[cell]
    if kind == "colour":
        return "grid_colour", f"What colour is the shape in the {where}?", shape.colour
    if kind == "shape":
        return "grid_shape", f"What shape is the {shape.colour} one?", shape.kind
    if kind == "shape_at":
        return "grid_shape_at", f"What shape is in the {where}?", shape.kind
    return "grid_position", f"Where is the {shape.colour} shape?", where


def first_turns(marker: str, question: str, question_first: bool = False) -> list[dict]:
    """The human turns before the first answer: the media marker, then the question (LLaVA's
    "<image>\n{question}"), or the question in a turn of its own, then the marker's turn."""
    if question_first:
        return [{"from": "human", "value": question}, {"from": "human", "value": marker}]
    return [{"from": "human", "value": f"{marker}\n{question}"}]


def image_entry(
    rid: str,
    name: str,
    question: str,
    answer: str,
    *,
    task: str,
    box,
    size: int,
    question_first: bool = False,
) -> dict:
    """One image record in LLaVA format, with the target box (pixels of the original image)."""
    return {
        "id": rid,
        "image": name,
        "conversations": [
            *first_turns("<image>", question, question_first),
            {"from": "gpt", "value": answer},
        ],
        "task": task,
        "target_box": list(box),
        "image_size": [size, size],
    }


def write_mp4(frames: list[np.ndarray], fps: int = 4) -> bytes:
    """RGB frames (H and W even) -> H.264 mp4 bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        # near-lossless, so the colour of a one-frame object survives compression
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def video_record(
    rng: np.random.Generator,
    rid: str,
    media: Path,
    size: int,
    frames: int,
    *,
    index: int = 0,
    grid: int = 3,
    fill: float = 2 / 3,
    question_first: bool = False,
) -> dict:
    """One shape in one cell of the grid, in one frame; its colour cycles with ``index``."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    row, col = divmod(int(rng.integers(grid * grid)), grid)
    shape = Shape(
        kind=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=list(COLOURS)[index % len(COLOURS)],
        box=cell_box(rng, row, col, size // grid, fill),
    )
    target_frame = int(rng.integers(frames))
    clip = [
        np.asarray(render(size, background, [shape] if t == target_frame else []))
        for t in range(frames)
    ]
    name = f"{rid}.mp4"
    (media / name).write_bytes(write_mp4(clip))
    return {
        "id": rid,
        "video": name,
        "conversations": [
            *first_turns(
                "<video>", f"What colour is the {shape.kind} that appears?", question_first
            ),
            {"from": "gpt", "value": shape.colour},
        ],
        "task": "video_colour",
        "target_box": list(shape.box),
        "target_frame": target_frame,
        "num_frames": frames,
        "image_size": [size, size],
    }


def generate(
    out: str | Path, settings: SyntheticSettings | None = None, **fields
) -> dict[str, Path]:
    """Write media and ``train.json``/``test.json`` under ``out``; returns the json paths.

    ``settings``, or the fields of ``SyntheticSettings`` as keywords (checked there, once)."""
    if settings is None:
        settings = SyntheticSettings(**fields)
    elif fields:
        raise TypeError(f"give settings or fields, not both: {sorted(fields)}")
    s = settings
    out = Path(out)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    paths = {}
    seen: set[str] = set()  # the images drawn so far: the test split shares none with training
    for split, count, offset in (("train", s.n_train, 0), ("test", s.n_test, 1)):
        rng = np.random.default_rng([s.seed, offset])
        records = []
        videos = 0
        for i in range(count):
            rid = f"{split}-{i:06d}"
            if rng.random() < s.video_fraction:
                cells = s.grid if s.task == "grid" else 3
                records.append(
                    video_record(
                        rng,
                        rid,
                        media,
                        s.image_size,
                        s.frames,
                        index=videos,
                        grid=cells,
                        fill=s.shape_fill,
                        question_first=s.question_first,
                    )  # fmt: skip
                )
                videos += 1
            elif s.task == "grid":
                records.append(
                    grid_record(
                        rng,
                        rid,
                        media,
                        s.image_size,
                        i - videos,
                        s.grid,
                        seen,
                        fill=s.shape_fill,
                        questions=s.train_questions if split == "train" else 1,
                        kinds=s.grid_kinds,
                        question_first=s.question_first,
                    )  # fmt: skip
                )
            else:
                records.append(
                    image_record(
                        rng,
                        rid,
                        media,
                        s.image_size,
                        i,
                        count=s.shapes_per_image,
                        question_first=s.question_first,
                    )  # fmt: skip
                )
        if s.spaced_answers:
            for record in records:
                for turn in record["conversations"]:
                    if turn["from"] == "gpt":
                        turn["value"] = f" {turn['value']}"
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1))
    return paths


def build(
    out: str | Path, cfg: SyntheticSettings, *, progress: bool = False
) -> dict[str, list[str]]:
    """Generate and shard the synthetic dataset under ``out`` (both idempotent); returns the
    shard paths per split."""
    from pipelines.make_shards import make_shards, shard_paths

    out = Path(out)
    paths = generate(out, cfg)
    shards = {}
    for split, path in paths.items():
        make_shards(
            path,
            out / "media",
            out / "shards" / split,
            shard_size=cfg.shard_size,
            progress=progress,
        )
        shards[split] = shard_paths(out / "shards" / split)
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-shard", action="store_true", help="write the json and media only")
    # one flag per setting, its help and default from SyntheticSettings (checked there)
    for name, field in SyntheticSettings.model_fields.items():
        many = typing.get_origin(field.annotation) is tuple
        default = list(field.default) if many else field.default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, nargs="+" if many else None,
                            default=default, help=f"{field.description} (default: {default})")  # fmt: skip
    args = parser.parse_args(argv)
    fields = {name: getattr(args, name) for name in SyntheticSettings.model_fields}
    try:
        settings = SyntheticSettings(**fields)
    except ValidationError as err:
        parser.error(describe(err))
    paths = generate(args.out, settings)
    for split, path in paths.items():
        print(f"{split}: {path}")
        if not args.no_shard:
            from pipelines.make_shards import make_shards, parse_size

            out = Path(args.out) / "shards" / split
            manifest = make_shards(
                path, Path(args.out) / "media", out, shard_size=parse_size(settings.shard_size)
            )
            print(f"  {manifest['num_samples']} samples in {len(manifest['shards'])} shards: {out}")


if __name__ == "__main__":
    main()
