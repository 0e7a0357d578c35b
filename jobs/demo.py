"""The README's first command: the main job on the embedded default.

For now (issue #2) it runs gaze attention on a tiny-model-sized random problem
and prints the visual KV entries attended against dense attention.
"""

from __future__ import annotations

import argparse

import torch

from gazeattn.ops import GazeConfig, Image, Video, build_layout, gaze_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--keep-ratio", type=float, default=0.16)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GazeConfig(keep_ratio=args.keep_ratio, backend="reference")
    layout = build_layout([[32, Image(24, 24), 16, Video(args.frames, 24, 24), 24]])
    heads, kv_heads, dim = 8, 2, 64
    q = torch.randn(1, heads, layout.length, dim)
    k = torch.randn(1, kv_heads, layout.length, dim)
    v = torch.randn(1, kv_heads, layout.length, dim)
    with torch.no_grad():
        _, prefill = gaze_attention(q, k, v, layout, config)
        _, decode = gaze_attention(q[:, :, -1:], k, v, layout, config)
    print(f"sequence: {layout.length} tokens, {int(layout.regions.count[0])} regions of up to 36")
    for name, stats in (("prefill (text queries)", prefill), ("decode step", decode)):
        print(
            f"{name:24s} visual KV entries per query: {stats.attended_mean():7.1f} gaze"
            f" vs {stats.dense_mean():7.1f} dense -> {100 * stats.savings():.1f}% fewer"
        )


if __name__ == "__main__":
    main()
