"""Every family against stock transformers, on checkpoints saved in the hub's own layout.

The anchor: with every region kept and no context tokens, the gaze model's logits
equal the stock model's on the stock processor's inputs. Then: cached decoding
equals a full forward pass, generate works with beams and several return
sequences and never samples a placeholder, saved gaze checkpoints reload through
the Auto classes, labels come from the model's own chat template.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)

from gazeattn import load_model
from gazeattn.generation import GazeCache, GenerationRequest, generate_batch
from gazeattn.model import UnsupportedModel, convert_to_gaze, is_gaze_model
from gazeattn.ops import GazeConfig, Image, TokenKind, Video
from gazeattn.processing import GazeProcessor, ProcessorInputError
from gazeattn.tiny import build_stock
from tests.model.conftest import FAMILIES, image_chat, random_image

FP32 = dict(atol=1e-5, rtol=1e-5)
EXACT = dict(atol=1e-6, rtol=1e-6)
QWEN = ("qwen2.5-vl", "qwen2-vl")


def _frames(seed: int, n: int = 4, size=(48, 64)) -> list[np.ndarray]:
    return [random_image(seed + i, size) for i in range(n)]


def _stock_processor(family: str, path):
    """The stock processor, as transformers builds it; Qwen's without its video processor
    (which needs torchvision): the stock class's own image path, called unchanged."""
    if family not in QWEN:
        return AutoProcessor.from_pretrained(path)
    cls = Qwen2_5_VLProcessor if family == "qwen2.5-vl" else Qwen2VLProcessor
    proc = object.__new__(cls)
    proc.image_processor = AutoImageProcessor.from_pretrained(path)
    proc.tokenizer = AutoTokenizer.from_pretrained(path)
    proc.chat_template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = proc.tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


def _mm_types(model, ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    return (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()


def _stock_logits(stock, family, batch) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", *stock_inputs(family))
    inputs = {k: batch[k] for k in keys if k in batch}
    if family in QWEN:
        inputs["mm_token_type_ids"] = _mm_types(stock, batch["input_ids"])
    with torch.no_grad():
        return stock(**inputs).logits


def stock_inputs(family: str) -> tuple[str, ...]:
    if family in QWEN:
        return ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts")  # fmt: skip
    return ("pixel_values",)


def _off(backend: str) -> GazeConfig:
    return GazeConfig(top_k="all", num_context_tokens=0, backend=backend)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_inputs_equal_the_stock_processors(stock_dirs, family):
    stock = _stock_processor(family, stock_dirs[family])
    _, processor = load_model(stock_dirs[family], gaze=_off("dense"))
    images = [random_image(0, (40, 90)), random_image(1, (70, 30))]
    messages = image_chat(n_images=2, answer=None)
    prompt = processor.render(messages, add_generation_prompt=True)
    if family not in QWEN:
        assert prompt == stock.apply_chat_template(messages, add_generation_prompt=True)
    expect = stock(images=images, text=[prompt], return_tensors="pt")
    got = processor(images=images, text=[prompt])
    assert torch.equal(got["input_ids"], expect["input_ids"])
    for key in stock_inputs(family):
        if key in expect:
            torch.testing.assert_close(got[key], expect[key], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["dense", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_region_and_no_context_equals_the_stock_model(stock_dirs, family, backend):
    stock, _ = load_model(stock_dirs[family])
    assert not is_gaze_model(stock)
    model, processor = load_model(stock_dirs[family], gaze=_off(backend))
    assert is_gaze_model(model)
    samples = [
        # a non-square image, two images, a video, and a text-only row in one padded batch
        processor.encode_sample(image_chat(), images=[random_image(0, (40, 90))]),
        processor.encode_sample(
            image_chat(n_images=2), images=[random_image(1, (90, 40)), random_image(2)]
        ),
        processor.encode_sample(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "a?"}]}],
            videos=[_frames(3)],
        ),
    ]
    batch = processor.collate(samples, padding_side="right")
    expect = _stock_logits(stock, family, batch)
    with torch.no_grad():
        got = model(**batch).logits[..., : expect.shape[-1]]
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expect[valid], **(EXACT if backend == "dense" else FP32))


def test_clip_cls_and_feature_layer_lists_keep_parity(tmp_path):
    """CLIP with "full" keeps the CLS token (laid out before the grid); a list of feature layers."""
    path = build_stock(
        tmp_path / "clip-full", family="llava-1.5", strategy="full", feature_layer=[-2, -1]
    )
    stock, _ = load_model(path)
    model, processor = load_model(path, gaze=_off("reference"))
    image = random_image(4, (60, 30))
    sample = processor.encode_sample(image_chat(), images=[image])
    assert Image(12, 12, lead=1) in sample.parts
    batch = processor.collate([sample])
    expect = _stock_logits(stock, "llava-1.5", batch)
    with torch.no_grad():
        got = model(**batch).logits[..., : expect.shape[-1]]
    torch.testing.assert_close(got, expect, **FP32)
    prompt = processor.render(image_chat(answer=None), add_generation_prompt=True)
    stock_ids = AutoProcessor.from_pretrained(path)(
        images=[image], text=prompt, return_tensors="pt"
    )["input_ids"]
    assert torch.equal(processor(images=[image], text=prompt)["input_ids"], stock_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    sample = processor.encode_sample(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "video"},
                    {"type": "text", "text": "where?"},
                ],
            }
        ],
        images=[random_image(5, (50, 80))],
        videos=[_frames(6)],
        add_generation_prompt=True,
    )
    batch = processor.collate([sample])
    batch.pop("labels")
    cache = GazeCache()
    tokens = []
    with torch.no_grad():
        out = model(**batch, cache=cache, use_cache=True)
        for _ in range(4):
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


def _prompt(processor, family):
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
def test_generate_with_beams_and_several_sequences(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    inputs = _prompt(processor, family)
    n = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, cache=GazeCache(), max_new_tokens=4, do_sample=False)
    ours = generate_batch(
        model,
        processor,
        [
            GenerationRequest(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "what?"}],
                    }
                ],
                images=[random_image(7, (44, 70))],
                max_new_tokens=4,
            )
        ],
    )[0]
    assert greedy[0, n:].tolist()[: len(ours.token_ids)] == ours.token_ids
    beams = model.generate(
        **inputs, cache=GazeCache(), max_new_tokens=4, num_beams=2, num_return_sequences=2
    )
    sampled = model.generate(
        **inputs, cache=GazeCache(), max_new_tokens=4, do_sample=True, num_return_sequences=2
    )
    assert beams.shape[0] == 2 and sampled.shape[0] == 2
    assert len(processor.batch_decode(beams[:, n:])) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholders_are_never_generated(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    banned = processor.placeholder_ids
    assert processor.context_token_id in banned and processor.image_token_id in banned
    # make every placeholder the most likely next token
    with torch.no_grad():
        model.lm_head.weight[banned] = 50.0 * model.lm_head.weight.abs().max()
    inputs = _prompt(processor, family)
    n = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, cache=GazeCache(), max_new_tokens=4, do_sample=False)
    assert not set(out[0, n:].tolist()) & set(banned)
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert not set(generate_batch(model, processor, [request])[0].token_ids) & set(banned)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_gaze_checkpoints_reload_through_the_auto_classes(gaze_dirs, family):
    model, processor = load_model(gaze_dirs[family])
    auto = AutoModelForImageTextToText.from_pretrained(gaze_dirs[family])
    auto_processor = AutoProcessor.from_pretrained(gaze_dirs[family])
    assert type(auto) is type(model) and isinstance(auto_processor, GazeProcessor)
    assert auto_processor.gaze_config == processor.gaze_config == model.gaze_config
    inputs = _prompt(auto_processor, family)
    with torch.no_grad():
        torch.testing.assert_close(auto(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    files = {p.name for p in gaze_dirs[family].iterdir()}
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert "preprocessor_config.json" in files or "processor_config.json" in files


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_chat_template_gives_pixels_tokens_and_layout(gaze_dirs, family):
    _, processor = load_model(gaze_dirs[family])
    inputs = _prompt(processor, family)
    layout = inputs["gaze_layout"]
    ids = inputs["input_ids"]
    assert inputs["pixel_values"].shape[0] > 0
    assert torch.equal(layout.kinds == TokenKind.CONTEXT, ids == processor.context_token_id)
    visual = (layout.kinds == TokenKind.VISUAL).sum()
    t, h, w = layout.spans[0][0].grid
    assert int(visual) == t * h * w and int((ids == processor.image_token_id).sum()) >= visual


@pytest.mark.parametrize(
    "family,turn_end",
    [("llava", "<|im_end|>"), ("llava-1.5", "</s>"), ("qwen2.5-vl", "<|im_end|>")],
)
def test_labels_are_assistant_turns_ending_with_the_end_of_turn(gaze_dirs, family, turn_end):
    _, processor = load_model(gaze_dirs[family])
    messages = [
        *image_chat(answer="red circle"),
        {"role": "user", "content": "and the square?"},
        {"role": "assistant", "content": "blue"},
    ]
    sample = processor.encode_sample(messages, images=[random_image(0)])
    labelled = sample.labels != -100
    text = processor.tokenizer.decode(sample.input_ids[labelled])
    assert text.replace(" ", "") == f"redcircle{turn_end}blue{turn_end}"
    assert (sample.labels[labelled] == sample.input_ids[labelled]).all()
    assert processor.tokenizer.convert_tokens_to_ids(turn_end) in processor.stop_token_ids


def test_hub_ids_resolve_through_the_hf_cache(stock_dirs, tmp_path, monkeypatch):
    import shutil

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llava" / "snapshots" / "0123abcd"
    shutil.copytree(stock_dirs["llava-1.5"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model, processor = load_model(
        "tiny-org/tiny-llava", gaze=GazeConfig(top_k=2), cache_dir=str(tmp_path / "hub")
    )
    assert is_gaze_model(model) and processor.family == "llava"


def test_embeddings_grow_to_a_multiple_of_64_when_the_vocabulary_is_full(stock_dirs):
    stock, _ = load_model(stock_dirs["llava"])
    rows = stock.get_input_embeddings().weight.shape[0]
    model, processor = load_model(stock_dirs["llava"], gaze=GazeConfig(top_k=2))
    grown = model.get_input_embeddings().weight
    assert len(processor.tokenizer) > rows and grown.shape[0] % 64 == 0
    assert grown.shape[0] >= len(processor.tokenizer) == rows + 1
    assert model.config.text_config.vocab_size == grown.shape[0]
    torch.testing.assert_close(grown[:rows], stock.get_input_embeddings().weight)
    # mean resizing: the new rows sit near the old ones' mean, not at zero or far away
    new = grown[rows:]
    assert (new - grown[:rows].mean(0)).norm(dim=-1).max() < 3 * grown[:rows].std(0).norm()


def test_conversion_needs_no_resize_when_the_vocabulary_has_spare_rows(tmp_path):
    path = build_stock(tmp_path / "spare", family="qwen2.5-vl")
    stock, processor = load_model(path)
    stock.resize_token_embeddings(640)
    model, processor = convert_to_gaze(stock, processor, GazeConfig(top_k=2))
    assert model.get_input_embeddings().weight.shape[0] == 640


def test_tiny_init_range_sets_the_decoders_weight_scale(tmp_path):
    """The demo's tiny model starts its decoder at init_range 0.1 (not transformers' 0.02)."""
    stds = {}
    for init in (0.02, 0.1):
        path = build_stock(tmp_path / str(init), init_range=init)
        model, _ = load_model(path)
        assert model.config.text_config.initializer_range == init
        stds[init] = model.model.language_model.layers[0].self_attn.q_proj.weight.std().item()
    assert abs(stds[0.02] - 0.02) < 0.005 and abs(stds[0.1] - 0.1) < 0.02, stds


def test_refused_architectures_name_the_supported_ones(tmp_path):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    small = dict(
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=128),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8),
    )  # fmt: skip
    for cfg_cls, model_cls in (
        (LlavaNextConfig, LlavaNextForConditionalGeneration),
        (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
    ):
        out = tmp_path / cfg_cls.model_type
        model_cls(cfg_cls(**small, image_token_index=127)).save_pretrained(out)
        with pytest.raises(UnsupportedModel, match="Qwen2_5_VLForConditionalGeneration"):
            load_model(out, gaze=GazeConfig(top_k=2))


def test_bad_inputs_get_clear_errors(gaze_dirs, stock_dirs, tmp_path):
    with pytest.raises(ValueError, match="context tokens cannot change"):
        load_model(gaze_dirs["llava"], gaze=GazeConfig(top_k=2, num_context_tokens=2))
    _, processor = load_model(gaze_dirs["qwen2.5-vl"])
    with pytest.raises(ProcessorInputError, match="cannot read the image"):
        processor.encode_sample(image_chat(), images=[str(tmp_path / "missing.png")])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ProcessorInputError, match="cannot read the image"):
        processor.encode_sample(image_chat(), images=[str(tmp_path / "broken.png")])
    with pytest.raises(ProcessorInputError, match="media tokens"):
        processor.encode_sample([{"role": "user", "content": "look <|vision_start|> here"}])
    # a tokenizer without the image token the checkpoint's processor names
    import shutil

    broken = tmp_path / "no-image-token"
    shutil.copytree(stock_dirs["llava"], broken)
    settings = json.loads((broken / "processor_config.json").read_text())
    settings["image_token"] = "<picture>"
    (broken / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ProcessorInputError, match="no image token '<picture>'"):
        load_model(broken)


def test_video_paths_are_read_with_the_budget(gaze_dirs, tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_image(PILImage.fromarray(random_image(i, (48, 64))))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    _, processor = load_model(gaze_dirs["llava"])
    sample = processor.encode_sample(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "a?"}]}],
        videos=[str(path)],
    )
    frames = processor.visual_budget.frames_per_video
    assert Video(frames, 12, 12) in sample.parts
    assert sample.vision["pixel_values"].shape[0] == frames
