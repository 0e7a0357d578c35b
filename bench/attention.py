"""Decode attention: gaze (lean gather path, cached descriptors) vs dense SDPA, in one run.

CPU section (issue #2): B = 1, Qwen3-4B-like heads (32 query, 8 KV, dim 128),
256 text tokens, regions of 36, keep 16%, at 8 and 32 frames x 576 visual
tokens. Prints the speed-up against dense SDPA measured in the same run and
writes bench/results/attention_cpu.json. Targets: 3x at 8 frames, 4.5x at 32.

Run: python bench/attention.py [--frames 8 32] [--dtype float32 bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import time_ms, write_results  # noqa: E402
from gazeattn.ops import GazeConfig, Video, build_layout, gaze_attention, region_descriptors  # noqa: E402

HEADS, KV_HEADS, DIM, TEXT = 32, 8, 128, 256
TARGETS = {8: 3.0, 32: 4.5}


def decode_case(frames: int, dtype: torch.dtype, keep: float, repeat: int) -> dict:
    layout = build_layout([[TEXT // 2, Video(frames, 24, 24), TEXT // 2]], num_context_tokens=4)
    config = GazeConfig(keep_ratio=keep)
    gen = torch.Generator().manual_seed(0)
    tk = layout.length
    q = torch.randn(1, HEADS, 1, DIM, generator=gen).to(dtype)
    k = torch.randn(1, KV_HEADS, tk, DIM, generator=gen).to(dtype)
    v = torch.randn(1, KV_HEADS, tk, DIM, generator=gen).to(dtype)
    # a gaze KV cache computes the descriptors once, when the visual tokens enter it
    desc = region_descriptors(k, layout)

    def gaze():
        return gaze_attention(q, k, v, layout, config, descriptors=desc)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    with torch.no_grad():
        _, stats = gaze()
        gaze_ms = time_ms(gaze, repeat=repeat)
        dense_ms = time_ms(dense, repeat=repeat)
    elem = torch.finfo(dtype).bits // 8
    return {
        "frames": frames,
        "dtype": str(dtype).removeprefix("torch."),
        "keys": tk,
        "visual_attended": stats.attended_mean(),
        "visual_dense": stats.dense_mean(),
        "gaze_ms": gaze_ms,
        "dense_ms": dense_ms,
        "speedup": dense_ms / gaze_ms,
        "ideal_bytes_ratio": tk / (tk - stats.dense_mean() + stats.attended_mean()),
        "dense_bytes": 2 * KV_HEADS * tk * DIM * elem,
        "target": TARGETS.get(frames),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--keep", type=float, default=0.16)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    rows = []
    print(
        f"CPU decode, B=1, {HEADS}q/{KV_HEADS}kv heads, dim {DIM}, keep {args.keep:.0%}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'frames':>6} {'dtype':>9} {'keys':>6} {'entries':>13} {'dense ms':>9} {'gaze ms':>8} {'speed-up':>9} {'ideal':>6} {'target':>7}"
    )
    for dtype_name in args.dtype:
        for frames in args.frames:
            row = decode_case(frames, getattr(torch, dtype_name), args.keep, args.repeat)
            rows.append(row)
            target = row["target"]
            verdict = "" if target is None else ("met" if row["speedup"] >= target else "MISSED")
            print(
                f"{frames:>6} {row['dtype']:>9} {row['keys']:>6} "
                f"{row['visual_attended']:>6.0f}/{row['visual_dense']:<6.0f} {row['dense_ms']:>9.2f} "
                f"{row['gaze_ms']:>8.2f} {row['speedup']:>8.2f}x {row['ideal_bytes_ratio']:>5.2f}x "
                f"{'' if target is None else f'{target:.1f}x'} {verdict}"
            )
    path = write_results("attention_cpu", {"rows": rows, "keep_ratio": args.keep})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
