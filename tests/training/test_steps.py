"""Step semantics: every schedule and interval counts optimizer steps, whatever grad_accum is.

A real DeepSpeed ZeRO-3 engine in this process (world size 1, gloo) runs the training loop's
own steps (``training.loop.run_steps``) on a fixed batch of 4 samples, either as one
micro-batch of 4 (grad_accum 1) or as 4 micro-batches of 1 (grad_accum 4).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from training.config import load_config
from training.loop import _build_model, deepspeed_config, run_steps
from training.schedules import lr_lambda

MAX_STEPS = 5


@pytest.fixture(scope="module")
def tiny_stock(tmp_path_factory):
    from gazeattn.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), gaze=False, image_size=48, patch_size=8)


def _config(grad_accum: int, micro: int):
    sets = {
        "train.max_steps": MAX_STEPS,
        "train.grad_accum": grad_accum,
        "train.micro_batch_size": micro,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "optim.schedule": "cosine",
        "model.gaze.keep_ratio": "null",
        "model.gaze.top_k": 2,
        # 9 regions per 6 x 6 image grid
        "model.gaze.region_size": "[1, 2, 2]",
        "top_k_schedule.warmup_steps": 3,
        "model.visual_budget.frames_per_video": 1,
    }
    return load_config("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()])


def _samples(processor) -> list[dict]:
    """Four images with the same question and answer: the same number of label tokens, so the
    mean of the micro-batch means equals the batch's token mean."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
        ]
        sample = processor.encode_sample(messages, images=[image])
        sample.sample_id = f"s{i}"
        out.append(sample)
    lengths = {int((s.labels >= 0).sum()) for s in out}
    assert len(lengths) == 1, f"the answers must have the same number of tokens, got {lengths}"
    return out


def _run(model_dir, grad_accum: int, micro: int):
    import deepspeed

    cfg = _config(grad_accum, micro)
    torch.manual_seed(0)
    model, processor = _build_model(cfg, str(model_dir))
    samples = _samples(processor)
    batches = itertools.cycle(
        [
            (processor.collate(samples[i : i + micro]), [s.sample_id for s in samples[i : i + micro]])
            for i in range(0, 4, micro)
        ]
    )  # fmt: skip
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    rows = [
        (step, row) for step, row, _ in run_steps(cfg, engine, model, processor, scheduler, batches, 0)
    ]  # fmt: skip
    return cfg, rows, engine


def test_grad_accum_counts_optimizer_steps(distributed, tiny_stock):
    cfg, whole, engine_whole = _run(tiny_stock, grad_accum=1, micro=4)
    _, accum, engine_accum = _run(tiny_stock, grad_accum=4, micro=1)

    # max_steps optimizer steps each: 5 with one micro-batch, 20 micro-batches with four
    assert [s for s, _ in whole] == [s for s, _ in accum] == list(range(1, MAX_STEPS + 1))
    assert engine_whole.global_steps == engine_accum.global_steps == MAX_STEPS
    assert engine_accum.micro_steps == 4 * MAX_STEPS

    # the LR per optimizer step: warm-up over 2 steps, then the cosine reaches its floor at
    # max_steps, the same with both; and what lr_lambda says
    scale = lr_lambda(cfg)
    expected = [cfg.optim.lr * scale(step) for step in range(MAX_STEPS)]
    for rows in (whole, accum):
        assert [r["lr"] for _, r in rows] == pytest.approx(expected, rel=1e-9)
    assert expected[0] == pytest.approx(cfg.optim.lr / 2) and expected[1] == cfg.optim.lr
    assert scale(MAX_STEPS) == pytest.approx(0.1)

    # the progressive Top-K budget per optimizer step: dense at step 0, the target (2) from
    # top_k_schedule.warmup_steps (3) on
    budgets = [r["top_k"] for _, r in whole]
    assert budgets == [r["top_k"] for _, r in accum]
    assert budgets[0] > budgets[1] > budgets[2] > 2 and budgets[3:] == [2.0, 2.0]

    # the same updates: the loss curve of 4 x 1 accumulated equals 1 x 4
    losses = [r["loss"] for _, r in whole]
    assert [r["loss"] for _, r in accum] == pytest.approx(losses, rel=2e-4, abs=1e-5)
    assert losses[-1] < losses[0], f"the fixed batch was not learnt: {losses}"
    assert not math.isclose(losses[1], losses[0]), "the first update changed nothing"
