"""The demo's recipe search: which settings let the tiny gaze model learn to look on CPU.

Trains the demo's model (configs/demo.yaml, with ``--set`` overrides) on the demo's grid
task in one process with plain torch AdamW: the same model construction, global batch, LR
schedule and progressive Top-K schedule as the fine-tuning job (``training.loop``), without
Ray or DeepSpeed, so that one setting costs a minute or two instead of a demo run. Then
scores held-out samples with the evaluation job's own code (``evaluation.runner``): accuracy,
visual entries per token and the routing hit rate against random routing. One run per call;
one JSON line per run is appended to ``--log``.

Run: python bench/recipe.py --name base [--set optim.lr=1e-2 ...] [--layers 1] [--eval 300]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.data import load_json, read_video  # noqa: E402
from evaluation.runner import EvalConfig, evaluate_samples  # noqa: E402
from pipelines.conversation import to_messages  # noqa: E402
from training.config import load_config  # noqa: E402


def train_samples(data: Path, processor, max_length: int) -> list[dict]:
    """Every training record of ``data`` encoded as the data pipeline would."""
    import numpy as np
    from PIL import Image

    records = json.loads((data / "train.json").read_text())
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


def build(cfg, root: Path, layers: list[int] | None):
    """The model the job's workers would train (stock tiny model converted as the driver does)."""
    from gazeattn.adapters import freeze
    from gazeattn.model import convert_to_gaze, load_model
    from gazeattn.tiny import build_stock

    stock = build_stock(root / "stock", **cfg.model.tiny_options)  # as training.trainer
    model, processor = load_model(stock)
    model, processor = convert_to_gaze(
        model,
        processor,
        cfg.model.gaze_config(),
        layers=layers,
        context_init=cfg.model.context_init,
    )
    processor.with_budget(cfg.model.visual_budget)
    freeze(model, vision=cfg.model.freeze_vision, projector=cfg.model.freeze_projector)
    model.train()
    return model, processor


def train(cfg, model, processor, samples: list[dict], log_every: int = 50) -> list[float]:
    from training.loop import _apply_schedule, lr_lambda

    batch = cfg.train.micro_batch_size * cfg.scaling.num_workers * cfg.train.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    for step in range(cfg.train.max_steps):
        _apply_schedule(cfg, model, step)
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
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(
                f"  step {step + 1}/{cfg.train.max_steps} loss {recent:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--layers", type=int, nargs="*", help="gaze layers (others dense)")
    parser.add_argument("--eval", type=int, default=300, help="held-out samples scored")
    parser.add_argument("--data", default="/tmp/recipe-data", help="generated data (cached)")
    parser.add_argument("--log", default="bench/results/recipe.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("RECIPE_THREADS", "1")))
    cfg = load_config("configs/demo.yaml", args.set)
    torch.manual_seed(cfg.train.seed)
    from pipelines.synthetic import generate_settings

    s = cfg.data.synthetic
    key = hashlib.sha1(s.model_dump_json().encode()).hexdigest()[:10]
    data = Path(args.data) / key  # one generated dataset per synthetic setting
    if not (data / "test.json").exists():
        generate_settings(data, s)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build(cfg, Path(tmp), args.layers)
        samples = train_samples(data, processor, cfg.data.max_length)
        losses = train(cfg, model, processor, samples)
        trained = time.perf_counter() - started
        model.eval()
        held_out = load_json(data / "test.json", limit=args.eval)
        tasks: dict[str, set] = {}
        for r in json.loads((data / "test.json").read_text())[: args.eval]:
            tasks.setdefault(r["task"], set()).add(r["id"])
        budgets = {"own": EvalConfig(pictures=0, max_new_tokens=4)}
        if cfg.model.attn == "gaze":
            budgets["all"] = EvalConfig(pictures=0, max_new_tokens=4, keep_ratio=1.0)
        result = {"name": args.name, "set": args.set, "layers": args.layers,
                  "train_s": round(trained, 1), "final_loss": sum(losses[-50:]) / 50}  # fmt: skip
        for label, config in budgets.items():
            with torch.no_grad():
                report = evaluate_samples(model, processor, held_out, config)
            m = dict(report.metrics)
            for task, ids in tasks.items():
                scored = [s.correct for s in report.samples if s.id in ids]
                m[f"eval/accuracy.{task}"] = sum(scored) / max(1, len(scored))
            result[label] = {
                k.removeprefix("eval/"): round(v, 4)
                for k, v in m.items()
                if not k.startswith("eval/routing_hit_rate/") or "layer" in k
            }
    line = {k: result[k] for k in ("name", "train_s", "final_loss")}
    for label in budgets:
        r = result[label]
        line[label] = (
            f"acc {r.get('accuracy', 0):.3f} hit {r.get('routing_hit_rate', float('nan')):.3f} "
            f"rand {r.get('routing_hit_rate_random', float('nan')):.3f} "
            + " ".join(f"{k[9:]} {v:.2f}" for k, v in r.items() if k.startswith("accuracy."))
        )
    print(json.dumps(line), flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
