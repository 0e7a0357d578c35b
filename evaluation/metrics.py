"""Evaluation metrics: answer accuracy, visual KV entries and FLOPs, routing hit rate.

Coordinates: a sample's ``target_box`` is ``[x0, y0, x1, y1]`` in pixels of the
original image (end exclusive), ``target_frame`` the frame of a video that holds it.
The processor resizes every image/frame to a square of ``grid x grid`` tokens, so a
pixel box maps to the token grid by scaling each axis by ``grid / size``. Routed
regions come from ``GenerationResult.routing``: ``[span, t0, t1, h0, h1, w0, w1]``
in token-grid coordinates, end exclusive.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
# British/American spellings the synthetic data and the model may mix
_SYNONYMS = {"center": "centre", "color": "colour", "gray": "grey"}


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces, one spelling per word."""
    words = _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()
    return " ".join(_SYNONYMS.get(w, w) for w in words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(answer)


def majority_share(answers: Sequence[str]) -> float:
    """The accuracy of always giving the most frequent (normalised) answer: the bar a model
    that ignores its input can reach."""
    if not answers:
        return 0.0
    counts: dict[str, int] = {}
    for answer in answers:
        key = normalise_answer(answer)
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values()) / len(answers)


_LETTER = re.compile(r"^\(?([A-Za-z])[\).:]?(\s|$)")


def choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a prediction picks: a leading "B", "(B)", "B." or the option's text."""
    text = prediction.strip()
    match = _LETTER.match(text)
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    for letter, option in zip(letters, options, strict=True):
        if normalise_answer(text) == normalise_answer(option):
            return letter
    return None


def is_correct(prediction: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """Multiple-choice letter match when ``options`` are given, else normalised exact match.

    With options, ``answer`` is the correct letter or the correct option's text.
    """
    if not options:
        return exact_match(prediction, answer)
    gold = choice_letter(answer, options)
    return gold is not None and choice_letter(prediction, options) == gold


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of ``correct`` out of ``n`` (z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0% and 100%."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- visual KV entries and attention FLOPs


def region_count(grids: Sequence[Sequence[int]], region_size: Sequence[int]) -> int:
    """Number of gaze regions of a sample whose visual spans have ``grids`` (t, h, w)."""
    rt, rh, rw = region_size
    return sum(-(-t // rt) * -(-h // rh) * -(-w // rw) for t, h, w in grids)


def attention_flops_ratio(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    attended_mean: float,
    dense_mean: float,
    regions: int,
) -> float:
    """Decode attention FLOPs of gaze over dense, per generated token, averaged over the answer.

    Attention FLOPs are proportional to the keys a query reads. Dense reads every key;
    gaze reads the text keys, the attended visual entries, and the ``regions`` region
    descriptors it scores to route (one GEMV, same cost per element as a key).
    """
    if completion_tokens <= 0:
        return 1.0
    keys = prompt_tokens + (completion_tokens - 1) / 2  # mean keys over the decode steps
    gaze = keys - dense_mean + attended_mean + (regions if attended_mean < dense_mean else 0)
    return gaze / keys


# ---- routing hit rate


@dataclass(frozen=True, kw_only=True)
class Target:
    """The answer's evidence in token-grid coordinates of one visual span."""

    span: int
    frame: int | None  # None: any frame (an image has one)
    h0: int
    h1: int
    w0: int
    w1: int


def target_in_grid(
    target_box: Sequence[float],
    image_size: Sequence[int],
    grid: Sequence[int],
    *,
    span: int = 0,
    frame: int | None = None,
) -> Target:
    """Map a pixel box [x0, y0, x1, y1] of an image of ``image_size`` (w, h) to grid cells.

    ``grid`` is the span's (t, h, w) token grid. Every cell the box touches is part of
    the target (a cell is hit when the pixel box overlaps it at all).
    """
    x0, y0, x1, y1 = (float(v) for v in target_box)
    width, height = image_size
    _, gh, gw = grid
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"target_box {list(target_box)} is not inside an image of {image_size}")
    return Target(
        span=span,
        frame=frame,
        h0=math.floor(y0 * gh / height),
        h1=math.ceil(y1 * gh / height),
        w0=math.floor(x0 * gw / width),
        w1=math.ceil(x1 * gw / width),
    )


def box_hits(box: Sequence[int], target: Target) -> bool:
    """Whether a routed region [span, t0, t1, h0, h1, w0, w1] overlaps the target."""
    span, t0, t1, h0, h1, w0, w1 = (int(v) for v in box)
    if span != target.span:
        return False
    if target.frame is not None and not t0 <= target.frame < t1:
        return False
    return h0 < target.h1 and target.h0 < h1 and w0 < target.w1 and target.w0 < w1


def token_hits(routing: Sequence[Sequence[dict]], target: Target) -> list[bool]:
    """Per generated token: whether any routed region (of any head) overlaps the target."""
    return [any(box_hits(r["box"], target) for r in regions) for regions in routing]


def target_regions(
    grids: Sequence[Sequence[int]], region_size: Sequence[int], target: Target
) -> int:
    """How many regions of the layout overlap the target (the random baseline's numerator)."""
    rt, rh, rw = region_size
    t, h, w = grids[target.span]
    count = 0
    for t0 in range(0, t, rt):
        for h0 in range(0, h, rh):
            for w0 in range(0, w, rw):
                box = (target.span, t0, min(t0 + rt, t), h0, min(h0 + rh, h), w0, min(w0 + rw, w))
                count += box_hits(box, target)
    return count


def random_hit_probability(regions: int, target_regions: int, k: int, heads: int) -> float:
    """P(at least one of ``heads`` independent uniform picks of ``k`` of ``regions`` hits a target).

    The routing heads of one layer each pick ``k`` regions; a token hits when the
    union of their picks overlaps the target.
    """
    if regions <= 0 or target_regions <= 0 or k <= 0:
        return 0.0
    k = min(k, regions)
    miss_one = math.comb(regions - target_regions, k) / math.comb(regions, k)
    return 1.0 - miss_one**heads


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
