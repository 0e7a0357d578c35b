"""Serving benchmark: gaze vs its dense twin vs the stock model, behind the same Ray Serve app.

A LLaVA-architecture model whose decode steps read mostly KV cache (by default hidden
512, 4 layers, 8 query / 2 KV heads of dim 64, and 4 video frames x 576 visual tokens
per request; ``--hidden 1024 --layers 8 --heads 16 --frames 16`` is the issue's GPU-sized
configuration) is served on 127.0.0.1 by the continuous-batching app (``serving.app``):

- ``gaze``: the converted model (keep ratio 0.16, 4 context tokens per frame);
- ``dense``: the same checkpoint with the dense backend over every visual entry;
- ``stock``: the stock checkpoint it was converted from (transformers' SDPA, no context
  tokens);
- ``legacy``: the gaze model behind the app as it was before continuous batching
  (``bench/legacy_serve.py``: ``@serve.batch`` into ``generate_batch``, non-streamed).

At each concurrency (1, 4, 16, 32 by default) that many clients each send ``--rounds``
requests, one after the other: the same video and question, greedy, exactly
``--tokens`` new tokens (the end-of-turn tokens are banned through ``logit_bias``), the
streamed ones through the official openai client. The modes take turns level by level,
one at a time. Reported per mode and concurrency: output tokens/s over the level's wall
time, time to first token, and inter-token latency (p50/p95 over the requests; a
request's ITL is the time from its first to its last text chunk over its tokens; for
``legacy``, non-streamed, TTFT is the whole latency). Ratios measured in the same run are
printed; the figures and the KV share of a decode step's bytes go to
bench/results/serve.json.

Regimes where decode dominates (issue #24, ``--regime``; each sets the defaults of frames,
tokens, levels and modes, and asks each request its own question):

- ``a``: many users asking different questions about the same long video: 16 frames x 576
  tokens, 128 new tokens, concurrency 1/4/16/32, each request its own question. Another
  video warms each replica up; then the first request about the benchmark's video is the
  cold one and puts its prefix in the prefix cache, so every timed request of the gaze model
  and its twin is a hit, and of the stock model too (stock models are prefix-cached since
  2026-12-04; earlier runs in RESULTS.md prefilled each stock prompt). Targets on our 2-core CPU:
  gaze >= 2x the twin's tokens/s at concurrency 16, tokens/s x3 from concurrency 1 to 16, a
  hit's time to first token <= 0.1x of a cold one.
- ``b``: long answers: 512 new tokens over an 8-frame video, concurrency 16.

Run: PYTHONPATH=. python bench/serve.py [--regime a|b] [--frames 4] [--tokens 256]
     [--concurrency 1 4 16 32]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402
from gazeattn.ops import GazeConfig  # noqa: E402
from gazeattn.tiny import build_stock  # noqa: E402
from serving.images import data_url  # noqa: E402
from serving.local import local_serve  # noqa: E402
from serving.settings import GazeOverride, ServeSettings  # noqa: E402

MODES = ("gaze", "dense", "stock", "legacy")
BYTES = 4  # fp32 on CPU

# issue #24's decode-bound regimes: what each sets, and its targets (checked in ``targets``)
REGIMES = {
    "a": dict(frames=16, tokens=128, concurrency=[1, 4, 16, 32], modes=["gaze", "dense", "stock"],
              distinct=True),
    "b": dict(frames=8, tokens=512, concurrency=[16], modes=["gaze", "dense", "stock"],
              distinct=True),
}  # fmt: skip


def build_models(root: Path, args) -> tuple[Path, Path]:
    """(stock checkpoint, gaze checkpoint converted from it)."""
    from gazeattn.model import load_model

    stock = build_stock(
        root / "stock",
        image_size=384,
        patch_size=16,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vision_hidden=32,
    )
    model, processor = load_model(stock, gaze=GazeConfig(keep_ratio=args.keep))
    gaze = root / "gaze"
    model.save_pretrained(gaze)
    processor.save_pretrained(gaze)
    return stock, gaze


def frame_png(i: int) -> bytes:
    """A 384 px frame with a moving shape (small as PNG, unlike noise)."""
    image = Image.new("RGB", (384, 384), (20 + 10 * i % 200, 60, 90))
    draw = ImageDraw.Draw(image)
    x = 20 + 37 * i % 300
    draw.ellipse((x, 120, x + 60, 180), fill=(230, 40, 40))
    draw.rectangle((200, 40 + 11 * i % 300, 260, 100 + 11 * i % 300), fill=(40, 200, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def video_messages(frames: int, first: int = 0) -> list[dict]:
    """A video of ``frames`` frames (``first`` shifts them: another video) and a question."""
    urls = [{"url": data_url(frame_png(first + i))} for i in range(frames)]
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_frames", "video_frames": urls},
                {"type": "text", "text": "which frame has the red circle?"},
            ],
        }
    ]


QUESTIONS = ("which frame has the red circle?", "where is the green square?",
             "what colour is the background?", "does the circle move?")  # fmt: skip


def asked(messages: list[dict], n: int) -> list[dict]:
    """``messages`` with the n-th question of the run: the same video, its own question."""
    question = f"{QUESTIONS[n % len(QUESTIONS)]} (user {n})"
    content = [*messages[0]["content"][:-1], {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def one_request(client, messages, tokens: int, stream: bool, bias: dict) -> dict:
    start = time.perf_counter()
    if not stream:
        out = client.chat.completions.create(
            model="bench", messages=messages, max_tokens=tokens, temperature=0
        )
        latency = time.perf_counter() - start
        return {"ttft": latency, "itl": None, "tokens": out.usage.completion_tokens, "end": latency}
    stream_out = client.chat.completions.create(
        model="bench",
        messages=messages,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logit_bias=bias,
    )
    first = last = None
    generated = 0
    for chunk in stream_out:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter() - start
            first = last if first is None else first
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
    # a chunk carries the text of one or more tokens (a partial UTF-8 character waits for
    # the next one): the request's inter-token latency is its decode time over its tokens
    itl = (last - first) / (generated - 1) if first is not None and generated > 1 else None
    ttft = first if first is not None else float("nan")
    return {"ttft": ttft, "itl": itl, "tokens": generated, "end": time.perf_counter() - start}


def run_level(base: str, messages, concurrency: int, args, stream: bool, bias: dict) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=3600)

    def client_loop(i):
        # with --regime: each request its own question about the same video
        return [
            one_request(
                client,
                asked(messages, i * args.rounds + r) if args.distinct else messages,
                args.tokens,
                stream,
                bias,
            )
            for r in range(args.rounds)
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = [r for rs in pool.map(client_loop, range(concurrency)) for r in rs]
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in done]
    gaps = [r["itl"] for r in done if r["itl"] is not None]
    generated = sum(r["tokens"] for r in done)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "completion_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p95_s": _pct(ttft, 95),
        "itl_p50_ms": 1e3 * _pct(gaps, 50) if gaps else None,
        "itl_p95_ms": 1e3 * _pct(gaps, 95) if gaps else None,
    }


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def kv_share(args, prompt_tokens: int) -> dict:
    """What a decode step reads, by arithmetic: weights once, each sequence's KV once."""
    head_dim = args.hidden // args.heads
    inter = 2 * args.hidden  # the tiny models' MLP width
    per_layer = 2 * args.hidden * args.hidden + 2 * args.hidden * args.kv_heads * head_dim
    per_layer += 3 * args.hidden * inter
    weights = args.layers * per_layer * BYTES
    kv_token = args.layers * 2 * args.kv_heads * head_dim * BYTES
    visual = args.frames * 576
    # gaze reads the routed regions (keep ratio of the visual entries), every text and
    # context key, and the region descriptors (one key-sized mean per 36 tokens)
    gaze_tokens = args.keep * visual + (prompt_tokens - visual) + visual / 36
    rows = []
    for batch in args.concurrency:
        dense_kv = batch * prompt_tokens * kv_token
        gaze_kv = batch * gaze_tokens * kv_token
        rows.append(
            {
                "batch": batch,
                "kv_share_dense": dense_kv / (dense_kv + weights),
                "kv_share_gaze": gaze_kv / (gaze_kv + weights),
                "step_bytes_dense_over_gaze": (dense_kv + weights) / (gaze_kv + weights),
            }
        )
    return {
        "weights_bytes": weights,
        "kv_bytes_per_token": kv_token,
        "prompt_tokens": prompt_tokens,
        "kv_bytes_per_sequence": prompt_tokens * kv_token,
        "by_batch": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--regime", choices=sorted(REGIMES), default=None,
        help="a decode-bound regime of issue #24 (sets frames, tokens, levels and modes)",
    )  # fmt: skip
    parser.add_argument("--frames", type=int, default=4, help="video frames of 576 tokens")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--keep", type=float, default=0.16)
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=1, help="requests per client")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--replica-cpus", type=int, default=1, help="torch threads per replica")
    parser.add_argument(
        "--prefill-tokens",
        type=int,
        default=0,
        help="max_prefill_tokens of the app (0: one prompt, so a step prefills one request)",
    )
    parser.set_defaults(distinct=False)
    regime = parser.parse_known_args()[0].regime
    if regime is not None:
        # the regime's settings are the defaults: options given explicitly still win
        parser.set_defaults(**REGIMES[regime])
    args = parser.parse_args()

    from bench.legacy_serve import LegacyChat
    from serving.app import app

    messages = video_messages(args.frames)
    top = max(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        stock_dir, gaze_dir = build_models(Path(tmp), args)
        from gazeattn.model import load_model

        _, processor = load_model(gaze_dir)
        prompt_tokens = len(
            processor.encode_sample(
                [{"role": "user", "content": [{"type": "video"}, messages[0]["content"][1]]}],
                videos=[[np.zeros((384, 384, 3), np.uint8)] * args.frames],
                add_generation_prompt=True,
            )
        )
        bias = {str(i): -100 for i in processor.stop_token_ids}
        deployments = {}
        for mode in args.modes:
            settings = ServeSettings(
                model=str(stock_dir if mode == "stock" else gaze_dir),
                model_name="bench",
                gaze=GazeOverride(backend="dense", top_k="all") if mode == "dense" else None,
                max_batch_size=top,
                max_pending=4 * top,
                max_images=args.frames,
                max_tokens_limit=args.tokens,
                max_prefill_tokens=args.prefill_tokens or prompt_tokens,
            )
            options = dict(
                num_replicas=1,
                max_ongoing_requests=8 * top,
                ray_actor_options={"num_cpus": args.replica_cpus},
            )
            if mode == "legacy":
                deployments[mode] = LegacyChat.options(**options).bind(
                    settings.model_dump(), top, 0.02
                )
            else:
                deployments[mode] = app(settings, **options)
        results, cold = run_all(deployments, messages, args, bias)

    ratios = _ratios(results, args.concurrency)
    share = kv_share(args, prompt_tokens)
    print(f"\nprompt: {prompt_tokens} tokens ({args.frames} frames x 576 visual + context + text)")
    print(
        f"weights {share['weights_bytes'] / 1e6:.1f} MB, KV {share['kv_bytes_per_token']} B/token, "
        f"{share['kv_bytes_per_sequence'] / 1e6:.1f} MB/sequence"
    )
    for row in share["by_batch"]:
        print(
            f"  batch {row['batch']:>2}: KV share of a step's bytes, dense "
            f"{row['kv_share_dense']:.0%}, gaze {row['kv_share_gaze']:.0%}; dense/gaze bytes "
            f"{row['step_bytes_dense_over_gaze']:.2f}x"
        )
    for line in ratios["lines"]:
        print(line)
    checked = targets(results, cold, args) if args.regime == "a" else []
    for line in checked:
        print(line["line"])
    path = write_results(
        f"serve-{args.regime}" if args.regime else "serve",
        {
            "config": {**vars(args), "prompt_tokens": prompt_tokens},
            "results": results,
            "cold_ttft_s": cold,
            "ratios": ratios["table"],
            "targets": checked,
            "kv_share": share,
        },
    )
    print(f"wrote {path}")


def run_all(deployments: dict, messages, args, bias: dict, attempts: int = 4) -> dict:
    """Every mode at every concurrency level, the modes interleaved level by level (so that a
    change of the machine's load between levels reaches every mode alike). All the apps are
    deployed on one local Ray; only one is asked at a time, and an idle replica's scheduler
    only waits. A level that loses its connections (on a shared machine another user's
    ``ray stop`` ends every Ray process) is run again on a fresh Ray."""
    import openai
    from ray import serve
    from ray.exceptions import RayError

    results: dict[str, list[dict]] = {mode: [] for mode in deployments}
    cold: dict[str, float] = {}  # each mode's first request on its fresh replica
    todo = [(c, mode) for c in args.concurrency for mode in deployments]
    for attempt in range(1, attempts + 1):
        try:
            with local_serve(num_cpus=4 + len(deployments)) as url:
                for mode, deployment in deployments.items():
                    serve.run(deployment, name=mode, route_prefix=f"/{mode}")
                    warm = argparse.Namespace(**{**vars(args), "rounds": 1})
                    base, stream = f"{url}/{mode}/v1", mode != "legacy"
                    # another video warms the replica up, so that the first request about
                    # the benchmark's video is cold for the prefix cache only
                    other = video_messages(args.frames, first=1000)
                    run_level(base, other, 1, warm, stream, bias)
                    first = run_level(base, messages, 1, warm, stream, bias)
                    cold.setdefault(mode, first["ttft_p50_s"])
                while todo:
                    c, mode = todo[0]
                    base = f"{url}/{mode}/v1"
                    row = run_level(base, messages, c, args, mode != "legacy", bias)
                    results[mode].append(row)
                    todo.pop(0)
                    print(f"{mode:6} c={c:>2} {_fmt(row)}", flush=True)
                return results, cold
        except (openai.APIConnectionError, openai.InternalServerError, RayError) as err:
            print(f"attempt {attempt} lost its server ({err!r}); again on a fresh Ray", flush=True)
    raise RuntimeError("every attempt lost its server")


def targets(results: dict, cold: dict, args) -> list[dict]:
    """Regime (a)'s three targets, each with what was measured and whether it was met."""

    def rate(mode: str, c: int) -> float | None:
        return _rate(results, mode, c)

    out = []

    def check(name: str, value: float | None, target: float, at_most: bool = False) -> None:
        if value is None:
            line = f"target {name}: not measured"
            met = None
        else:
            met = value <= target if at_most else value >= target
            sign = "<=" if at_most else ">="
            line = f"target {name}: {value:.2f}x ({sign} {target}x: {'met' if met else 'NOT met'})"
        out.append({"target": name, "value": value, "goal": target, "met": met, "line": line})

    gaze16, dense16, gaze1 = rate("gaze", 16), rate("dense", 16), rate("gaze", 1)
    check(
        "gaze over its twin, tokens/s at c=16",
        gaze16 / dense16 if gaze16 and dense16 else None,
        2.0,
    )
    check("gaze tokens/s, c=16 over c=1", gaze16 / gaze1 if gaze16 and gaze1 else None, 3.0)
    hit = [r["ttft_p50_s"] for r in results.get("gaze", []) if r["concurrency"] == 1]
    ratio = hit[0] / cold["gaze"] if hit and cold.get("gaze") else None
    check("prefix-cache hit's time to first token over a cold one (gaze, c=1)", ratio, 0.1, True)
    return out


def _rate(results: dict, mode: str, c: int) -> float | None:
    """The tokens/s of ``mode`` at concurrency ``c`` (None when not measured)."""
    rows = [r for r in results.get(mode, []) if r["concurrency"] == c]
    return rows[0]["tokens_per_s"] if rows else None


def _fmt(row: dict) -> str:
    itl = (
        f"ITL p50 {row['itl_p50_ms']:.0f} ms p95 {row['itl_p95_ms']:.0f} ms"
        if row["itl_p50_ms"] is not None
        else "non-streamed"
    )
    return (
        f"{row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_s']:6.2f} s "
        f"p95 {row['ttft_p95_s']:6.2f} s  {itl}  ({row['completion_tokens']} tokens, "
        f"{row['wall_s']:.1f} s)"
    )


def _ratios(results: dict, levels: list[int]) -> dict:
    table, lines = [], []

    def rate(mode, c):
        return _rate(results, mode, c)

    for c in levels:
        entry = {"concurrency": c}
        for name, (a, b) in {
            "gaze_over_dense": ("gaze", "dense"),
            "gaze_over_stock": ("gaze", "stock"),
            "continuous_over_legacy": ("gaze", "legacy"),
        }.items():
            x, y = rate(a, c), rate(b, c)
            entry[name] = x / y if x and y else None
        table.append(entry)
        lines.append(
            f"c={c:>2}: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in entry.items() if k != "concurrency" and v)
        )
    top = 16 if 16 in levels else max(levels)
    for mode in results:
        low, high = rate(mode, min(levels)), rate(mode, top)
        if low and high:
            lines.append(f"{mode}: tokens/s at c={top} over c={min(levels)} {high / low:.2f}x")
            table.append({"mode": mode, f"scaling_c{top}_over_c{min(levels)}": high / low})
    return {"table": table, "lines": lines}


if __name__ == "__main__":
    main()
