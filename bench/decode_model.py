"""End-to-end CPU decode: a small gaze model vs its dense twin and stock SDPA, in one run.

A LLaVA-architecture model with a few decoder layers (hidden 512, 8 query / 2 KV
heads of dim 64) reads a video of 8 frames x 576 visual tokens (384 px, patch 16)
and decodes greedily. Prints decode tokens/s and the ratios, writes
bench/results/decode_model.json.

Run: python bench/decode_model.py [--frames 8] [--tokens 32] [--keep 0.16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402
from gazeattn.generation import GazeCache  # noqa: E402
from gazeattn.model import load_model  # noqa: E402
from gazeattn.ops import GazeConfig  # noqa: E402
from gazeattn.tiny import build_tiny  # noqa: E402

SIZE = dict(
    image_size=384, patch_size=16, hidden=512, layers=4, heads=8, kv_heads=2, vision_hidden=32
)


def decode_rate(model, batch, tokens: int, *, stock: bool = False) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for greedy decoding of ``tokens`` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache() if stock else GazeCache()
    extra = {} if stock else {"gaze_layout": batch["gaze_layout"]}
    mask = batch["attention_mask"]
    with torch.no_grad():
        start = time.perf_counter()
        out = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(
                input_ids=nxt,
                attention_mask=mask,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        return prefill, tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--keep", type=float, default=0.16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        stock_dir = build_tiny(Path(tmp) / "stock", gaze=False, **SIZE)
        stock, _ = load_model(stock_dir)
        gaze, processor = load_model(stock_dir, gaze=GazeConfig(keep_ratio=args.keep))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (384, 384, 3), dtype=np.uint8) for _ in range(args.frames)]
    messages = [
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "text", "text": "describe the video"}],
        }
    ]
    sample = processor.encode_sample(messages, videos=[frames], add_generation_prompt=True)
    batch = processor.collate([sample])
    print(
        f"prompt: {len(sample['input_ids'])} tokens ({args.frames} frames x 576 visual + 4 context each)"
    )

    rows = {}
    twins = {
        "gaze": GazeConfig(keep_ratio=args.keep),
        "dense-twin": GazeConfig(top_k="all", backend="dense"),
    }
    for name, config in twins.items():
        gaze.gaze_config = config
        decode_rate(gaze, batch, 2)
        rows[name] = decode_rate(gaze, batch, args.tokens)
    # the stock model reads the same frames without context tokens
    processor.settings.num_context_tokens = 0
    stock_batch = processor.collate(
        [processor.encode_sample(messages, videos=[frames], add_generation_prompt=True)]
    )
    decode_rate(stock, stock_batch, 2, stock=True)
    rows["stock-sdpa"] = decode_rate(stock, stock_batch, args.tokens, stock=True)

    print(f"{'model':>11} {'prefill s':>10} {'decode tok/s':>13}")
    for name, (prefill, rate) in rows.items():
        print(f"{name:>11} {prefill:>10.2f} {rate:>13.1f}")
    vs_twin = rows["gaze"][1] / rows["dense-twin"][1]
    vs_stock = rows["gaze"][1] / rows["stock-sdpa"][1]
    print(f"gaze decode speed-up: {vs_twin:.2f}x vs the dense twin, {vs_stock:.2f}x vs stock SDPA")
    path = write_results(
        "decode_model",
        {
            "frames": args.frames,
            "keep_ratio": args.keep,
            "tokens": args.tokens,
            "model": SIZE,
            "rows": {k: {"prefill_s": v[0], "decode_tokens_per_s": v[1]} for k, v in rows.items()},
            "speedup_vs_dense_twin": vs_twin,
            "speedup_vs_stock_sdpa": vs_stock,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
