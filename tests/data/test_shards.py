"""Synthetic data and make_shards: records in == samples out, in order, with content."""

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.make_shards import MANIFEST, make_shards, parse_size, shard_paths
from pipelines.synthetic import COLOURS, cell_words, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    paths = generate(root, n_train=12, n_test=3, image_size=48, frames=4, video_fraction=0.3)
    return root, paths


def read_tar(path):
    """(member name, bytes) in archive order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def test_synthetic_records_carry_targets(synthetic):
    root, paths = synthetic
    records = json.loads(paths["train"].read_text())
    assert len(records) == 12
    kinds = {"image" in r for r in records}
    assert kinds == {True, False}, "both images and videos"
    for r in records:
        x0, y0, x1, y1 = r["target_box"]
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        if "image" in r:
            assert human["value"].startswith("<image>\n")
            image = np.asarray(Image.open(root / "media" / r["image"]).convert("RGB"))
            if r["task"] == "colour":
                # the answer's colour is what is drawn at the centre of the target box
                centre = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
                assert np.abs(centre - COLOURS[gpt["value"]]).max() < 40
        else:
            assert human["value"].startswith("<video>\n")
            assert 0 <= r["target_frame"] < r["num_frames"] == 4
            with av.open(str(root / "media" / r["video"])) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert len(frames) == 4
            centre = frames[r["target_frame"]][(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            assert np.abs(centre - COLOURS[gpt["value"]]).max() < 40


def test_synthetic_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", n_train=4, n_test=1, image_size=32, seed=3)
    b = generate(tmp_path / "b", n_train=4, n_test=1, image_size=32, seed=3)
    assert a["train"].read_text() == b["train"].read_text()


@pytest.mark.parametrize("shapes", [1, 3])
def test_shapes_per_image(tmp_path, shapes):
    paths = generate(
        tmp_path, n_train=6, n_test=0, video_fraction=0, task="scatter", shapes_per_image=shapes
    )
    for r in json.loads(paths["train"].read_text()):
        if not r["image"].endswith(".png"):  # lossless: the colours are exact
            continue
        pixels = np.asarray(Image.open(tmp_path / "media" / r["image"])).reshape(-1, 3)
        colours = {tuple(c) for c in pixels} & {tuple(c) for c in COLOURS.values()}
        assert len(colours) == shapes, r


@pytest.mark.parametrize("grid", [2, 3])
def test_grid_task_answer_lives_in_one_cell(tmp_path, grid):
    """One shape per cell, colours all different; the answer is the asked cell's, its box in
    that cell; answers balanced; no held-out image is a training image."""
    size = 24 * grid
    paths = generate(tmp_path, n_train=72, n_test=36, image_size=size, video_fraction=0.25,
                     task="grid", grid=grid, seed=1)  # fmt: skip
    cell = size // grid
    digests = {}
    for split in ("train", "test"):
        records = json.loads(paths[split].read_text())
        answers = Counter()
        for r in records:
            answer = r["conversations"][1]["value"]
            x0, y0, x1, y1 = r["target_box"]
            assert x0 // cell == (x1 - 1) // cell and y0 // cell == (y1 - 1) // cell, r
            if "video" in r:
                assert r["task"] == "video_colour" and 0 <= r["target_frame"] < r["num_frames"]
                continue
            answers[(r["task"], answer)] += 1
            image = Image.open(tmp_path / "media" / r["image"]).convert("RGB")
            digests.setdefault(split, set()).add(hashlib.sha1(image.tobytes()).hexdigest())
            if not r["image"].endswith(".png"):  # lossless: the colours are exact
                continue
            pixels = np.asarray(image)
            colours = []
            for row in range(grid):
                for col in range(grid):
                    block = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
                    found = {tuple(c) for c in block.reshape(-1, 3)} & set(COLOURS.values())
                    assert len(found) == 1, (r, row, col)
                    colours.append(found.pop())
            assert len(set(colours)) == grid * grid
            asked = colours[(y0 // cell) * grid + x0 // cell]
            question = r["conversations"][0]["value"]
            if r["task"] == "grid_colour":
                assert COLOURS[answer] == asked, r
            else:
                assert r["task"] == "grid_position" and f"the {asked_name(asked)} shape" in question
        # balanced: each kind's answers differ in count by at most one cycle's remainder
        for task in ("grid_colour", "grid_position"):
            counts = [n for (t, _), n in answers.items() if t == task]
            assert counts and max(counts) - min(counts) <= 1, (split, task, answers)
    assert not digests["train"] & digests["test"]


def test_grid_training_images_carry_a_question_per_cell(tmp_path):
    """train_questions: further turns about the other cells (each answered from its own
    cell, the kinds alternating); held-out records keep one question; shape_fill sizes the
    shapes."""
    size, grid = 64, 2
    paths = generate(tmp_path, n_train=12, n_test=6, image_size=size, video_fraction=0.0,
                     task="grid", grid=grid, shape_fill=0.9, train_questions=4, seed=2)  # fmt: skip
    cell = size // grid
    for split, turns in (("train", 8), ("test", 2)):
        for r in json.loads(paths[split].read_text()):
            conversation = r["conversations"]
            assert len(conversation) == turns, r
            x0, y0, x1, y1 = r["target_box"]
            assert x1 - x0 == int(cell * 0.9) == y1 - y0
            if not r["image"].endswith(".png"):
                continue
            pixels = np.asarray(Image.open(tmp_path / "media" / r["image"]).convert("RGB"))
            colours = {}
            for row in range(grid):
                for col in range(grid):
                    block = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
                    found = {tuple(c) for c in block.reshape(-1, 3)} & set(COLOURS.values())
                    colours[cell_words(row, col, grid)] = asked_name(found.pop())
            asked, kinds = set(), []
            for question, answer in zip(conversation[::2], conversation[1::2], strict=True):
                text, reply = question["value"].removeprefix("<image>\n"), answer["value"]
                if text.startswith("What colour"):
                    where = text.removeprefix("What colour is the shape in the ").rstrip("?")
                    assert colours[where] == reply, r
                    kinds.append(0)
                else:
                    assert colours[reply] in text, r
                    where = reply
                    kinds.append(1)
                asked.add(where)
            assert len(asked) == turns // 2, "every question is about another cell"
            assert all(a != b for a, b in zip(kinds[:-1], kinds[1:], strict=True)), (
                "the kinds alternate"
            )


def test_train_questions_is_checked(tmp_path):
    with pytest.raises(ValueError, match="train_questions"):
        generate(tmp_path, n_train=1, n_test=0, task="grid", grid=2, train_questions=5)


def test_grid_kinds_limits_the_questions_and_keeps_them_balanced(tmp_path):
    """grid_kinds=("colour",): every question, further turns too, asks a colour; the asked
    cells and colours still cycle evenly."""
    paths = generate(tmp_path, n_train=36, n_test=36, image_size=48, video_fraction=0.0,
                     task="grid", grid=2, train_questions=2, grid_kinds=["colour"], seed=4)  # fmt: skip
    for split in ("train", "test"):
        records = json.loads(paths[split].read_text())
        cells, answers = Counter(), Counter()
        for r in records:
            assert r["task"] == "grid_colour"
            questions = [t["value"] for t in r["conversations"][::2]]
            assert all("What colour is the shape in the" in q for q in questions), r
            cells[questions[0]] += 1
            answers[r["conversations"][1]["value"]] += 1
        assert len(cells) == 4 and max(cells.values()) == min(cells.values()), cells
        assert len(answers) == len(COLOURS) and max(answers.values()) == min(answers.values())
    with pytest.raises(ValueError, match="grid_kinds"):
        generate(tmp_path, n_train=1, n_test=0, task="grid", grid_kinds=["size"])


def asked_name(rgb) -> str:
    return next(name for name, value in COLOURS.items() if value == rgb)


def test_shapes_per_image_is_checked(tmp_path):
    with pytest.raises(ValueError, match="shapes_per_image"):
        generate(tmp_path, n_train=1, n_test=0, task="scatter", shapes_per_image=10)


def test_round_trip_order_and_content(synthetic, tmp_path):
    root, paths = synthetic
    records = json.loads(paths["train"].read_text())
    manifest = make_shards(
        paths["train"], root / "media", tmp_path, shard_size="30KB", progress=False
    )
    assert manifest["num_samples"] == 12 and manifest["num_skipped"] == 0
    assert len(manifest["shards"]) > 1, "the size bound splits the data"
    out = []
    for path in shard_paths(tmp_path):
        members = read_tar(path)
        names = [n for n, _ in members]
        assert names == sorted(names), "members grouped and sorted by key"
        assert Path(path).stat().st_size <= 30_000 or len({n.split(".")[0] for n in names}) == 1
        samples: dict[str, dict] = {}
        for name, data in members:
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
        out.extend(samples.values())
    assert [json.loads(s["json"]) for s in out] == records
    for sample, record in zip(out, records, strict=True):
        if "image" in record:
            ext = record["image"].rsplit(".", 1)[1]
            assert sample[f"img0.{ext}"] == (root / "media" / record["image"]).read_bytes()
        else:
            assert sample["vid0.mp4"] == (root / "media" / record["video"]).read_bytes()


def test_idempotent(synthetic, tmp_path):
    root, paths = synthetic
    first = make_shards(paths["train"], root / "media", tmp_path, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    second = make_shards(paths["train"], root / "media", tmp_path, progress=False)
    assert first == second
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    # a forced rewrite produces byte-identical tars, and a smaller run removes stale shards
    (tmp_path / MANIFEST).unlink()
    tars = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    make_shards(paths["train"], root / "media", tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == tars
    small = make_shards(
        paths["train"], root / "media", tmp_path, shard_size="20KB", max_samples=2, progress=False
    )
    assert small["num_samples"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s["name"] for s in small["shards"]]


def test_jsonl_bad_records_skipped_with_reasons(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (8, 8), "red").save(media / "a.png")
    Image.new("RGB", (8, 8), "blue").save(media / "b.jpeg")
    turn = lambda v: [{"from": "human", "value": v}, {"from": "gpt", "value": "x"}]  # noqa: E731
    lines = [
        json.dumps(
            {"id": "ok1", "image": "a.png", "conversations": turn("<image> hi"), "extra": 1}
        ),
        "{not json",
        json.dumps({"id": "nomark", "image": "a.png", "conversations": turn("hi")}),
        json.dumps({"id": "missing", "image": "zz.png", "conversations": turn("<image>")}),
        json.dumps({"id": "gif", "image": "a.gif", "conversations": turn("<image>")}),
        json.dumps({"id": "noconv", "image": "a.png"}),
        json.dumps(
            {"id": "ok2", "image": ["a.png", "b.jpeg"], "conversations": turn("<image><image>")}
        ),
        json.dumps({"id": "text", "conversations": turn("just text")}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    manifest = make_shards(tmp_path / "data.jsonl", media, tmp_path / "out", progress=False)
    assert manifest["num_records"] == 8 and manifest["num_samples"] == 3
    assert manifest["skipped_by_reason"] == {
        "invalid_record": 2,
        "marker_mismatch": 1,
        "missing_media": 1,
        "unsupported_media": 1,
    }
    assert [s["id"] for s in manifest["skipped"]] == [None, "nomark", "missing", "gif", "noconv"]
    names = [n for n, _ in read_tar(shard_paths(tmp_path / "out")[0])]
    assert names == [
        "000000000.img0.png",
        "000000000.json",
        "000000006.img0.png",
        "000000006.img1.jpeg",
        "000000006.json",
        "000000007.json",
    ]


def test_parse_size():
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_resolve_shards_generates_synthetic_when_none_are_set(tmp_path):
    from pipelines.config import DataConfig, SyntheticSettings
    from pipelines.dataset import resolve_shards

    cfg = DataConfig(
        synthetic_dir=str(tmp_path),
        synthetic=SyntheticSettings(n_train=4, n_test=2, image_size=32),
        progress_bars=False,
    )
    train, test = resolve_shards(cfg, "train"), resolve_shards(cfg, "test")
    assert train == shard_paths(tmp_path / "shards" / "train")
    assert test == shard_paths(tmp_path / "shards" / "test")
    assert resolve_shards(cfg, "train") == train, "idempotent"
    globbed = DataConfig(shards=[str(tmp_path / "shards" / "*" / "*.tar")])
    assert resolve_shards(globbed) == sorted(train + test)
    with pytest.raises(FileNotFoundError):
        resolve_shards(DataConfig(shards=[str(tmp_path / "nothing-*.tar")]))


def test_demo_config_data_section_loads():
    import yaml

    from gazeattn.typed_config import validate
    from pipelines.config import DataConfig

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / "configs" / "demo.yaml").read_text())["data"]
    cfg = validate(DataConfig, data)
    assert cfg.synthetic.n_train == data["synthetic"]["n_train"]


def _shape_in(pixels: np.ndarray, box, rgb) -> str:
    """Which shape is drawn in ``box``: a square fills its top-left corner, a triangle its
    bottom-left one, a circle neither."""
    x0, y0, x1, y1 = box
    if tuple(pixels[y0, x0]) == rgb:
        return "square"
    return "triangle" if tuple(pixels[y1 - 1, x0]) == rgb else "circle"


def test_shape_questions_are_answered_by_the_asked_colours_cell(tmp_path):
    """grid_kinds=("shape",): "what shape is the red one?", answered by the shape drawn in the
    cell of that colour (read from the pixels); the answers cycle through the shapes."""
    paths = generate(tmp_path, n_train=30, n_test=30, image_size=48, video_fraction=0.0,
                     task="grid", grid=3, shape_fill=0.9, grid_kinds=["shape"], seed=5,
                     train_questions=3)  # fmt: skip
    cell = 16
    for split in ("train", "test"):
        answers = Counter()
        for r in json.loads(paths[split].read_text()):
            assert r["task"] == "grid_shape"
            answers[r["conversations"][1]["value"]] += 1
            if not r["image"].endswith(".png"):  # lossless: the colours are exact
                continue
            pixels = np.asarray(Image.open(tmp_path / "media" / r["image"]).convert("RGB"))
            for question, answer in zip(r["conversations"][::2], r["conversations"][1::2],
                                        strict=True):  # fmt: skip
                name = question["value"].removeprefix("<image>\n")
                name = name.removeprefix("What shape is the ").removesuffix(" one?")
                rgb = COLOURS[name]
                ys, xs = np.nonzero(np.all(pixels == rgb, axis=-1))
                row, col = ys.min() // cell, xs.min() // cell
                box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert box[2] <= (col + 1) * cell and box[3] <= (row + 1) * cell, "one cell"
                assert _shape_in(pixels, box, rgb) == answer["value"], (r["id"], name)
        assert set(answers) == {"square", "circle", "triangle"}
        assert max(answers.values()) - min(answers.values()) <= 1, answers


def test_shape_at_questions_never_let_the_place_tell_the_answer(tmp_path):
    """grid_kinds=("shape_at",): "what shape is in the top left?"; over the records every cell
    is asked with every answer equally often, so the place alone predicts nothing."""
    paths = generate(tmp_path, n_train=54, n_test=0, image_size=48, video_fraction=0.0,
                     task="grid", grid=3, shape_fill=0.9, grid_kinds=["shape_at"], seed=6)  # fmt: skip
    pairs = Counter()
    for r in json.loads(paths["train"].read_text()):
        assert r["task"] == "grid_shape_at"
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        where = question.removeprefix("What shape is in the ").removesuffix("?")
        pairs[(where, r["conversations"][1]["value"])] += 1
        if r["image"].endswith(".png"):
            pixels = np.asarray(Image.open(tmp_path / "media" / r["image"]).convert("RGB"))
            x0, y0, x1, y1 = r["target_box"]
            rgb = tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2])
            assert _shape_in(pixels, r["target_box"], rgb) == r["conversations"][1]["value"]
    assert len(pairs) == 27 and set(pairs.values()) == {2}, pairs


def test_the_command_line_is_the_settings(tmp_path, capsys):
    """One flag per SyntheticSettings field, checked there: a bad value names its field."""
    from pipelines.synthetic import main

    main(["--out", str(tmp_path), "--n-train", "2", "--n-test", "1", "--image-size", "48",
          "--grid", "3", "--grid-kinds", "shape_at", "shape", "--no-shard"])  # fmt: skip
    records = json.loads((tmp_path / "train.json").read_text())
    assert len(records) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--grid", "2", "--train-questions", "5"])
    assert "train_questions" in capsys.readouterr().err


def test_question_first_puts_the_question_in_a_turn_before_the_media(tmp_path):
    """question_first: the first question is a user turn of its own before the media's turn
    (so no question token can attend to the image), the same question and answer as without
    it; further turns follow; the processor encodes the question's tokens before the image."""
    from gazeattn.model import load_model
    from pipelines.conversation import to_messages

    fields = dict(n_train=6, n_test=3, image_size=48, video_fraction=0.3, task="grid", grid=3,
                  grid_kinds=["shape"], train_questions=2, seed=7)  # fmt: skip
    plain = generate(tmp_path / "plain", **fields)
    first = generate(tmp_path / "first", question_first=True, **fields)
    for split in ("train", "test"):
        records = json.loads(first[split].read_text())
        for r, p in zip(records, json.loads(plain[split].read_text()), strict=True):
            marker = "<video>" if r.get("video") else "<image>"
            question = p["conversations"][0]["value"].removeprefix(f"{marker}\n")
            assert r["conversations"][:3] == [
                {"from": "human", "value": question},
                {"from": "human", "value": marker},
                p["conversations"][1],
            ]
            assert r["conversations"][3:] == p["conversations"][2:]  # further turns
            assert all(marker not in t["value"] for t in r["conversations"][2:])
            assert {k: v for k, v in r.items() if k != "conversations"} == {
                k: v for k, v in p.items() if k != "conversations"
            }
    model_dir = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-grid3"
    _, processor = load_model(model_dir)
    r = next(r for r in records if r.get("image"))
    image = np.asarray(Image.open(tmp_path / "first" / "media" / r["image"]).convert("RGB"))
    encoded = processor.encode_sample(to_messages(r["conversations"]), [image])
    from evaluation.data import load_json

    assert load_json(first["test"])[0].question == records[0]["conversations"][0]["value"]
    kinds = [type(part).__name__ for part in encoded.parts]
    assert kinds == ["int", "Image", "int"], encoded.parts
    before = encoded.input_ids[: encoded.parts[0]].tolist()
    colour = r["conversations"][0]["value"].removeprefix("What shape is the ").removesuffix(" one?")
    word = processor.tokenizer.encode(f" {colour}", add_special_tokens=False)
    assert any(before[i : i + len(word)] == word for i in range(len(before))), "asked before"


def test_spaced_answers_are_one_token_of_the_tiny_tokenizer(tmp_path):
    """spaced_answers: every answer turn gains a leading space and nothing else changes; the
    tiny tokenizer then writes each shape answer as one token (" square"), where "square"
    is two ("s", "quare") and the second, decided by the first, needs no look."""
    from transformers import AutoTokenizer

    fields = dict(n_train=6, n_test=3, image_size=48, video_fraction=0.3, task="grid", grid=3,
                  grid_kinds=["shape"], train_questions=2, seed=8)  # fmt: skip
    plain = generate(tmp_path / "plain", **fields)
    spaced = generate(tmp_path / "spaced", spaced_answers=True, **fields)
    for split in ("train", "test"):
        for r, p in zip(*(json.loads(x[split].read_text()) for x in (spaced, plain)), strict=True):
            want = [
                {**t, "value": f" {t['value']}"} if t["from"] == "gpt" else t
                for t in p["conversations"]
            ]
            assert r["conversations"] == want
    model_dir = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-grid3"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for shape in ("square", "circle", "triangle"):
        assert len(tokenizer.encode(f" {shape}", add_special_tokens=False)) == 1
        assert len(tokenizer.encode(shape, add_special_tokens=False)) == 2


def test_a_4x4_grid_repeats_colours_but_never_the_asked_one(tmp_path):
    """grid 4 (16 cells, 9 colours): the other cells' colours repeat, the asked colour is in
    one cell only, and the answer is the shape drawn there; its 16 places have 16 names; a
    question naming another cell's colour would be ambiguous, so train_questions is 1."""
    assert len({cell_words(*divmod(c, 4), 4) for c in range(16)}) == 16
    paths = generate(tmp_path, n_train=24, n_test=12, image_size=64, video_fraction=0.0,
                     task="grid", grid=4, shape_fill=0.9, grid_kinds=["shape"], seed=6)  # fmt: skip
    cell, repeated = 16, 0
    for split in ("train", "test"):
        for r in json.loads(paths[split].read_text()):
            if not r["image"].endswith(".png"):  # lossless: the colours are exact
                continue
            pixels = np.asarray(Image.open(tmp_path / "media" / r["image"]).convert("RGB"))
            colours = []
            for row in range(4):
                for col in range(4):
                    block = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
                    found = {tuple(c) for c in block.reshape(-1, 3)} & set(COLOURS.values())
                    assert len(found) == 1, (r["id"], row, col)
                    colours.append(found.pop())
            name = r["conversations"][0]["value"].removeprefix("<image>\n")
            name = name.removeprefix("What shape is the ")
            rgb = COLOURS[name.removesuffix(" one?")]
            assert colours.count(rgb) == 1, r["id"]
            repeated += len(colours) > len(set(colours))
            ys, xs = np.nonzero(np.all(pixels == rgb, axis=-1))
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert _shape_in(pixels, box, rgb) == r["conversations"][1]["value"], r["id"]
    assert repeated, "16 cells of 9 colours repeat some"
    with pytest.raises(ValueError, match="repeats colours"):
        generate(tmp_path / "x", n_train=1, n_test=0, task="grid", grid=4, image_size=64,
                 grid_kinds=["shape"], train_questions=2)  # fmt: skip
