"""GPU attention: gaze Triton kernels vs dense SDPA (FlashAttention backend), in one run.

Issue #4, GPU section. Qwen3-4B-like heads (32 query, 8 KV, dim 128), bf16,
regions of 6x6, 4 context tokens per frame, keep 16% of the visible regions,
at 1 image (576 visual tokens), 8 frames x 576 and 32 frames x 576:

- decode at batch 1, 8 and 32 (one text query per sequence against the cache;
  gaze routes with cached descriptors, as the gaze KV cache does);
- training forward+backward at batch 1 (the whole sequence as queries).

The device's copy bandwidth is measured in the same run; decode prints the
bandwidth achieved on the bytes the gaze kernel actually reads. Targets: decode
>= 3.3x faster than dense at 8 frames and >= 4x at 32 frames, >= 75% of the
copy bandwidth; training forward+backward faster than dense from 8 frames up.
Writes bench/results/attention_gpu.json. Without a GPU it prints why and exits 0.

Run: python bench/attention_gpu.py [--frames 1 8 32] [--batch 1 8 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import time_ms, write_results  # noqa: E402
from gazeattn.ops import GazeConfig, Video, build_layout  # noqa: E402

HEADS, KV_HEADS, DIM, TEXT, GRID = 32, 8, 128, 256, 24
DECODE_TARGETS = {8: 3.3, 32: 4.0}
BANDWIDTH_TARGET = 0.75


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a ``gib`` buffer."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, repeat=30)
    return 2 * n * 4 / (ms * 1e-3)


def sequence(frames: int):
    """One sequence: text, ``frames`` frames of 24 x 24 (each + 4 context tokens), text."""
    return [TEXT // 2, Video(frames, GRID, GRID), TEXT // 2]


def flash(fn):
    """Run ``fn`` with SDPA restricted to the FlashAttention backend (it fails, not falls back)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        if not torch.cuda.is_available():
            return fn()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return fn()

    return run


def decode_case(
    frames: int,
    batch: int,
    dtype: torch.dtype,
    keep: float,
    bandwidth: float,
    device="cuda",
    repeat=50,
) -> dict:
    from gazeattn.ops.gaze.decode_triton import (
        decode_config,
        decode_tables,
        gaze_decode_fwd,
        gaze_decode_triton,
    )
    from gazeattn.ops.gaze.descriptors import region_descriptors_triton
    from gazeattn.ops.routing import route

    device = torch.device(device)
    layout = build_layout([sequence(frames)] * batch, num_context_tokens=4).to(device)
    config = GazeConfig(keep_ratio=keep)
    tk = layout.length
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, HEADS, 1, DIM, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, tk, DIM, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, KV_HEADS, tk, DIM, generator=gen, device=device, dtype=dtype)
    desc = region_descriptors_triton(k, layout)
    group = HEADS // KV_HEADS
    # a single query needs no causal mask: the group's heads become rows of its KV head
    q_rows = q.view(batch, KV_HEADS, group, DIM)
    dense = flash(lambda: F.scaled_dot_product_attention(q_rows, k, v))

    def gaze():
        return gaze_decode_triton(q, k, v, layout, config, descriptors=desc)

    with torch.no_grad():
        _, stats = gaze()
        # the selected regions [B, Hr, K] int32 of this step, as the decode path routes
        ids = route(q, k, layout, config, descriptors=desc).ids[:, :, 0].to(torch.int32)
        dense_idx, dense_cnt, tokens = decode_tables(layout, tk, q.device)
        lc, splits = decode_config(q, ids, dense_idx.shape[1], tokens.shape[2])
        scale = DIM**-0.5

        def kernel_only():
            return gaze_decode_fwd(q, k, v, dense_idx, dense_cnt, ids, tokens, scale, lc, splits)

        dense_ms = time_ms(dense, repeat=repeat)
        gaze_ms = time_ms(gaze, repeat=repeat)
        kernel_ms = time_ms(kernel_only, repeat=repeat)

    elem = torch.finfo(dtype).bits // 8
    visual_dense, visual_routed = stats.dense_mean(), stats.attended_mean()
    # keys the gaze kernel reads per KV head: text + context (dense) + routed visual tokens
    dense_keys = float(dense_cnt.float().mean())
    sizes = layout.regions.size.gather(1, ids.clamp(min=0).flatten(1).long()).view_as(ids)
    routed_tokens = float(torch.where(ids >= 0, sizes, 0).sum(-1).float().mean())
    kv_bytes = 2 * batch * KV_HEADS * (dense_keys + routed_tokens) * DIM * elem
    desc_bytes = desc.numel() * 4
    gaze_bytes = kv_bytes + desc_bytes
    dense_bytes = 2 * batch * KV_HEADS * tk * DIM * elem
    return {
        "kind": "decode",
        "frames": frames,
        "batch": batch,
        "keys": tk,
        "visual_dense": visual_dense,
        "visual_attended": visual_routed,
        "dense_ms": dense_ms,
        "gaze_ms": gaze_ms,
        "gaze_kernel_ms": kernel_ms,
        "speedup": dense_ms / gaze_ms,
        "speedup_kernel": dense_ms / kernel_ms,
        "num_splits": splits,
        "ideal_bytes_ratio": dense_bytes / gaze_bytes,
        "dense_bytes": dense_bytes,
        "gaze_bytes": gaze_bytes,
        "dense_bandwidth": dense_bytes / (dense_ms * 1e-3),
        "gaze_bandwidth": gaze_bytes / (gaze_ms * 1e-3),
        "gaze_kernel_bandwidth": kv_bytes / (kernel_ms * 1e-3),
        "gaze_bandwidth_fraction": gaze_bytes / (gaze_ms * 1e-3) / bandwidth,
        "gaze_kernel_bandwidth_fraction": kv_bytes / (kernel_ms * 1e-3) / bandwidth,
        "target": DECODE_TARGETS.get(frames),
    }


def train_case(frames: int, dtype: torch.dtype, keep: float, device="cuda", repeat=10) -> dict:
    from gazeattn.ops.gaze.fused import gaze_attention_triton
    from gazeattn.ops.routing import route

    device = torch.device(device)
    layout = build_layout([sequence(frames)], num_context_tokens=4).to(device)
    config = GazeConfig(keep_ratio=keep)
    t = layout.length
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, h, t, DIM, generator=gen, device=device, dtype=dtype).requires_grad_()
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    grad = torch.randn(1, HEADS, t, DIM, generator=gen, device=device, dtype=dtype)

    dense_kv = (k, v)
    variant = "flash, enable_gqa"

    def dense_step():
        out = F.scaled_dot_product_attention(q, *dense_kv, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(out, (q, *dense_kv), grad)

    try:
        flash(dense_step)()
    except RuntimeError as err:
        # this torch's flash kernel takes no GQA: give it the KV heads repeated (recorded)
        print(f"  flash rejected enable_gqa ({str(err).splitlines()[0]}); repeating KV heads")
        dense_kv = tuple(
            x.detach().repeat_interleave(HEADS // KV_HEADS, 1).requires_grad_() for x in (k, v)
        )
        variant = "flash, KV heads repeated"

    def gaze_step():
        out, _ = gaze_attention_triton(q, k, v, layout, config)
        return torch.autograd.grad(out, (q, k, v), grad)

    def routing_only():
        with torch.no_grad():
            return route(q, k, layout, config)

    dense_ms = time_ms(flash(dense_step), repeat=repeat)
    gaze_ms = time_ms(gaze_step, repeat=repeat)
    route_ms = time_ms(routing_only, repeat=repeat)
    return {
        "kind": "train_fwd_bwd",
        "frames": frames,
        "batch": 1,
        "tokens": t,
        "dense_variant": variant,
        "dense_ms": dense_ms,
        "gaze_ms": gaze_ms,
        "gaze_routing_ms": route_ms,
        "speedup": dense_ms / gaze_ms,
        "target": 1.0 if frames >= 8 else None,
    }


def verdict(row: dict) -> str:
    target = row.get("target")
    if target is None:
        return ""
    return "met" if row["speedup"] >= target else "MISSED"


def run(
    frames: list[int],
    batches: list[int],
    dtype: torch.dtype,
    keep: float,
    train: bool = True,
    device: str = "cuda",
) -> dict:
    """Every decode (frames x batch) and training (frames) case; the payload of the JSON."""
    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"{name}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{HEADS}q/{KV_HEADS}kv heads, dim {DIM}, {dtype}, keep {keep:.0%}, regions 6x6")
    rows = []
    print(
        f"{'decode':>7} {'frames':>6} {'batch':>5} {'keys':>6} {'dense ms':>9} {'gaze ms':>8} "
        f"{'kernel':>7} {'speed-up':>9} {'ideal':>6} {'bw %':>5} {'target':>7}"
    )
    for n_frames in frames:
        for batch in batches:
            row = decode_case(n_frames, batch, dtype, keep, bandwidth, device)
            rows.append(row)
            target = row["target"]
            print(
                f"{'':>7} {n_frames:>6} {batch:>5} {row['keys']:>6} {row['dense_ms']:>9.3f} "
                f"{row['gaze_ms']:>8.3f} {row['gaze_kernel_ms']:>7.3f} {row['speedup']:>8.2f}x "
                f"{row['ideal_bytes_ratio']:>5.2f}x {100 * row['gaze_kernel_bandwidth_fraction']:>4.0f}% "
                f"{'' if target is None else f'{target:.1f}x'} {verdict(row)}"
            )
            torch.cuda.empty_cache()
    if train:
        print(
            f"{'train':>7} {'frames':>6} {'tokens':>6} {'dense ms':>9} {'gaze ms':>8} {'routing':>8} {'speed-up':>9}"
        )
        for n_frames in frames:
            row = train_case(n_frames, dtype, keep, device)
            rows.append(row)
            print(
                f"{'':>7} {n_frames:>6} {row['tokens']:>6} {row['dense_ms']:>9.2f} {row['gaze_ms']:>8.2f} "
                f"{row['gaze_routing_ms']:>8.2f} {row['speedup']:>8.2f}x {verdict(row)}"
            )
            torch.cuda.empty_cache()
    return {
        "rows": rows,
        "keep_ratio": keep,
        "dtype": str(dtype).removeprefix("torch."),
        "copy_bandwidth": bandwidth,
        "bandwidth_target": BANDWIDTH_TARGET,
        "heads": [HEADS, KV_HEADS, DIM],
    }


def markdown(payload: dict) -> str:
    """The decode and training tables of a run, as RESULTS.md shows them."""
    bw = payload["copy_bandwidth"]
    lines = [
        f"Measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write). {payload['heads'][0]} query "
        f"/ {payload['heads'][1]} KV heads, dim {payload['heads'][2]}, {payload['dtype']}, keep "
        f"{payload['keep_ratio']:.0%}, regions 6x6, 4 context tokens per frame, {TEXT} text "
        "tokens. Baseline: SDPA restricted to FlashAttention, same run.",
        "",
        "| decode | frames | batch | keys | dense ms | gaze ms | kernel ms | speed-up | "
        "ideal bytes ratio | kernel bandwidth | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if r["kind"] != "decode":
            continue
        target = "" if r["target"] is None else f"{r['target']:.1f}x, {verdict(r)}"
        lines.append(
            f"| | {r['frames']} | {r['batch']} | {r['keys']} | {r['dense_ms']:.3f} | "
            f"{r['gaze_ms']:.3f} | {r['gaze_kernel_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{r['ideal_bytes_ratio']:.2f}x | {100 * r['gaze_kernel_bandwidth_fraction']:.0f}% | "
            f"{target} |"
        )
    train = [r for r in payload["rows"] if r["kind"] == "train_fwd_bwd"]
    if train:
        lines += [
            "",
            "| training fwd+bwd | frames | tokens | dense ms | gaze ms | of which routing | "
            "speed-up | dense variant |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in train:
            target = "" if r["target"] is None else f" ({verdict(r)})"
            lines.append(
                f"| | {r['frames']} | {r['tokens']} | {r['dense_ms']:.2f} | {r['gaze_ms']:.2f} | "
                f"{r['gaze_routing_ms']:.2f} | {r['speedup']:.2f}x{target} | {r['dense_variant']} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--keep", type=float, default=0.16)
    parser.add_argument("--no-train", action="store_true", help="decode only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device on this machine (the kernels are tested on CPU")
        print("under TRITON_INTERPRET=1 for correctness only; run this on a GPU for timings).")
        return 0
    payload = run(args.frames, args.batch, getattr(torch, args.dtype), args.keep, not args.no_train)
    path = write_results("attention_gpu", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
