"""Non-finite losses do not train and are not published: a micro-batch whose loss is nan
(here: every label masked) is skipped and counted, ``train.max_nonfinite_in_a_row`` of them
in a row stop the run with a clear error, and weights that are not finite are never
checkpointed or exported.

A real DeepSpeed ZeRO-3 engine in this process (world size 1, gloo) runs the training loop's
own steps (``training.loop.run_steps``), as in ``test_steps``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.checkpointing import NonFiniteWeights, check_weights_finite
from training.config import load_config
from training.loop import NonFiniteLoss, _build_model, deepspeed_config, run_steps
from training.schedules import lr_lambda

IGNORE = -100


@pytest.fixture(scope="module")
def tiny_stock(tmp_path_factory):
    from gazeattn.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), gaze=False, image_size=48, patch_size=8)


def _engine(model_dir, max_steps: int, limit: int):
    import deepspeed

    sets = {
        "train.max_steps": max_steps,
        "train.micro_batch_size": 2,
        "train.max_nonfinite_in_a_row": limit,
        "model.visual_budget.frames_per_video": 1,
    }
    cfg = load_config("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    model, processor = _build_model(cfg, str(model_dir))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    return cfg, model, processor, engine, scheduler


def _batch(processor, name: str, masked: bool):
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(2):
        image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
        ]
        sample = processor.encode_sample(messages, images=[image])
        if masked:  # the answer cut away: nothing to learn from, the loss is 0 / 0
            sample.labels = np.full_like(sample.labels, IGNORE)
        samples.append(sample)
    return processor.collate(samples), [f"{name}{i}" for i in range(2)]


def _finite(model) -> bool:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return all(bool(torch.isfinite(p).all()) for p in params)


def test_a_nan_micro_batch_is_skipped_and_counted(distributed, tiny_stock):
    cfg, model, processor, engine, scheduler = _engine(tiny_stock, max_steps=3, limit=3)
    good, bad = _batch(processor, "good", False), _batch(processor, "bad", True)
    batches = iter([good, bad, good, bad, good])
    rows = [
        (step, row, result.sample_ids)
        for step, row, result in run_steps(cfg, engine, model, processor, scheduler, batches, 0)
    ]
    assert [step for step, _, _ in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for _, row, _ in rows)
    assert [row["nonfinite_skipped"] for _, row, _ in rows] == [0, 1, 2]
    # the skipped batches took no part in any step
    assert all(ids == ["good0", "good1"] for _, _, ids in rows)
    assert engine.global_steps == 3 and _finite(model)


def test_nonfinite_losses_in_a_row_stop_the_run(distributed, tiny_stock):
    cfg, model, processor, engine, scheduler = _engine(tiny_stock, max_steps=3, limit=2)
    good, bad = _batch(processor, "good", False), _batch(processor, "bad", True)
    batches = iter([good, bad, bad, bad, good, good])
    steps = run_steps(cfg, engine, model, processor, scheduler, batches, 0)
    assert next(steps)[0] == 1
    with pytest.raises(NonFiniteLoss, match=r"2 micro-batches in a row.*max_nonfinite_in_a_row"):
        next(steps)
    assert _finite(model)


def test_weights_that_are_not_finite_are_refused(distributed):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    check_weights_finite(model, "checkpoint")
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"not writing the checkpoint.*1\.weight"):
        check_weights_finite(model, "checkpoint")


class NanGradient(torch.autograd.Function):
    """The identity forward; a nan gradient backward (a finite loss, non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_updates_with_nonfinite_gradients_are_skipped_and_counted(distributed, tiny_stock):
    cfg, model, processor, engine, scheduler = _engine(tiny_stock, max_steps=4, limit=2)
    poison = {"on": False}

    def hook(module, args, output):
        return NanGradient.apply(output) if poison["on"] else output

    model.lm_head.register_forward_hook(hook)
    good = _batch(processor, "good", False)
    steps = run_steps(cfg, engine, model, processor, scheduler, iter([good] * 4), 0)
    assert next(steps)[1]["nonfinite_skipped"] == 0
    poison["on"] = True
    _, row, _ = next(steps)
    # the loss was finite; DeepSpeed found the gradients were not and skipped the update
    assert math.isfinite(row["loss"]) and row["nonfinite_skipped"] == 1
    assert not engine.was_step_applied() and _finite(model)
    with pytest.raises(NonFiniteLoss, match="non-finite gradients"):
        next(steps)
