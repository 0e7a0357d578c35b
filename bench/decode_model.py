"""End-to-end CPU decode through the serving engine: a gaze model vs its dense twin and stock SDPA.

A LLaVA-architecture model with a few decoder layers (hidden 512, 8 query / 2 KV
heads of dim 64) reads a video of F frames x 576 visual tokens (384 px, patch 16),
or one image (a short prompt), and decodes greedily with ``gazeattn.engine.Engine``
(the batch cache and paths the server uses) at several batch sizes: B copies of the
prompt decode together. Modes, on the same weights:

- ``gaze``: the converted model, keep ratio 0.16;
- ``dense-twin``: the same model with the dense backend over every visual entry;
- ``stock-sdpa``: the stock checkpoint (no context tokens) with transformers' SDPA.

The modes run interleaved, ``--repeats`` times; the median decode step is reported
(the machine may be shared). Prints decode tokens/s and the ratios, writes
bench/results/decode_model.json.

Run: python bench/decode_model.py [--frames 4] [--batch 1 8 16] [--tokens 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402
from gazeattn.engine import Engine  # noqa: E402
from gazeattn.generation import GenerationRequest  # noqa: E402
from gazeattn.model import load_model  # noqa: E402
from gazeattn.ops import GazeConfig  # noqa: E402
from gazeattn.tiny import build_stock  # noqa: E402

SIZE = dict(
    image_size=384, patch_size=16, hidden=512, layers=4, heads=8, kv_heads=2, vision_hidden=32
)


def decode_step_s(model, processor, prompt: dict, batch: int, tokens: int) -> tuple[float, float]:
    """(prefill seconds per sequence, median seconds of a decode step) for ``batch`` rows."""
    engine = Engine(model, processor, max_batch_size=batch, max_prefill_tokens=10**9)
    request = GenerationRequest(**prompt, max_new_tokens=10**6)
    sample = processor.encode_sample(
        prompt["messages"],
        images=prompt.get("images"),
        videos=prompt.get("videos"),
        add_generation_prompt=True,
    )
    # the end of turn is never chosen: every row decodes all the steps
    never_stop = {i: -100.0 for i in processor.stop_token_ids}
    seqs = [engine.submit(request, sample=sample, logit_bias=never_stop) for _ in range(batch)]
    start = time.perf_counter()
    while engine.num_running < batch:
        engine.step()
    prefill = (time.perf_counter() - start) / batch
    engine.step()
    steps = []
    for _ in range(tokens):
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    for seq in seqs:
        engine.cancel(seq)
    engine.step()
    return prefill, statistics.median(steps)


def prompts(frames: int) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    video = [rng.integers(0, 256, (384, 384, 3), dtype=np.uint8) for _ in range(frames)]
    ask = {"type": "text", "text": "describe it"}
    return {
        f"video-{frames}x576": {
            "messages": [{"role": "user", "content": [{"type": "video"}, ask]}],
            "videos": [video],
        },
        "image-576": {
            "messages": [{"role": "user", "content": [{"type": "image"}, ask]}],
            "images": [video[0]],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="timed decode steps")
    parser.add_argument("--keep", type=float, default=0.16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        stock_dir = build_stock(Path(tmp) / "stock", **SIZE)
        stock, stock_processor = load_model(stock_dir)
        gaze, processor = load_model(stock_dir, gaze=GazeConfig(keep_ratio=args.keep))
    stock.eval()
    gaze.eval()
    configs = {
        "gaze": GazeConfig(keep_ratio=args.keep),
        "dense-twin": GazeConfig(top_k="all", backend="dense"),
    }
    rows = []
    for name, prompt in prompts(args.frames).items():
        length = len(processor.encode_sample(add_generation_prompt=True, **prompt))
        for batch in args.batch:
            runs: dict[str, list[tuple[float, float]]] = {m: [] for m in (*configs, "stock-sdpa")}
            for _ in range(args.repeats):
                for mode, config in configs.items():
                    gaze.gaze_config = config
                    runs[mode].append(decode_step_s(gaze, processor, prompt, batch, args.tokens))
                runs["stock-sdpa"].append(
                    decode_step_s(stock, stock_processor, prompt, batch, args.tokens)
                )
            row = {"prompt": name, "prompt_tokens": length, "batch": batch}
            for mode, values in runs.items():
                step = statistics.median(v[1] for v in values)
                row[mode] = {
                    "prefill_s_per_sequence": statistics.median(v[0] for v in values),
                    "decode_step_ms": 1e3 * step,
                    "decode_tokens_per_s": batch / step,
                }
            row["gaze_vs_twin"] = (
                row["gaze"]["decode_tokens_per_s"] / row["dense-twin"]["decode_tokens_per_s"]
            )
            row["gaze_vs_stock"] = (
                row["gaze"]["decode_tokens_per_s"] / row["stock-sdpa"]["decode_tokens_per_s"]
            )
            row["twin_vs_stock"] = (
                row["dense-twin"]["decode_tokens_per_s"] / row["stock-sdpa"]["decode_tokens_per_s"]
            )
            rows.append(row)
            print(
                f"{name:>13} ({length} tokens) B={batch:>2}: tok/s gaze "
                f"{row['gaze']['decode_tokens_per_s']:.0f}, twin "
                f"{row['dense-twin']['decode_tokens_per_s']:.0f}, stock "
                f"{row['stock-sdpa']['decode_tokens_per_s']:.0f} | gaze/twin "
                f"{row['gaze_vs_twin']:.2f}x, gaze/stock {row['gaze_vs_stock']:.2f}x, "
                f"twin/stock {row['twin_vs_stock']:.2f}x",
                flush=True,
            )
    path = write_results(
        "decode_model",
        {
            "frames": args.frames,
            "keep_ratio": args.keep,
            "timed_steps": args.tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "model": SIZE,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
