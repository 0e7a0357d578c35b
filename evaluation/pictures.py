"""Gaze pictures: the image (or frames) with the regions routed for each generated token.

One PNG per answer: a row per layer, a column per generated token; each panel shows
the media with the routed regions (line width by the number of heads that chose
them) and the target box dashed, the question and the answer as captions.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from evaluation.runner import EvalSample, SampleResult  # noqa: E402

PANEL_INCHES = 1.8  # one image/frame
HEADER_INCHES = 0.7  # question and answer
DPI = 100


def picture_layout(sample: EvalSample, result: SampleResult, layers: Sequence[int], tokens: int):
    """(rows, columns, frames per panel) of the picture of one answer."""
    columns = max(1, min(tokens, len(next(iter(result.routing.values()), [[]]))))
    frames = sum(len(v) for v in sample.videos) + len(sample.images)
    return max(1, len(layers)), columns, max(1, frames)


def expected_size(
    sample: EvalSample, result: SampleResult, layers: Sequence[int], tokens: int
) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``draw_gaze`` writes for these arguments."""
    rows, columns, frames = picture_layout(sample, result, layers, tokens)
    width = round(columns * frames * PANEL_INCHES * DPI)
    height = round((rows * PANEL_INCHES + HEADER_INCHES) * DPI)
    return width, height


def _frames(sample: EvalSample) -> list[tuple[int, int, np.ndarray]]:
    """(span, frame, HWC uint8) for every image and video frame, in processor order."""
    out = [(i, 0, np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img))
           for i, img in enumerate(sample.images)]  # fmt: skip
    for j, video in enumerate(sample.videos):
        span = len(sample.images) + j
        out += [(span, t, np.asarray(frame)) for t, frame in enumerate(video)]
    return [(s, t, a if a.ndim == 3 else np.stack([a] * 3, -1)) for s, t, a in out]


def draw_gaze(
    sample: EvalSample,
    result: SampleResult,
    out_path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    tokens: int = 6,
) -> Path:
    """Write the gaze picture of one answer to ``out_path`` (PNG); returns the path."""
    layers = list(layers if layers is not None else result.routing)
    rows, columns, n_frames = picture_layout(sample, result, layers, tokens)
    width, height = expected_size(sample, result, layers, tokens)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    top = 1 - HEADER_INCHES * DPI / height
    frames = _frames(sample)
    for row, layer in enumerate(layers or [None]):
        steps = result.routing.get(layer, []) if layer is not None else []
        for col in range(columns):
            regions = steps[col] if col < len(steps) else []
            for f, (span, t, image) in enumerate(frames):
                left = (col * n_frames + f) / (columns * n_frames)
                ax = fig.add_axes(
                    (left, top - (row + 1) * top / rows, 1 / (columns * n_frames), top / rows)
                )
                _panel(ax, sample, result, image, span, t, regions)
                if f == 0 and col == 0:
                    ax.text(2, 2, f"layer {layer}", color="white", fontsize=7, va="top",
                            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1})  # fmt: skip
                if row == 0 and f == 0 and col < len(result.tokens):
                    ax.set_title(repr(result.tokens[col]), fontsize=7, pad=2)
    for col in range(1, columns):
        x = col / columns
        fig.add_artist(plt.Line2D([x, x], [0, top], color="white", linewidth=4))
    verdict = "correct" if result.correct else f"expected: {sample.answer}"
    caption = (
        textwrap.shorten("Q: " + sample.question, 140)
        + "\n"
        + textwrap.shorten(f"A: {result.prediction}  ({verdict})", 140)
    )
    fig.text(0.01, 1 - 0.05 * DPI / height, caption, fontsize=8, va="top", wrap=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    plt.close(fig)
    return out_path


def _panel(ax, sample, result, image, span, t, regions) -> None:
    ax.imshow(image, interpolation="nearest", aspect="auto")  # as the model sees it: square
    ax.set_xticks([])
    ax.set_yticks([])
    h, w = image.shape[:2]
    grid = result.grids[span] if span < len(result.grids) else [1, 1, 1]
    sy, sx = h / grid[1], w / grid[2]
    most = max((r["heads"] for r in regions), default=1)
    for r in regions:
        s, t0, t1, h0, h1, w0, w1 = r["box"]
        if s != span or not t0 <= t < t1:
            continue
        ax.add_patch(
            Rectangle(
                (w0 * sx - 0.5, h0 * sy - 0.5),
                (w1 - w0) * sx,
                (h1 - h0) * sy,
                fill=True,
                facecolor=(1.0, 0.85, 0.0, 0.25),
                edgecolor=(1.0, 0.85, 0.0),
                linewidth=0.8 + 2.0 * r["heads"] / most,
            )
        )
    target_span = len(sample.images) if sample.target_frame is not None and sample.videos else 0
    if (
        sample.target_box is not None
        and span == target_span
        and (sample.target_frame is None or sample.target_frame == t)
    ):
        bw, bh = sample.media_size()
        x0, y0, x1, y1 = sample.target_box
        ax.add_patch(
            Rectangle(
                (x0 * w / bw - 0.5, y0 * h / bh - 0.5),
                (x1 - x0) * w / bw,
                (y1 - y0) * h / bh,
                fill=False,
                edgecolor="lime",
                linestyle="--",
                linewidth=1.2,
            )
        )
    if sample.videos and span >= len(sample.images):
        ax.text(2, h - 2, f"frame {t}", color="white", fontsize=6, va="bottom",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1})  # fmt: skip
