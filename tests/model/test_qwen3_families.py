"""Qwen3-VL and Qwen3.5 (dense and MoE) against stock transformers, on tiny checkpoints
saved in the hub's layout.

The stock video processor needs torchvision, which these machines lack; the stock
processor here is transformers' ``Qwen3VLProcessor`` itself (its prompt expansion,
timestamps and ``mm_token_type_ids``) over a stand-in video processor built from the
stock ``sample_frames`` and ``patchify`` (with a PIL resize where the stock one is
torchvision's).
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    Qwen3VLVideoProcessor,
    smart_resize,
)
from transformers.video_utils import VideoMetadata

from gazeattn import load_model
from gazeattn.families import UnsupportedModel, media
from gazeattn.families.media import Qwen3VLRules, timestamps
from gazeattn.generation import GazeCache, GenerationRequest, generate_batch
from gazeattn.model import is_gaze_model
from gazeattn.ops import GazeConfig, TokenKind
from gazeattn.tiny import build_stock, build_tiny
from gazeattn.video import Clip
from tests.model.conftest import image_chat, random_image

FAMILIES = ("qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe")
FP32 = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(atol=1e-6, rtol=1e-6)
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@pytest.fixture(scope="module")
def stock_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-stock")
    return {f: build_stock(root / f, family=f) for f in FAMILIES}


@pytest.fixture(scope="module")
def gaze_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-gaze")
    config = GazeConfig(keep_ratio=0.3, num_context_tokens=4)
    return {f: build_tiny(root / f, family=f, gaze_config=config) for f in FAMILIES}


def _off(backend: str = "dense") -> GazeConfig:
    return GazeConfig(top_k="all", num_context_tokens=0, backend=backend)


def _frames(seed: int, n: int = 8, size=(48, 64)) -> list[np.ndarray]:
    return [random_image(seed + i, size) for i in range(n)]


class StandInVideoProcessor:
    """The stock Qwen3-VL video pipeline minus torchvision: the stock ``sample_frames`` and
    ``smart_resize``, a PIL bicubic resize, the stock rescale/normalise arithmetic and
    ``patchify``; returns the metadata the stock processor places timestamps from."""

    def __init__(self, path):
        self.settings = json.loads((path / "video_preprocessor_config.json").read_text())
        self.merge_size = self.settings["merge_size"]
        self.temporal_patch_size = self.settings["temporal_patch_size"]

    def __call__(self, videos, video_metadata=None, **kwargs):
        s = self.settings
        sampler = SimpleNamespace(
            fps=s["fps"], min_frames=s["min_frames"], max_frames=s["max_frames"]
        )
        videos = [videos] if isinstance(videos[0], np.ndarray) and videos[0].ndim == 3 else videos
        metadata = video_metadata or [None] * len(videos)
        pixels, grids, metas = [], [], []
        for frames, meta in zip(videos, metadata, strict=True):
            info = VideoMetadata(
                total_num_frames=len(frames),
                fps=(meta or {}).get("fps"),
                frames_indices=list(range(len(frames))),
            )
            with _quiet():
                indices = Qwen3VLVideoProcessor.sample_frames(sampler, info)
            info.frames_indices = indices
            chosen = [frames[i] for i in indices]
            factor = s["patch_size"] * s["merge_size"]
            h, w = smart_resize(
                len(chosen), *chosen[0].shape[:2], temporal_factor=2, factor=factor,
                min_pixels=s["size"]["shortest_edge"], max_pixels=s["size"]["longest_edge"],
            )  # fmt: skip
            resized = [
                np.asarray(PILImage.fromarray(f).resize((w, h), PILImage.Resampling.BICUBIC))
                for f in chosen
            ]
            video = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float()
            video = (video / 255.0 - 0.5) / 0.5
            flat, gt, gh, gw = Qwen3VLVideoProcessor.patchify(
                None, video[None], s["patch_size"], s["merge_size"], s["temporal_patch_size"]
            )
            pixels.append(flat[0])
            grids.append([gt, gh, gw])
            metas.append(info)
        return BatchFeature(
            {
                "pixel_values_videos": torch.cat(pixels),
                "video_grid_thw": torch.tensor(grids),
                "video_metadata": metas,
            }
        )


class _quiet:
    def __enter__(self):
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)


def stock_processor(path) -> Qwen3VLProcessor:
    """transformers' Qwen3VLProcessor over the checkpoint's files and the stand-in videos."""
    proc = object.__new__(Qwen3VLProcessor)
    proc.image_processor = AutoImageProcessor.from_pretrained(path)
    proc.tokenizer = AutoTokenizer.from_pretrained(path)
    proc.video_processor = StandInVideoProcessor(path)
    proc.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    for name in ("image", "video", "vision_start", "vision_end"):
        token = getattr(proc, f"{name}_token")
        setattr(proc, f"{name}_token_id", proc.tokenizer.convert_tokens_to_ids(token))
    return proc


VIDEO_CHAT = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "when?"}]}]


def _rows():
    """(messages, images, videos as given to the stock processor, videos as ours, metadata)."""
    video = _frames(3)
    return [
        (image_chat(answer=None), [random_image(0, (40, 90))], [], [], None),
        (
            image_chat(n_images=2, answer=None),
            [random_image(1, (90, 40)), random_image(2)],
            [],
            [],
            None,
        ),
        (VIDEO_CHAT, [], [video], [Clip(frames=video, fps=4.0)], [{"fps": 4.0}]),
        ([{"role": "user", "content": "only text"}], [], [], [], None),
    ]


def _stock_row(stock, messages, images, videos, metadata):
    prompt = stock.apply_chat_template(messages, add_generation_prompt=True)
    kwargs = {"images": images or None, "videos": videos or None}
    if metadata:
        kwargs["video_metadata"] = metadata
    return stock(text=[prompt], return_tensors="pt", **kwargs), prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_inputs_equal_the_stock_processors(stock_dirs, family):
    """Ids (timestamps and vision markers included), pixels and grids of every kind of row."""
    stock = stock_processor(stock_dirs[family])
    _, processor = load_model(stock_dirs[family], gaze=_off())
    for messages, images, videos, clips, metadata in _rows():
        expect, prompt = _stock_row(stock, messages, images, videos, metadata)
        assert processor.render(messages, add_generation_prompt=True) == prompt
        got = processor(text=[prompt], images=images or None, videos=clips or None)
        assert torch.equal(got["input_ids"], expect["input_ids"]), prompt
        for key in VISION_KEYS:
            assert (key in got) == (key in expect), key
            if key in expect:
                torch.testing.assert_close(got[key], expect[key], atol=0, rtol=0)
    # the video row: 8 frames at 4 fps sampled at 2 fps (frames 0, 2, 5, 7), 2 patches
    _, _, _, clips, _ = _rows()[2]
    prompt = processor.render(VIDEO_CHAT, add_generation_prompt=True)
    text = processor.tokenizer.decode(processor(text=[prompt], videos=clips)["input_ids"][0])
    patch = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    expect = f"<|vision_start|><0.2 seconds>{patch}<1.5 seconds>{patch}<|vision_end|>when?"
    assert expect in text


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_region_and_no_context_equals_the_stock_model(stock_dirs, family, backend):
    """A non-square image, two images, a timestamped video and a text-only row in one padded
    batch: the gaze logits equal the stock model's on the stock processor's inputs."""
    path = stock_dirs[family]
    stock_model, _ = load_model(path)
    model, processor = load_model(path, gaze=_off(backend))
    assert is_gaze_model(model) and not is_gaze_model(stock_model)
    stock = stock_processor(path)
    samples, expected = [], []
    for messages, images, videos, clips, metadata in _rows():
        inputs, _ = _stock_row(stock, messages, images, videos, metadata)
        assert "mm_token_type_ids" in inputs
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", *VISION_KEYS)
        with torch.no_grad():
            expected.append(stock_model(**{k: inputs[k] for k in keys if k in inputs}).logits[0])
        samples.append(
            processor.encode_sample(
                messages, images=images, videos=clips, add_generation_prompt=True
            )
        )
    batch = processor.collate(samples, padding_side="right")
    batch.pop("labels")
    with torch.no_grad():
        got = model(**batch).logits
    worst = 0.0
    for row, expect in enumerate(expected):
        ours = got[row, : expect.shape[0], : expect.shape[-1]]
        torch.testing.assert_close(ours, expect, **(EXACT if backend == "dense" else FP32))
        worst = max(worst, float((ours - expect).abs().max()))
    print(f"{family} {backend}: max |logit difference| {worst:.3g}")


def _video_prompt(processor):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "where?"}],
        }
    ]
    # 8 frames at 2 fps: every frame kept, 4 temporal patches at 0.25, 1.25, 2.25, 3.25 s
    clip = Clip(frames=_frames(6, n=8), fps=2.0)
    return messages, [random_image(5, (50, 80))], [clip]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    messages, images, videos = _video_prompt(processor)
    sample = processor.encode_sample(
        messages, images=images, videos=videos, add_generation_prompt=True
    )
    batch = processor.collate([sample])
    batch.pop("labels")
    cache, tokens = GazeCache(), []
    with torch.no_grad():
        out = model(**batch, cache=cache, use_cache=True)
        for _ in range(3):
            tokens.append(int(out.logits[0, -1].argmax()))
            full_batch = processor.collate([sample.followed_by(tokens)])
            full_batch.pop("labels")
            full = model(**full_batch).logits[0, -1]
            mask = torch.ones(1, len(sample.input_ids) + len(tokens), dtype=torch.long)
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                attention_mask=mask,
                cache=cache,
                use_cache=True,
                gaze_layout=batch["gaze_layout"],
            )
            torch.testing.assert_close(out.logits[0, -1], full, **FP32)


def _inputs(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(7, (44, 70))},
                {"type": "text", "text": "what?"},
            ],
        }
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_beams_and_greedy_equals_generate_batch(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    inputs = _inputs(processor)
    n = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, cache=GazeCache(), max_new_tokens=4, do_sample=False)
    request = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
        images=[random_image(7, (44, 70))],
        max_new_tokens=4,
    )  # fmt: skip
    ours = generate_batch(model, processor, [request])[0]
    assert greedy[0, n:].tolist()[: len(ours.token_ids)] == ours.token_ids
    beams = model.generate(
        **inputs, cache=GazeCache(), max_new_tokens=4, num_beams=2, num_return_sequences=2
    )
    assert beams.shape[0] == 2 and len(processor.batch_decode(beams[:, n:])) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_gaze_checkpoints_reload_through_the_auto_classes(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    auto = AutoModelForImageTextToText.from_pretrained(gaze_dirs[family])
    auto_processor = AutoProcessor.from_pretrained(gaze_dirs[family])
    assert type(auto) is type(model) and auto_processor.family == processor.family
    messages, images, videos = _video_prompt(processor)
    sample = auto_processor.encode_sample(messages, images=images, videos=videos)
    batch = auto_processor.collate([sample])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch).logits, model(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3-vl-moe"])
def test_deepstack_reaches_the_visual_tokens_only(gaze_dirs, family, monkeypatch):
    """The decision: context tokens receive nothing from DeepStack; every image and video
    token receives its own features, in sequence order, after the first decoder layers."""
    model, processor = load_model(gaze_dirs[family])
    messages, images, videos = _video_prompt(processor)
    batch = processor.collate([processor.encode_sample(messages, images=images, videos=videos)])
    batch.pop("labels")
    seen = []
    decoder = model.model.language_model
    original = decoder._deepstack_process

    def record(hidden, mask, embeds):
        seen.append((mask.clone(), embeds.clone()))
        return original(hidden, mask, embeds)

    monkeypatch.setattr(decoder, "_deepstack_process", record)
    with torch.no_grad():
        model(**batch)
        tower = model.model.get_image_features(
            torch.cat([batch["pixel_values"], batch["pixel_values_videos"]]),
            torch.cat([batch["image_grid_thw"], batch["video_grid_thw"]]),
            return_dict=True,
        ).deepstack_features
    layout = batch["gaze_layout"]
    assert len(seen) == len(model.config.vision_config.deepstack_visual_indexes)
    ctx = layout.kinds == TokenKind.CONTEXT
    assert int(ctx.sum()) > 0
    for (mask, embeds), layer in zip(seen, tower, strict=True):
        assert torch.equal(mask, layout.kinds == TokenKind.VISUAL)
        assert not bool((mask & ctx).any())
        # the image comes first in the prompt, then the video
        torch.testing.assert_close(embeds, torch.cat(list(layer)), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_positions_follow_the_qwen25_rule(gaze_dirs, family):
    """Context tokens are numbered like text right after their span (the Qwen2.5-VL rule):
    the stock ``get_rope_index`` on the same ids, the context tokens taken as text, gives
    the gaze model's positions, timestamps between temporal patches included."""
    model, processor = load_model(gaze_dirs[family])
    messages, images, videos = _video_prompt(processor)
    sample = processor.encode_sample(messages, images=images, videos=videos)
    batch = processor.collate([sample, processor.encode_sample(image_chat(), images=images)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = (ids == model.config.image_token_id).int() + 2 * (ids == model.config.video_token_id)
    expect, deltas = model.model.get_rope_index(
        ids,
        mm_token_type_ids=types,
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=mask,
    )
    state = SimpleNamespace(layout=batch["gaze_layout"], rope_deltas=None)
    got = model._positions(ids, mask, None, None, state, {})
    valid = mask.bool()
    assert torch.equal(got[:, valid], expect[:, valid])
    assert torch.equal(state.rope_deltas, deltas)
    ctx = batch["gaze_layout"].kinds == TokenKind.CONTEXT
    # each temporal patch of the video is a segment, its own span, with its own context
    spans = batch["gaze_layout"].spans[0]
    assert [s.grid[0] for s in spans] == [1] * 5 and [s.is_video for s in spans] == [False] + [
        True
    ] * 4
    assert int(ctx[0].sum()) == 4 * len(spans)


@pytest.mark.parametrize("family", ["qwen3.5", "qwen3.5-moe"])
def test_hybrid_decoder_routes_only_in_full_attention_layers(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    types = model.config.text_config.layer_types
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    assert types.count("linear_attention") == 3 * len(full)
    messages, images, videos = _video_prompt(processor)
    batch = processor.collate([processor.encode_sample(messages, images=images, videos=videos)])
    batch.pop("labels")
    cache = GazeCache()
    with torch.no_grad():
        out = model(**batch, cache=cache, use_cache=True, gaze_report=True)
    # KV savings and routing are reported by the full-attention layers only
    assert sorted(out.gaze_report) == full
    assert all(r.attended_mean < r.dense_mean for r in out.gaze_report.values())
    # transformers' hybrid cache: recurrent state in linear layers, keys in full ones
    assert cache.is_linear == [t == "linear_attention" for t in types]
    assert all(
        cache.layers[i].recurrent_states[0] is not None for i in range(len(types)) if i not in full
    )
    assert cache.get_seq_length() == batch["input_ids"].shape[1]
    assert sorted(cache.gaze_state.descriptors) == full
    with pytest.raises(ValueError, match="linear-attention layers"):
        model.config.gaze_layers = [0]
        type(model)(model.config)


def test_frame_sampling_and_timestamps_follow_the_stock_rules():
    stock = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    rules = Qwen3VLRules.__new__(Qwen3VLRules)
    rules.vision = {"do_sample_frames": True, "fps": 2, "num_frames": None, "min_frames": 4,
                    "max_frames": 768, "temporal_patch_size": 2}  # fmt: skip
    for total, fps in [(8, 4.0), (8, 24.0), (100, 30.0), (3, 1.0), (61, 29.97), (400, 10.0)]:
        meta = VideoMetadata(total_num_frames=total, fps=fps)
        expect = Qwen3VLVideoProcessor.sample_frames(stock, meta)
        got = rules.frame_indices(total, fps)
        assert got.tolist() == expect.tolist(), (total, fps)
        stamps = Qwen3VLProcessor._calculate_timestamps(None, got, fps, 2)
        assert timestamps(got, fps, 2) == stamps


def test_a_video_without_fps_takes_the_stock_default_and_says_so_once(stock_dirs, caplog):
    path = stock_dirs["qwen3-vl"]
    _, processor = load_model(path, gaze=_off())
    stock = stock_processor(path)
    frames = _frames(11, n=30)
    media.Qwen3VLRules._warned_fps = False
    with caplog.at_level(logging.WARNING, logger="gazeattn.families.media"):
        prompt = stock.apply_chat_template(VIDEO_CHAT, add_generation_prompt=True)
        got = processor(text=[prompt, prompt], videos=[frames, frames])
    warned = [r for r in caplog.records if "without fps" in r.getMessage()]
    assert len(warned) == 1 and "24" in warned[0].getMessage()
    with _quiet():
        expect = stock(text=[prompt], videos=[frames], return_tensors="pt")
    assert torch.equal(got["input_ids"][0], expect["input_ids"][0])
    # 30 frames at the default 24 fps sampled at 2 fps: 2 frames -> min_frames 4 -> 2 patches
    assert int(expect["video_grid_thw"][0, 0]) == 2


def test_unknown_structures_are_refused_by_name(tmp_path):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    path = build_stock(tmp_path / "q35", family="qwen3.5")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["layer_types"][0] = "sliding_attention"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="sliding_attention"):
        load_model(path, gaze=GazeConfig(top_k=2))
    path = build_stock(tmp_path / "q3", family="qwen3-vl")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["deepstack_visual_indexes"] = [0, 5]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="deepstack_visual_indexes"):
        load_model(path, gaze=GazeConfig(top_k=2))
    small = dict(
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=128),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8),
    )  # fmt: skip
    out = tmp_path / "next"
    LlavaNextForConditionalGeneration(
        LlavaNextConfig(**small, image_token_index=127)
    ).save_pretrained(out)
    with pytest.raises(UnsupportedModel) as refused:
        load_model(out, gaze=GazeConfig(top_k=2))
    for name in ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                 "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):  # fmt: skip
        assert name in str(refused.value)


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3.5"])
def test_a_padded_batch_generates_as_each_prompt_alone(gaze_dirs, family):
    """Left padding: the linear-attention layers' recurrent state starts clean in every row."""
    model, processor = load_model(gaze_dirs[family])
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
            images=[random_image(7, (44, 70))],
            max_new_tokens=4,
        ),
        GenerationRequest(
            messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "which frame has the star?"}]}],
            videos=[Clip(frames=_frames(20, n=4), fps=2.0)],
            max_new_tokens=4,
        ),
    ]  # fmt: skip
    together = generate_batch(model, processor, requests)
    for request, result in zip(requests, together, strict=True):
        (alone,) = generate_batch(model, processor, [request])
        assert result.token_ids == alone.token_ids


def test_a_video_file_is_timestamped_from_its_frame_rate(stock_dirs, tmp_path):
    """A path is read with its stream's fps; its frames_per_video frames, spread over the
    clip, keep their indices (the stock do_sample_frames=False with metadata)."""
    from gazeattn.processing import VisualBudget
    from gazeattn.video import read_clip
    from pipelines.synthetic import write_mp4

    path = tmp_path / "clip.mp4"
    path.write_bytes(write_mp4(_frames(30, n=12, size=(48, 64)), fps=4))
    clip = read_clip(str(path), 4)
    assert clip.fps == 4.0 and clip.indices == (1, 4, 7, 10)
    _, processor = load_model(stock_dirs["qwen3-vl"], gaze=_off())
    processor.with_budget(VisualBudget(frames_per_video=4))
    prompt = processor.render(VIDEO_CHAT, add_generation_prompt=True)
    text = processor.tokenizer.decode(processor(text=[prompt], videos=[str(path)])["input_ids"][0])
    stamps = Qwen3VLProcessor._calculate_timestamps(None, list(clip.indices), 4.0, 2)
    assert [f"{t:.1f}" for t in stamps] == ["0.6", "2.1"]
    assert "<0.6 seconds><|vision_start|>" in text and "<2.1 seconds><|vision_start|>" in text


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3.5"])
def test_labels_are_assistant_turns_after_a_video(gaze_dirs, family):
    _, processor = load_model(gaze_dirs[family])
    messages = [*VIDEO_CHAT, {"role": "assistant", "content": "at one second"}]
    sample = processor.encode_sample(messages, videos=[Clip(frames=_frames(40, n=4), fps=2.0)])
    labelled = sample.labels != -100
    assert processor.tokenizer.decode(sample.input_ids[labelled]) == "at one second<|im_end|>"
    # the timestamps are prompt text: never trained on
    text = processor.tokenizer.decode(sample.input_ids)
    assert "<0.2 seconds>" in text and "<1.2 seconds>" in text
