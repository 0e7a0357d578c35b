"""ZeRO-3 with mixed batches on Qwen3-VL: two ranks that get a text-only, an image and a
timestamped-video batch in different orders in the same steps neither hang nor call the
vision tower (and its DeepStack mergers) a different number of times.

Two processes (gloo, world size 2) run the training loop's model (``training.loop._build_model``,
the tower and mergers trainable) under a real DeepSpeed ZeRO-3 engine; a rank whose tower
calls differed from the other's would wait for ever in ZeRO-3's parameter gathers, so the
test fails on a deadline rather than on gloo's 30-minute timeout.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.servers import free_port

pytestmark = pytest.mark.slow

DEADLINE_S = 120
# per rank, the kind of batch at each step: every step mixes kinds across the ranks
ORDERS = (("text", "image", "video"), ("video", "text", "image"))


def _batch(processor, kind: str, seed: int):
    from gazeattn.video import Clip

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(2):
        content, images, videos = [{"type": "text", "text": "Colour?"}], [], []
        if kind == "image":
            content.insert(0, {"type": "image"})
            images = [rng.integers(0, 256, (40 + 8 * i, 64, 3), dtype=np.uint8)]
        elif kind == "video":
            content.insert(0, {"type": "video"})
            frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
            videos = [Clip(frames=frames, fps=2.0)]
        messages = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": "red"},
        ]
        samples.append(processor.encode_sample(messages, images=images, videos=videos))
    return processor.collate(samples)


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    import deepspeed

    from training.config import load_config
    from training.loop import _build_model, deepspeed_config

    deepspeed.init_distributed("gloo")
    sets = {"train.micro_batch_size": 2, "model.freeze_vision": "false",
            "model.gradient_checkpointing": "false"}  # fmt: skip
    cfg = load_config("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    model, processor = _build_model(cfg, model_dir)
    calls = {"tower": 0, "deepstack": 0}
    visual = model.model.visual

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    visual.register_forward_hook(count("tower"))
    visual.deepstack_merger_list[0].register_forward_hook(count("deepstack"))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
    )
    losses = []
    for step, kind in enumerate(ORDERS[rank]):
        batch = _batch(processor, kind, seed=10 * rank + step)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"calls": calls, "losses": losses}, f)
    torch.distributed.destroy_process_group()


def test_mixed_text_image_video_batches_under_zero3(tmp_path):
    from gazeattn.tiny import build_stock

    model_dir = build_stock(tmp_path / "stock", family="qwen3-vl")
    context = mp.start_processes(
        _worker,
        args=(free_port(), str(model_dir), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {DEADLINE_S} s: a hang in ZeRO-3")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = len(ORDERS[0])
    for result in results:
        # one tower call per step, text-only steps included (a blank image), and the
        # DeepStack mergers with it
        assert result["calls"] == {"tower": steps, "deepstack": steps}
        assert all(np.isfinite(result["losses"]))
