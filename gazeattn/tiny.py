"""Tiny random vision-language checkpoints in the hub's own layout, built offline.

    python -m gazeattn.tiny --out DIR [--family llava|llava-1.5|qwen2.5-vl|qwen2-vl|qwen3-vl|...] [--stock]

Each family is saved the way its hub checkpoints ship: transformers' own config
and model classes, the family's own image processor, tokenizer class and chat
template (``llava``: SigLIP + Qwen2 with a ChatML template, like
llava-interleave-qwen; ``llava-1.5``: CLIP with its CLS token + Llama, the
USER/ASSISTANT template; ``qwen2.5-vl`` / ``qwen2-vl``: dynamic resolution,
2x2 merger, M-RoPE; ``qwen3-vl`` / ``qwen3-vl-moe``: 16 px patches, DeepStack,
interleaved M-RoPE, timestamped videos; ``qwen3.5`` / ``qwen3.5-moe``: the same vision
side and a hybrid decoder of three linear-attention layers to one full-attention
layer). Nothing is downloaded: tokenizers are BPEs trained on a
small built-in corpus and weights are random (seeded). A gaze model is the
stock checkpoint converted by ``gazeattn.load_model(stock, gaze=...)``, the path
a user's hub checkpoint takes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from gazeattn.ops import GazeConfig

FAMILIES = (
    "llava", "llava-1.5", "qwen2.5-vl", "qwen2-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5",
    "qwen3.5-moe",
)  # fmt: skip
QWEN3 = ("qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe")

CHATML_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's template (it renders no video and no end of turn)
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2.5-VL-*-Instruct's template
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

_WORDS = (
    "the a an is are of in on at to what which where color colour shape object frame video image "
    "red green blue yellow purple orange white black gray cyan magenta pink brown "
    "circle square triangle star disk box ring cross left right top bottom center middle corner "
    "upper lower first second third last appears appear does when there how many one two three four "
    "five six seven eight nine ten zero yes no answer question describe picture scene small large "
    "system user assistant you helpful look see where which frame number"
).split()


def _corpus() -> list[str]:
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    corpus += [f"{a} {b}?" for a in _WORDS[:40] for b in _WORDS[40:80]]
    corpus += ["USER: what is it? ASSISTANT: the answer", "<image>\nA picture."]
    return corpus + [str(n) for n in range(200)]


def _train_bpe(pre_tokenizer, vocab_size: int, specials: list[str], alphabet: list[str]):
    """(vocab, merges) of a BPE trained on the built-in corpus."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def chatml_tokenizer(vocab_size: int = 512):
    """A Qwen2-style byte-level BPE with ChatML turns and an ``<image>`` token (llava-interleave-qwen)."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    vocab, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        vocab_size,
        specials,
        pre_tokenizers.ByteLevel.alphabet(),
    )
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = CHATML_LLAVA_TEMPLATE
    return tok


def llama_tokenizer(vocab_size: int = 512):
    """A Llama-style SentencePiece BPE (``<s>`` added, no ChatML tokens) with ``<image>`` and ``<pad>``."""
    from transformers import LlamaTokenizer

    # printable ASCII and newline as pieces, every other byte through <0xNN> fallback, as in Llama
    alphabet = [chr(i) for i in range(33, 127)] + ["\n", "\u2581"]
    vocab, merges = _train_bpe(
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
        vocab_size,
        ["<unk>", "<s>", "</s>"],
        alphabet,
    )
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tok.chat_template = LLAVA15_TEMPLATE
    return tok


def qwen_vl_tokenizer(vocab_size: int = 512):
    """A Qwen2-VL-style tokenizer: byte-level BPE with Qwen's special tokens (vision start/end/pads)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        vocab_size,
        QWEN_VL_SPECIALS,
        pre_tokenizers.ByteLevel.alphabet(),
    )
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIALS[1:]})
    tok.chat_template = QWEN_VL_TEMPLATE
    return tok


def _text_kwargs(
    tokenizer, hidden, layers, heads, kv_heads, max_positions, init_range, intermediate, vocab
) -> dict:
    if vocab is not None and vocab < len(tokenizer):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab or len(tokenizer),
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _save_llava(
    out: Path,
    family: str,
    *,
    image_size,
    patch_size,
    vision_hidden,
    strategy=None,
    feature_layer=None,
    **text,
) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    if family == "llava-1.5":
        tokenizer = llama_tokenizer()
        vision_config = CLIPVisionConfig(**vision)
        text_config = LlamaConfig(**_text_kwargs(tokenizer, **text), tie_word_embeddings=False)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        default = ("default", -2, 1)
    else:
        tokenizer = chatml_tokenizer()
        vision_config = SiglipVisionConfig(**vision)
        text_config = Qwen2Config(**_text_kwargs(tokenizer, **text), tie_word_embeddings=False)
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
        default = ("full", -1, 0)
    strategy = strategy or default[0]
    layer = default[1] if feature_layer is None else feature_layer
    extra = default[2]
    grid = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        image_seq_length=grid + extra - (strategy == "default"),
        pad_token_id=tokenizer.pad_token_id,
    )
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)


def _save_qwen_vl(
    out: Path,
    family: str,
    *,
    image_size,
    patch_size,
    vision_hidden,
    strategy,
    feature_layer,
    **text,
) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    tokenizer = qwen_vl_tokenizer()
    kwargs = _text_kwargs(tokenizer, **text)
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    # M-RoPE splits the rotary half of each head into temporal, height and width sections
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    rope = {"type": "mrope", "mrope_section": section}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIALS}
    vision = dict(
        depth=2,
        hidden_size=vision_hidden,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen2.5-vl":
        vision.update(
            intermediate_size=2 * vision_hidden,
            out_hidden_size=kwargs["hidden_size"],
            fullatt_block_indexes=[1],
            window_size=4 * patch_size,
        )
        config_cls, model_cls, processor_class = (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            "Qwen2_5_VLProcessor",
        )
    else:
        vision.update(embed_dim=vision_hidden, hidden_size=kwargs["hidden_size"], mlp_ratio=2)
        config_cls, model_cls, processor_class = (
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            "Qwen2VLProcessor",
        )
    config = config_cls(
        text_config={**kwargs, "rope_scaling": rope, "tie_word_embeddings": True},
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model_cls(config).save_pretrained(out)
    factor = patch_size * 2
    # the hub's processor files, written by hand: Qwen2_5_VLProcessor itself needs a video
    # processor, and video processors need torchvision (STACK.md)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=(2 * factor) ** 2,
        max_pixels=image_size * image_size,
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    image_processor.save_pretrained(out)
    path = out / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data.update(processor_class=processor_class, min_pixels=(2 * factor) ** 2)
    data.update(max_pixels=image_size * image_size)
    path.write_text(json.dumps(data, indent=2))
    tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN_VL_TEMPLATE}, indent=2)
    )


# Qwen/Qwen3-VL-*-Instruct's template, without its tool-calling and reasoning branches
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save_qwen3(
    out: Path,
    family: str,
    *,
    image_size,
    patch_size,
    vision_hidden,
    strategy,
    feature_layer,
    **text,
) -> None:
    """Qwen3-VL (DeepStack from every vision layer) or Qwen3.5 (a hybrid decoder: three
    linear-attention layers, then one full-attention layer), dense or MoE, with the hub's
    processor files (the video processor's settings written by hand: it needs torchvision)."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    tokenizer = qwen_vl_tokenizer()
    tokenizer.chat_template = QWEN3_VL_TEMPLATE
    kwargs = _text_kwargs(tokenizer, **text)
    kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    half = kwargs["head_dim"] // 2
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True}
    vision = dict(
        depth=2,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=kwargs["hidden_size"],
        num_position_embeddings=64,
    )
    if family.startswith("qwen3-vl"):
        vision["deepstack_visual_indexes"] = [0, 1]
        rope["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    else:
        # Qwen3.5 rotates a part of each head (a quarter in the hub's checkpoints)
        rope["partial_rotary_factor"] = 0.5
        rope["mrope_section"] = [half // 2 - 2 * (half // 8), half // 8, half // 8]
        layers = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = [
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)
        ]
        kwargs.update(
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        )
    if family.endswith("-moe"):
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if family == "qwen3.5-moe":
            kwargs.pop("intermediate_size")
            kwargs["shared_expert_intermediate_size"] = 32
    name = {
        "qwen3-vl": "Qwen3VL",
        "qwen3-vl-moe": "Qwen3VLMoe",
        "qwen3.5": "Qwen3_5",
        "qwen3.5-moe": "Qwen3_5Moe",
    }[family]
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForConditionalGeneration")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIALS}
    config = config_cls(
        text_config={**kwargs, "rope_parameters": rope, "tie_word_embeddings": True},
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model_cls(config).save_pretrained(out)
    factor = patch_size * 2
    image_processor = Qwen2VLImageProcessor(
        min_pixels=(2 * factor) ** 2,
        max_pixels=image_size * image_size,
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.save_pretrained(out)
    path = out / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data.update(processor_class="Qwen3VLProcessor", min_pixels=(2 * factor) ** 2)
    data.update(max_pixels=image_size * image_size)
    path.write_text(json.dumps(data, indent=2))
    # the hub's video_preprocessor_config.json: pixel bounds over all of a video's frames
    video = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_sample_frames": True,
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "size": {"shortest_edge": 2 * factor * factor, "longest_edge": 8 * image_size * image_size},
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN3_VL_TEMPLATE}, indent=2)
    )


def build_stock(
    out_dir: str | Path,
    *,
    family: str = "llava",
    seed: int = 0,
    image_size: int | None = None,
    patch_size: int | None = None,
    hidden: int = 64,
    layers: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    max_positions: int = 32768,
    init_range: float = 0.02,
    strategy: str | None = None,
    feature_layer: int | list[int] | None = None,
    intermediate: int | None = None,
    vocab: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save a tiny random stock checkpoint of ``family`` (see the module doc) to ``out_dir``.

    ``intermediate`` (the decoder's MLP width, default twice its hidden size), ``vocab`` (its
    embedding rows, default the tokenizer's; more only widen the output layer) and ``dtype``
    (of the saved weights, made in it: default float32) shape a random model of a real
    size, e.g. Qwen2.5-VL-3B's decoder in bf16 (``bench/gpu_check.py``).

    ``image_size`` is the square input of LLaVA towers, and the largest area (its square) a
    Qwen-VL image is resized into. ``strategy`` / ``feature_layer`` override a LLaVA
    checkpoint's ``vision_feature_select_strategy`` / ``vision_feature_layer``.
    ``init_range`` is the decoder's ``initializer_range`` (the std of its random weights):
    transformers' 0.02 suits wide models; at hidden 64 the attention starts so flat that
    the tiny model learns where things are only slowly (bench/RESULTS.md, the demo's recipe).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    qwen = family.startswith("qwen")
    qwen3 = family in QWEN3
    sizes = dict(
        image_size=image_size or (128 if qwen3 else 112 if qwen else 96),
        patch_size=patch_size or (16 if qwen3 else 14 if qwen else 8),
        vision_hidden=vision_hidden,
        hidden=hidden,
        # Qwen3.5's decoder repeats three linear-attention layers and one full-attention layer
        layers=layers or (4 if family.startswith("qwen3.5") else 2),
        heads=heads,
        kv_heads=kv_heads,
        max_positions=max_positions,
        init_range=init_range,
        strategy=strategy,
        feature_layer=feature_layer,
        intermediate=intermediate,
        vocab=vocab,
    )
    save = _save_qwen3 if qwen3 else _save_qwen_vl if qwen else _save_llava
    default = torch.get_default_dtype()
    # the random weights are made in ``dtype``: no float32 copy of a large model
    torch.set_default_dtype(dtype or default)
    try:
        save(out, family, **sizes)
    finally:
        torch.set_default_dtype(default)
    return out


def resize_llava_input(src: str | Path, out_dir: str | Path, image_size: int) -> Path:
    """A copy of the stock LLaVA checkpoint ``src`` whose vision tower takes ``image_size`` px
    squares: its position embeddings interpolated (bicubic) from the old patch grid to the
    new one, as a hub checkpoint's resolution is raised before fine-tuning; the config's
    sizes and the image processor's follow. Saved to ``out_dir`` in the same stock layout.

    The claim benchmark's 4 x 4 grid uses it: the demo's 48 px checkpoint (6 x 6 patches)
    at 64 px (8 x 8 patches), so that each of the 16 cells is a 2 x 2-patch region."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(src)
    processor = AutoProcessor.from_pretrained(src)
    vision = model.config.vision_config
    if vision.model_type not in ("siglip_vision_model", "clip_vision_model"):
        raise ValueError(f"resize_llava_input takes SigLIP or CLIP towers, not {vision.model_type}")
    patch = vision.patch_size
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    old_side, side = vision.image_size // patch, image_size // patch
    state = model.state_dict()
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    table = state[key]
    extra = table.shape[0] - old_side * old_side  # CLIP's class position stays as it is
    grid = table[extra:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid.float(), size=(side, side), mode="bicubic", align_corners=False
    ).to(table.dtype)
    state[key] = torch.cat([table[:extra], grid.permute(0, 2, 3, 1).reshape(side * side, -1)])
    config = model.config
    config.vision_config.image_size = image_size
    config.image_seq_length += side * side - old_side * old_side
    resized = LlavaForConditionalGeneration(config)
    resized.load_state_dict(state)
    resized.generation_config = model.generation_config
    out = Path(out_dir)
    resized.save_pretrained(out)
    images = processor.image_processor
    if "shortest_edge" in (images.size or {}):
        images.size = {"shortest_edge": image_size}
        images.crop_size = {"height": image_size, "width": image_size}
    else:
        images.size = {"height": image_size, "width": image_size}
    processor.save_pretrained(out)
    return out


def build_tiny(
    out_dir: str | Path,
    *,
    gaze: bool = True,
    gaze_config: GazeConfig | None = None,
    family: str = "llava",
    seed: int = 0,
    **size_options,
) -> Path:
    """A tiny checkpoint in ``out_dir``: stock when ``gaze=False``, else converted to gaze.

    A gaze model is built as a user's would be: the stock checkpoint is saved, loaded with
    ``load_model(stock, gaze=gaze_config)`` and saved again (default budget keep_ratio 0.25).
    """
    out = Path(out_dir)
    if not gaze:
        return build_stock(out, family=family, seed=seed, **size_options)
    from gazeattn.model import load_model

    with tempfile.TemporaryDirectory() as tmp:
        stock = build_stock(tmp, family=family, seed=seed, **size_options)
        model, processor = load_model(stock, gaze=gaze_config or GazeConfig(keep_ratio=0.25))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument("--stock", action="store_true", help="the stock checkpoint (no gaze)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, help="decoder layers (default 2; Qwen3.5: 4)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args()
    out = build_tiny(
        args.out,
        gaze=not args.stock,
        family=args.family,
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
    )
    print(f"saved a tiny {'stock' if args.stock else 'gaze'} {args.family} model to {out}")


if __name__ == "__main__":
    main()
