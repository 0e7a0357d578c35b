"""Tiny random LLaVA-architecture models and an offline tokenizer, for tests, demo and benchmarks.

    python -m gazeattn.tiny --out DIR [--stock] [--image-size 96 --patch-size 8 --hidden 64 --layers 2]

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a small
built-in corpus, the weights are random (seeded). The saved directory loads
with ``gazeattn.load_model(DIR)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaConfig, PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig

from gazeattn.ops import GazeConfig

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE, VIDEO, CONTEXT = "<image>", "<video>", "<|gaze_ctx|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END, IMAGE, VIDEO, CONTEXT]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% elif part['type'] == 'video' %}<video>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an is are of in on at to what which where color colour shape object frame video image "
    "red green blue yellow purple orange white black gray cyan magenta pink brown "
    "circle square triangle star disk box ring cross left right top bottom center middle corner "
    "upper lower first second third last appears appear does when there how many one two three four "
    "five six seven eight nine ten zero yes no answer question describe picture scene small large "
    "system user assistant you helpful look see where which frame number"
).split()


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on a small corpus, with chat and media special tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    corpus += [f"{a} {b}?" for a in _WORDS[:40] for b in _WORDS[40:80]]
    corpus += [str(n) for n in range(200)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO, "context_token": CONTEXT},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 96,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    max_positions: int = 32768,
) -> LlavaConfig:
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny(
    out_dir: str | Path,
    *,
    gaze: bool = True,
    gaze_config: GazeConfig | None = None,
    seed: int = 0,
    **size_options,
) -> Path:
    """Build and save a tiny random model + processor; a gaze model unless ``gaze=False``."""
    from transformers import LlavaForConditionalGeneration

    from gazeattn.model import convert_to_gaze
    from gazeattn.processing import GazeProcessor

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, **size_options)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gaze_config = (gaze_config or GazeConfig(keep_ratio=0.25)) if gaze else None
    processor = GazeProcessor.from_model_config(tokenizer, config, gaze_config)
    if gaze:
        model = convert_to_gaze(model, gaze_config, context_token_id=processor.context_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--stock", action="store_true", help="a stock LLaVA model (no gaze)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args()
    out = build_tiny(
        args.out,
        gaze=not args.stock,
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
    )
    print(f"saved a tiny {'stock' if args.stock else 'gaze'} model to {out}")


if __name__ == "__main__":
    main()
