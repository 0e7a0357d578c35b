"""Ray Serve end to end: gaze vs dense decoding of the same model, at concurrency 1, 4 and 16.

A tiny LLaVA-architecture gaze model with a long visual context (a video of 8
frames x 576 visual tokens + 4 context tokens each, 384 px at patch 16) is served
by ``serving.app`` on 127.0.0.1, once with its gaze routing and once as its dense
twin (``top_k: all``, dense backend: the same weights). Clients post
OpenAI chat requests carrying the 8 frames (the ``video_frames`` extension) and
ask for a fixed number of tokens. Per concurrency level: completion tokens/s over
the level's wall time, and p50/p99 request latency; then the gaze/dense ratios.
Writes bench/results/serve.json.

Run: python bench/serve.py [--frames 8] [--max-tokens 16] [--requests 4] [--levels 1 4 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402
from gazeattn.ops import GazeConfig  # noqa: E402
from gazeattn.tiny import build_tiny  # noqa: E402

SIZE = dict(image_size=384, patch_size=16, hidden=256, layers=2, heads=4, kv_heads=2)
VARIANTS = {
    "gaze": None,  # the checkpoint's own routing (keep_ratio from --keep)
    "dense": {"top_k": "all", "backend": "dense"},
}


def frame_urls(frames: int, side: int = 96) -> list[str]:
    """Small random JPEG frames as data URLs (the processor resizes them to 384 px)."""
    rng = np.random.default_rng(0)
    urls = []
    for _ in range(frames):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buffer, format="JPEG"
        )
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def request_body(urls: list[str], max_tokens: int, i: int) -> dict:
    video = {"type": "video_frames", "video_frames": [{"url": u} for u in urls]}
    text = {"type": "text", "text": f"describe the video, part {i % 7}"}
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": [video, text]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def run_level(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send ``bodies`` from ``concurrency`` client threads; latencies, tokens/s and batch sizes."""

    def one(body: dict) -> tuple[float, int, int]:
        start = time.perf_counter()
        resp = client.post(f"{url}/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - start
        resp.raise_for_status()
        batch = int(resp.headers.get("x-batch-size", "1"))
        return elapsed, resp.json()["usage"]["completion_tokens"], batch

    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            rows = list(pool.map(one, bodies))
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in rows)
    tokens = sum(r[1] for r in rows)
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": float(np.percentile(latencies, 99)),
        "mean_batch_size": statistics.mean(r[2] for r in rows),
    }


def bench_variant(url: str, model_dir: Path, override, args, urls) -> list[dict]:
    from ray import serve

    from serving.app import app
    from serving.settings import ServeSettings

    settings = ServeSettings(
        model=str(model_dir),
        model_name="bench",
        gaze=override,
        max_images=max(16, args.frames),
        max_batch_size=max(args.levels),
        batch_wait_timeout_s=0.05,
        # no API key in the benchmark, whatever the caller's environment holds
        api_key_env="GAZEATTN_BENCH_NO_KEY",
    )
    deployment = {
        "num_replicas": 1,
        "max_ongoing_requests": 2 * max(args.levels),
        "ray_actor_options": {"num_cpus": 1},
    }
    serve.run(app(settings, **deployment), name="bench", route_prefix="/")
    # warm-up: the first request pays for lazy initialisation
    run_level(url, [request_body(urls, 2, 0)], 1)
    rows = []
    for level in args.levels:
        count = max(args.requests, level)
        bodies = [request_body(urls, args.max_tokens, i) for i in range(count)]
        row = run_level(url, bodies, level)
        print(
            f"  c={level:<3} {row['tokens_per_s']:8.2f} tok/s  p50 {row['p50_s']:7.2f} s  "
            f"p99 {row['p99_s']:7.2f} s  mean batch {row['mean_batch_size']:.1f}",
            flush=True,
        )
        rows.append(row)
    serve.delete("bench")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per level (>= c)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--keep", type=float, default=0.16, help="gaze keep ratio")
    parser.add_argument("--hidden", type=int, default=SIZE["hidden"])
    parser.add_argument("--layers", type=int, default=SIZE["layers"])
    args = parser.parse_args()

    import ray
    from ray import serve

    from tests.servers import free_port

    size = {**SIZE, "hidden": args.hidden, "layers": args.layers}
    urls = frame_urls(args.frames)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(
            Path(tmp) / "bench", gaze_config=GazeConfig(keep_ratio=args.keep), **size
        )
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, override in VARIANTS.items():
                print(f"{name}:", flush=True)
                results[name] = bench_variant(url, model_dir, override, args, urls)
        finally:
            serve.shutdown()
            ray.shutdown()

    ratios = []
    print(f"{'c':>3} {'tok/s gaze/dense':>17} {'p50 dense/gaze':>15} {'p99 dense/gaze':>15}")
    for gaze, dense in zip(results["gaze"], results["dense"], strict=True):
        ratio = {
            "concurrency": gaze["concurrency"],
            "tokens_per_s_gaze_over_dense": gaze["tokens_per_s"] / dense["tokens_per_s"],
            "p50_dense_over_gaze": dense["p50_s"] / gaze["p50_s"],
            "p99_dense_over_gaze": dense["p99_s"] / gaze["p99_s"],
        }
        ratios.append(ratio)
        print(
            f"{ratio['concurrency']:>3} {ratio['tokens_per_s_gaze_over_dense']:>17.2f} "
            f"{ratio['p50_dense_over_gaze']:>15.2f} {ratio['p99_dense_over_gaze']:>15.2f}"
        )
    scaling = results["gaze"][-1]["tokens_per_s"] / results["gaze"][0]["tokens_per_s"]
    print(f"gaze tokens/s at c={args.levels[-1]} over c={args.levels[0]}: {scaling:.2f}x")
    path = write_results(
        "serve",
        {
            "frames": args.frames,
            "visual_tokens_per_frame": (SIZE["image_size"] // SIZE["patch_size"]) ** 2,
            "keep_ratio": args.keep,
            "max_tokens": args.max_tokens,
            "model": size,
            "rows": results,
            "ratios": ratios,
            "gaze_throughput_scaling": scaling,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
