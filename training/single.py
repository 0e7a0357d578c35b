"""Training in one process with plain torch: the tiny checkpoint's pretraining and the recipe
search (``bench/recipe.py``).

The same model construction, global batch, LR schedule and progressive Top-K schedule as the
fine-tuning job (``training.loop``), without Ray or DeepSpeed: a setting costs a minute or
two instead of a demo run. The samples are the generated records encoded as the data
pipeline encodes them (``GazeProcessor.encode_sample``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gazeattn.sample import EncodedSample
from training.config import FinetuneConfig


def encode_records(data: Path, split: str, processor, max_length: int) -> list[EncodedSample]:
    """Every record of ``data/{split}.json`` (the synthetic generator's output) encoded."""
    import numpy as np
    from PIL import Image

    from evaluation.data import read_video
    from pipelines.conversation import to_messages

    records = json.loads((data / f"{split}.json").read_text())
    out = []
    for r in records:
        images = (
            [np.asarray(Image.open(data / "media" / r["image"]).convert("RGB"))]
            if r.get("image")
            else []
        )
        videos = [read_video(data / "media" / r["video"])] if r.get("video") else []
        messages = to_messages(r["conversations"])
        out.append(processor.encode_sample(messages, images, videos, max_length=max_length))
    return out


def global_batch(cfg: FinetuneConfig) -> int:
    """Samples per optimizer step of the distributed job this run stands in for."""
    return cfg.train.micro_batch_size * cfg.scaling.num_workers * cfg.train.grad_accum


def train(
    cfg: FinetuneConfig,
    model,
    processor,
    samples: list[EncodedSample],
    *,
    log_every: int = 50,
) -> list[float]:
    """``cfg.train.max_steps`` AdamW steps over ``samples`` (a new permutation per pass, seeded
    by ``train.seed``) under the job's LR and progressive Top-K schedules
    (``training.schedules``, a loss-started one included); returns the loss of every step,
    with a progress line every ``log_every`` steps."""
    from training.schedules import TopKClock, apply_top_k, lr_lambda

    batch = global_batch(cfg)
    clock = TopKClock.start(cfg.top_k_schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.train.max_steps):
        apply_top_k(cfg, model, clock.progress(step))
        if len(order) < batch:
            order += torch.randperm(len(samples), generator=generator).tolist()
        picked, order = order[:batch], order[batch:]
        loss = model(**processor.collate([samples[i] for i in picked])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(float(loss.detach()))
        if clock.observe(step + 1, losses[-1]):
            print(
                f"  step {step + 1}: the loss reached the schedule's start; K shrinks", flush=True
            )
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(
                f"  step {step + 1}/{cfg.train.max_steps} loss {recent:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return losses
