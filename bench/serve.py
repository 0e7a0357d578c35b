"""Serving benchmark: gaze vs dense decoding behind the same Ray Serve app, in one run.

A tiny-but-long-context gaze model (8 video frames of 18 x 18 visual tokens at the
defaults, 4 context tokens each) is served twice on 127.0.0.1: as saved (gaze,
keep ratio 0.16) and with the dense backend over every visual entry. Clients send
the same video + question at concurrency 1, 4 and 16 (greedy, a fixed number of
new tokens) through the official openai client. Prints completion tokens/s and
p50/p99 latency per mode and the gaze/dense ratios; writes bench/results/serve.json.

Run: PYTHONPATH=. python bench/serve.py [--frames 8] [--image-size 144] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402
from gazeattn.ops import GazeConfig  # noqa: E402
from gazeattn.tiny import build_tiny  # noqa: E402
from serving.images import data_url  # noqa: E402
from serving.local import local_serve  # noqa: E402
from serving.settings import GazeOverride, ServeSettings  # noqa: E402

MODES = {"gaze": None, "dense": GazeOverride(attn="dense")}


def build_model(out: Path, args) -> Path:
    return build_tiny(
        out,
        gaze_config=GazeConfig(keep_ratio=args.keep),
        image_size=args.image_size,
        patch_size=8,
        hidden=args.hidden,
        layers=args.layers,
        heads=8,
        kv_heads=2,
    )


def frame_png(seed: int, size: int) -> bytes:
    """A random RGB frame as PNG bytes."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def video_messages(frames: int, size: int) -> list[dict]:
    urls = [{"url": data_url(frame_png(i, size))} for i in range(frames)]
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_frames", "video_frames": urls},
                {"type": "text", "text": "which frame has the red circle?"},
            ],
        }
    ]


def run_level(base: str, messages, concurrency: int, requests: int, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=600)

    def one(_):
        start = time.perf_counter()
        out = client.chat.completions.create(
            model="bench", messages=messages, max_tokens=tokens, temperature=0
        )
        return time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    generated = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "completion_tokens": generated,
        "tokens_per_s": generated / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": float(np.percentile(latencies, 99)),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=144, help="pixels; patch 8")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep", type=float, default=0.16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    from ray import serve

    from serving.app import app

    messages = video_messages(args.frames, args.image_size)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, local_serve(num_cpus=args.cpus) as url:
        model_dir = build_model(Path(tmp) / "model", args)
        for mode, override in MODES.items():
            settings = ServeSettings(
                model=str(model_dir),
                model_name="bench",
                gaze=override,
                max_batch_size=max(args.concurrency),
                max_images=args.frames,
                batch_wait_timeout_s=0.02,
            )
            options = dict(
                num_replicas=1,
                max_ongoing_requests=2 * max(args.concurrency),
                ray_actor_options={"num_cpus": args.cpus},
            )
            # one mode at a time, so the two never share the CPU
            serve.run(app(settings, **options), name=mode, route_prefix=f"/{mode}")
            base = f"{url}/{mode}/v1"
            run_level(base, messages, 1, 1, args.tokens)  # warm-up
            results[mode] = [
                run_level(base, messages, c, c * args.rounds, args.tokens) for c in args.concurrency
            ]
            serve.delete(mode)

    print(f"{'mode':6} {'conc':>4} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7}")
    for mode, rows in results.items():
        for r in rows:
            print(
                f"{mode:6} {r['concurrency']:>4} {r['tokens_per_s']:>8.1f} "
                f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f}"
            )
    ratios = []
    for gaze, dense in zip(results["gaze"], results["dense"], strict=True):
        ratio = {
            "concurrency": gaze["concurrency"],
            "tokens_per_s_gaze_over_dense": gaze["tokens_per_s"] / dense["tokens_per_s"],
            "p50_dense_over_gaze": dense["p50_s"] / gaze["p50_s"],
            "p99_dense_over_gaze": dense["p99_s"] / gaze["p99_s"],
        }
        ratios.append(ratio)
        print(
            f"concurrency {ratio['concurrency']:>2}: gaze/dense tokens/s "
            f"{ratio['tokens_per_s_gaze_over_dense']:.2f}x, dense/gaze p50 "
            f"{ratio['p50_dense_over_gaze']:.2f}x, p99 {ratio['p99_dense_over_gaze']:.2f}x"
        )
    grid = args.image_size // 8
    path = write_results(
        "serve",
        {
            "config": {**vars(args), "visual_tokens": args.frames * grid * grid},
            "results": results,
            "ratios": ratios,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
