"""Per-step training metrics: loss, throughput, KV savings per layer, routing entropy."""

from __future__ import annotations

import math

import torch

from gazeattn.model import LayerReport
from gazeattn.ops import kv_savings


def routing_entropy(report: LayerReport, num_regions: int) -> float:
    """Normalised entropy (0..1) of how often each region was selected over queries and heads.

    1 means selections spread evenly over the regions; near 0 means a few regions take all.
    """
    if report.selected is None or num_regions < 2:
        return 0.0
    ids = report.selected[report.selected >= 0]
    if ids.numel() == 0:
        return 0.0
    counts = torch.bincount(ids.flatten(), minlength=num_regions).float()
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(num_regions))


def step_metrics(
    loss: float,
    batches: list[dict],
    seconds: float,
    world_size: int,
    lr: float,
    reports: dict[int, LayerReport] | None,
    top_k: float | None,
) -> dict[str, float]:
    """One optimizer step's metrics over its micro-``batches`` (throughput scaled by the number
    of ranks, which see equal batches); ``loss`` is the mean of the micro-batch losses and
    ``reports`` the gaze reports of the last micro-batch."""
    tokens = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        for b in batches
    )
    samples = sum(b["input_ids"].shape[0] for b in batches)
    batch = batches[-1]
    row = {
        "loss": loss,
        "lr": lr,
        "step_seconds": seconds,
        "tokens_per_s": world_size * tokens / seconds,
        "samples_per_s": world_size * samples / seconds,
    }
    if top_k is not None:
        row["top_k"] = float(top_k)
    if reports:
        layout = batch["gaze_layout"]
        num_regions = int(layout.regions.count.max()) if layout.max_regions else 0
        attended = [r.attended_mean for r in reports.values()]
        dense = [r.dense_mean for r in reports.values()]
        row["visual_attended"] = sum(attended) / len(attended)
        row["visual_dense"] = sum(dense) / len(dense)
        row["kv_savings_pct"] = 100.0 * kv_savings(row["visual_attended"], row["visual_dense"])
        entropies = []
        for layer, report in reports.items():
            row[f"kv_savings_pct.layer_{layer}"] = 100.0 * report.savings
            entropies.append(routing_entropy(report, num_regions))
            row[f"routing_entropy.layer_{layer}"] = entropies[-1]
        row["routing_entropy"] = sum(entropies) / len(entropies)
    return row
