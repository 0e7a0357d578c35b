"""Batched evaluation over a Ray dataset of shard samples, with several model workers.

Input rows are the data pipeline's raw tar rows (``pipelines.dataset.TolerantWebDataset``:
``key``, ``url``, ``names``, ``blobs``). Each worker loads the model once, decodes its
rows with the pipeline's ``decode_sample`` (undecodable samples are skipped) and answers
whole batches; the driver gathers the per-sample results and computes the metrics.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from evaluation.data import sample_from_record
from evaluation.runner import (
    EvalConfig,
    EvalReport,
    EvalSample,
    SampleResult,
    configure,
    evaluate_batch,
    routing_layers,
    select_layers,
    summarise,
)
from gazeattn.modeling import routed_layer_ids


def row_sample(row: dict, frames_per_video: int) -> EvalSample | None:
    """A raw tar row -> an evaluation sample; None when the pipeline cannot decode it.

    Media keep their own size (the model's processor resizes them), so a record's target
    box, in its original pixels, frames the decoded media too."""
    from pipelines.decode import BadSample, decode_sample

    members = dict(zip(row["names"], row["blobs"], strict=True))
    try:
        decoded = decode_sample(members, frames=frames_per_video)
    except BadSample:
        return None
    return sample_from_record(
        decoded.record, list(decoded.images), [list(v) for v in decoded.videos]
    )


class EvalWorker:
    """A Ray Data actor: the model loaded once, a batch of decoded rows -> result rows."""

    def __init__(
        self,
        model_path: str,
        config: EvalConfig,
        frames_per_video: int | None = None,
        device: str = "cpu",
    ):
        from gazeattn.model import load_model

        self.model, self.processor = load_model(model_path, device=device)
        self.model.eval()
        self.config = config
        # the model's own frame budget (the one it was trained with) unless asked otherwise
        self.frames = frames_per_video or self.processor.visual_budget.frames_per_video
        configure(self.model, config)
        self.layers = routing_layers(self.model, config)

    def __call__(self, batch: dict) -> dict:
        import time

        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        samples = [s for s in (row_sample(row, self.frames) for row in rows) if s is not None]
        if not samples:
            return {"id": [], "result": [], "seconds": []}
        start = time.perf_counter()
        results = evaluate_batch(self.model, self.processor, samples, self.config, self.layers)
        seconds = time.perf_counter() - start
        return {
            "id": [r.id for r in results],
            "result": [json.dumps(dataclasses.asdict(r)) for r in results],
            "seconds": [seconds / len(results)] * len(results),
        }


def result_from_json(text: str) -> SampleResult:
    data = json.loads(text)
    # JSON object keys are strings: the per-layer dicts get their int layers back
    for key in ("hits", "random_hit", "routing"):
        data[key] = {int(k): v for k, v in data[key].items()}
    return SampleResult(**data)


def evaluate_dataset(
    dataset,
    model_path: str | Path,
    config: EvalConfig,
    *,
    frames_per_video: int | None = None,
    workers: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> EvalReport:
    """Evaluate every row of ``dataset`` with ``workers`` model actors; metrics on the driver."""
    import ray.data
    from transformers import AutoConfig

    device = "cuda" if num_gpus else "cpu"
    results = dataset.map_batches(
        EvalWorker,
        fn_constructor_args=(str(model_path), config, frames_per_video, device),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    ).take_all()
    samples = [result_from_json(str(row["result"])) for row in results]
    samples.sort(key=lambda r: r.id)
    # the layers measured follow from the model's config: no model on the driver
    hf = AutoConfig.from_pretrained(model_path)
    layers = select_layers(routed_layer_ids(hf, getattr(hf, "gaze_layers", None)), config)
    metrics = summarise(samples, layers)
    seconds = sum(float(row["seconds"]) for row in results)
    tokens = sum(r.completion_tokens for r in samples)
    metrics["eval/decode_tokens_per_s"] = tokens / seconds if seconds else 0.0
    return EvalReport(config=config, samples=samples, metrics=metrics, routing_layers=layers)
