"""Evaluate a gaze model on samples: greedy answers, accuracy, entries, FLOPs, routing hit rate.

Samples are plain records (``EvalSample``): prompt messages, media, the reference
answer and, when known, where the evidence is (``target_box``/``target_frame``).
The Ray Data layer (``evaluation.ray_eval``) produces the same records from shards.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from evaluation import metrics
from gazeattn.generation import GenerationRequest, GenerationResult, generate_batch
from gazeattn.model import gaze_module
from gazeattn.modeling import routed_layers
from gazeattn.ops import kv_savings
from gazeattn.ops.config import GazeConfig, at_budget, dense_twin
from gazeattn.typed_config import Settings


@dataclass(kw_only=True)
class EvalSample:
    """One question: prompt ``messages`` (no assistant turn) with image/video parts, and its answer."""

    id: str
    messages: list[dict]
    answer: str
    images: Sequence[Any] = ()
    videos: Sequence[Sequence[Any]] = ()
    options: list[str] | None = None
    target_box: list[float] | None = None  # [x0, y0, x1, y1] pixels of the original media
    target_frame: int | None = None
    image_size: list[int] | None = None  # (w, h) of the original media; default: from the array

    @property
    def question(self) -> str:
        """The text of the last user turn that has text (a turn of media only, such as the
        image's turn after a question asked first, has none)."""
        texts = [_text_of(m["content"]) for m in self.messages if m["role"] == "user"]
        return next((t for t in reversed(texts) if t), "")

    def media_size(self) -> tuple[int, int]:
        if self.image_size:
            return int(self.image_size[0]), int(self.image_size[1])
        first = self.images[0] if self.images else self.videos[0][0]
        array = np.asarray(first)
        return int(array.shape[1]), int(array.shape[0])


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text").strip()


def question_sample(
    id: str, question: str, answer: str, *, images=(), videos=(), options=None, **fields
) -> EvalSample:
    """A one-turn sample: media parts first, then the question (and lettered options)."""
    text = question
    if options:
        text += "\n" + "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
    parts = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return EvalSample(
        id=id,
        messages=messages,
        answer=answer,
        images=list(images),
        videos=[list(v) for v in videos],
        options=options,
        **fields,
    )


class EvalConfig(Settings):
    """How to evaluate. At most one budget (``top_k`` or ``keep_ratio``), or ``attn="dense"``
    (the model's dense twin, ``gazeattn.ops.config.dense_twin``); with neither, the model's own
    configured budget is used."""

    attn: Literal["gaze", "dense"] = "gaze"
    top_k: int | Literal["all"] | None = None
    keep_ratio: float | None = Field(None, gt=0, le=1)
    # the same budget routed to pseudo-random regions with this seed (an ablation: how much
    # of the accuracy depends on where the model looks)
    random_routing_seed: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    routing_layers: list[int] | None = None  # None: every gaze layer
    pictures: int = Field(4, ge=0)  # gaze pictures for the first N samples
    picture_tokens: int = Field(6, ge=1)  # generated tokens shown per picture

    @model_validator(mode="after")
    def _one_budget(self) -> EvalConfig:
        if self.top_k is not None and self.keep_ratio is not None:
            raise ValueError("give at most one of top_k and keep_ratio")
        if isinstance(self.top_k, int) and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or 'all', got {self.top_k!r}")
        if self.attn == "dense" and (self.top_k is not None or self.keep_ratio is not None):
            raise ValueError("attn='dense' takes no gaze budget")
        if self.attn == "dense" and self.random_routing_seed is not None:
            raise ValueError("attn='dense' routes nothing: random_routing_seed needs gaze")
        return self

    @property
    def label(self) -> str:
        if self.attn == "dense":
            return "dense"
        if self.top_k is not None:
            label = f"gaze-top{self.top_k}"
        elif self.keep_ratio is not None:
            label = f"gaze-keep{self.keep_ratio:g}"
        else:
            label = "gaze-model-budget"
        if self.random_routing_seed is not None:
            label += "-random"
        return label

    def params(self) -> dict[str, Any]:
        return {f"eval.{k}": v for k, v in self.model_dump().items()}


@dataclass(kw_only=True)
class SampleResult:
    id: str
    prediction: str
    answer: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    attended_mean: float
    dense_mean: float
    flops_ratio: float
    # per routing layer: per generated token, whether the routed regions overlap the target
    hits: dict[int, list[bool]] = field(default_factory=dict)
    random_hit: dict[int, float] = field(default_factory=dict)  # per layer: random baseline
    routing: dict[int, list[list[dict]]] = field(default_factory=dict)
    grids: list[list[int]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class EvalReport:
    config: EvalConfig
    samples: list[SampleResult]
    metrics: dict[str, float]
    routing_layers: list[int]


def eval_gaze_config(base: GazeConfig, config: EvalConfig) -> GazeConfig:
    """The model's gaze settings ``base`` as this evaluation asks: dense, at a budget, with
    random routing, or as they are."""
    seed = config.random_routing_seed
    if config.attn == "dense":
        return dense_twin(base)
    if config.top_k is not None or config.keep_ratio is not None:
        return at_budget(
            base, top_k=config.top_k, keep_ratio=config.keep_ratio, random_routing_seed=seed
        )
    if seed is not None:
        return at_budget(
            base, top_k=base.top_k, keep_ratio=base.keep_ratio, random_routing_seed=seed
        )
    return base


def configure(model, config: EvalConfig) -> None:
    """Set the model's attention for this evaluation (a model loaded for it alone)."""
    inner = gaze_module(model)
    inner.gaze_config = eval_gaze_config(inner.gaze_config, config)


def routing_layers(model, config: EvalConfig) -> list[int]:
    """The decoder layers whose routing is measured (gaze layers only; none for dense)."""
    inner = gaze_module(model)
    if inner.gaze_config.backend == "dense":  # evaluated dense, or a dense-twin model
        return []
    return select_layers(routed_layers(model), config)


def select_layers(layers: list[int], config: EvalConfig) -> list[int]:
    """``config.routing_layers`` checked against the model's routing layers (all when None)."""
    if config.attn == "dense":
        return []
    if config.routing_layers is None:
        return layers
    bad = [layer for layer in config.routing_layers if layer not in layers]
    if bad:
        raise ValueError(f"routing layers {bad} are not gaze layers of this model ({layers})")
    return list(config.routing_layers)


def routing_heads(model) -> int:
    inner = gaze_module(model)
    text = inner.config.text_config
    if inner.gaze_config.routing == "query_head":
        return text.num_attention_heads
    return text.num_key_value_heads


def evaluate_samples(
    model, processor, samples: Iterable[EvalSample], config: EvalConfig
) -> EvalReport:
    """Greedy answers for every sample (batched) and the metrics over them; the model's own
    gaze settings are back when it returns (a sweep's points, a training run's checks)."""
    with evaluated_as(model, config):
        return _evaluate(model, processor, samples, config)


@contextmanager
def evaluated_as(model, config: EvalConfig):
    """The model's gaze settings as ``config`` asks inside the block, its own again after."""
    inner = gaze_module(model)
    own = inner.gaze_config
    inner.gaze_config = eval_gaze_config(own, config)
    try:
        yield model
    finally:
        inner.gaze_config = own


def _evaluate(model, processor, samples: Iterable[EvalSample], config: EvalConfig) -> EvalReport:
    layers = routing_layers(model, config)
    results: list[SampleResult] = []
    gen_time, gen_tokens = 0.0, 0
    batch: list[EvalSample] = []
    for sample in [*samples, None]:
        if sample is not None:
            batch.append(sample)
            if len(batch) < config.batch_size:
                continue
        if not batch:
            break
        start = time.perf_counter()
        rows = evaluate_batch(model, processor, batch, config, layers)
        gen_time += time.perf_counter() - start
        gen_tokens += sum(r.completion_tokens for r in rows)
        results.extend(rows)
        batch = []
    summary = summarise(results, layers)
    summary["eval/decode_tokens_per_s"] = gen_tokens / gen_time if gen_time > 0 else 0.0
    return EvalReport(config=config, samples=results, metrics=summary, routing_layers=layers)


def evaluate_batch(
    model, processor, batch: list[EvalSample], config: EvalConfig, layers: list[int]
) -> list[SampleResult]:
    """One batch: the answers (routing of the first layer), then routing of each further layer."""
    requests = [
        GenerationRequest(
            messages=s.messages,
            images=s.images,
            videos=s.videos,
            max_new_tokens=config.max_new_tokens,
        )
        for s in batch
    ]
    first = layers[0] if layers else -1
    outputs = generate_batch(
        model, processor, requests, return_routing=bool(layers), routing_layer=first
    )
    routing = {first: [o.routing for o in outputs]} if layers else {}
    for layer in layers[1:]:
        # greedy decoding is deterministic: the same tokens, routing read at another layer
        again = generate_batch(model, processor, requests, return_routing=True, routing_layer=layer)
        routing[layer] = [o.routing for o in again]
    inner = gaze_module(model)
    return [
        _score(
            s,
            o,
            {layer: routing[layer][i] for layer in layers},
            inner,
            processor,
            routing_heads(model),
        )
        for i, (s, o) in enumerate(zip(batch, outputs, strict=True))
    ]


def _score(
    sample: EvalSample, out: GenerationResult, routing: dict, inner, processor, heads: int
) -> SampleResult:
    gaze = inner.gaze_config
    regions = metrics.region_count(out.grids, gaze.region_size)
    # the step that produced the end token is routed too; keep one entry per answer token
    keep = max(1, out.completion_tokens)
    routing = {layer: steps[:keep] for layer, steps in routing.items()}
    attended = out.attended_mean
    result = SampleResult(
        id=sample.id,
        prediction=out.text,
        answer=sample.answer,
        correct=metrics.is_correct(out.text, sample.answer, sample.options),
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        attended_mean=attended,
        dense_mean=out.dense_mean,
        flops_ratio=metrics.attention_flops_ratio(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            attended_mean=attended,
            dense_mean=out.dense_mean,
            regions=regions,
        ),
        routing=routing,
        grids=out.grids,
        tokens=[processor.decode([t]) for t in out.token_ids],
    )
    if sample.target_box is not None and out.grids and routing:
        span = _target_span(sample)
        target = metrics.target_in_grid(
            sample.target_box,
            sample.media_size(),
            out.grids[span],
            span=span,
            frame=sample.target_frame,
        )
        in_target = metrics.target_regions(out.grids, gaze.region_size, target)
        k = gaze.budget(regions)
        for layer, per_token in routing.items():
            result.hits[layer] = metrics.token_hits(per_token, target)
            result.random_hit[layer] = metrics.random_hit_probability(regions, in_target, k, heads)
    return result


def _target_span(sample: EvalSample) -> int:
    """The visual span holding the target: the video's when the target has a frame, else the first."""
    if sample.target_frame is not None and sample.videos:
        return len(sample.images)
    return 0


def summarise(results: list[SampleResult], layers: list[int]) -> dict[str, float]:
    """The documented metric names (see evaluation/__init__.py)."""
    n = len(results)
    tokens = sum(r.completion_tokens for r in results)

    def token_mean(values: list[float]) -> float:
        # per decode step: an answer that is only the end token still took (and routed) one
        weights = [max(1, r.completion_tokens) for r in results]
        total = sum(weights)
        return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0

    attended = token_mean([r.attended_mean for r in results])
    dense = token_mean([r.dense_mean for r in results])
    out = {
        "eval/samples": float(n),
        "eval/accuracy": sum(r.correct for r in results) / n if n else 0.0,
        "eval/generated_tokens": float(tokens),
        "eval/visual_entries_per_token": attended,
        "eval/dense_entries_per_token": dense,
        "eval/entries_ratio": attended / dense if dense else 1.0,
        "eval/kv_savings_pct": 100.0 * kv_savings(attended, dense),
        "eval/attention_flops_ratio": token_mean([r.flops_ratio for r in results]),
    }
    hit_rates, baselines = [], []
    for layer in layers:
        hits = [h for r in results for h in r.hits.get(layer, [])]
        if not hits:
            continue
        base = [r.random_hit[layer] for r in results for _ in r.hits.get(layer, [])]
        out[f"eval/routing_hit_rate/layer_{layer}"] = sum(hits) / len(hits)
        out[f"eval/routing_hit_rate_random/layer_{layer}"] = sum(base) / len(base)
        hit_rates.append(sum(hits) / len(hits))
        baselines.append(sum(base) / len(base))
    if hit_rates:
        out["eval/routing_hit_rate"] = metrics.mean(hit_rates)
        out["eval/routing_hit_rate_random"] = metrics.mean(baselines)
        out["eval/routing_samples"] = float(sum(bool(r.hits) for r in results))
    return out


def prompt_word_hits(
    model,
    processor,
    samples: Sequence[EvalSample],
    words: Sequence[str | None],
    config: EvalConfig | None = None,
) -> dict[int, float]:
    """Where the prompt looks: per gaze layer, the share of samples whose word ``words[i]``
    (any of its tokens after the image, any routing head) routes to the sample's target cell,
    under ``config``'s budget and routing (default: the model's own); samples without a word,
    an image or that word in their prompt are skipped.

    The table's hit rate is measured at the generated tokens; a question's own words route
    too, and a word that names what to look for ("red") can find it there, its output
    carrying what it saw to the answer."""
    with evaluated_as(model, config or EvalConfig()):
        return _word_hits(model, processor, samples, words)


def _word_hits(model, processor, samples, words) -> dict[int, float]:
    hits: dict[int, list[bool]] = {}
    for sample, word in zip(samples, words, strict=True):
        if word is None or not sample.images or sample.target_box is None:
            continue
        messages = [*sample.messages, {"role": "assistant", "content": sample.answer}]
        batch = processor.collate([processor.encode_sample(messages, sample.images)])
        ids = batch["input_ids"][0].tolist()
        layout = batch["gaze_layout"]
        where = _word_positions(ids, processor.tokenizer, word, int(layout.regions.last[0].max()))
        if not where:
            continue
        target = metrics.target_in_grid(sample.target_box, sample.media_size(),
                                        layout.spans[0][0].grid)  # fmt: skip
        with torch.no_grad():
            out = model(**batch, gaze_report=True, gaze_selection=True)
        for layer, report in out.gaze_report.items():
            chosen = report.selected[0][:, where].flatten()
            boxes = layout.regions.box[0][chosen[chosen >= 0]]
            hits.setdefault(layer, []).append(any(metrics.box_hits(b, target) for b in boxes))
    return {layer: sum(v) / len(v) for layer, v in sorted(hits.items()) if v}


def _word_positions(ids: list[int], tokenizer, word: str, after: int) -> list[int]:
    """The token positions of `` word`` (as the tokenizer splits it inside a sentence) at its
    first occurrence past position ``after``; [] when it is not there."""
    piece = tokenizer.encode(" " + word, add_special_tokens=False)
    for start in range(after + 1, len(ids) - len(piece) + 1):
        if ids[start : start + len(piece)] == piece:
            return list(range(start, start + len(piece)))
    return []


def colour_words(samples: Sequence[EvalSample]) -> list[str | None]:
    """The colour each grid question of the kind "what shape is the red one?" names (None for
    other questions): the word ``prompt_word_hits`` follows."""
    from pipelines.synthetic import COLOURS

    return [next((c for c in COLOURS if f"the {c} one" in s.question), None) for s in samples]
