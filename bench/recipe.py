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

from evaluation.compare import last_layer_hits  # noqa: E402
from evaluation.data import load_json  # noqa: E402
from evaluation.runner import (  # noqa: E402
    EvalConfig,
    colour_words,
    evaluate_samples,
    prompt_word_hits,
)
from training.config import load_config  # noqa: E402
from training.single import encode_records, train  # noqa: E402


def build(cfg, root: Path, layers: list[int] | None):
    """The model the job's workers would train (the stock checkpoint, or the tiny model built
    as training.trainer builds it, converted as the driver does)."""
    from gazeattn.adapters import freeze
    from gazeattn.model import convert_to_gaze, load_model
    from gazeattn.tiny import build_stock

    stock = cfg.model.name_or_path
    if stock == "tiny":
        stock = build_stock(root / "stock", **cfg.model.tiny_options)
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


def data_for(cfg, data_root: str | Path) -> Path:
    """The generated data of ``cfg.data.synthetic`` under ``data_root`` (one directory per
    setting, generated on first use)."""
    from pipelines.synthetic import generate

    s = cfg.data.synthetic
    key = hashlib.sha1(s.model_dump_json().encode()).hexdigest()[:10]
    data = Path(data_root) / key
    if not (data / "test.json").exists():
        generate(data, s)
    return data


def run(
    name: str,
    sets: list[str],
    *,
    layers: list[int] | None = None,
    eval_n: int = 300,
    data_root: str | Path = "/tmp/recipe-data",
    log: str | Path | None = "bench/results/recipe.jsonl",
    config: str | Path = "configs/demo.yaml",
) -> dict:
    """Train ``config`` with the overrides ``sets`` and score ``eval_n`` held-out samples at
    the model's own budget (and, for a gaze model, at every region and with random routing
    at its budget); the result (appended to ``log`` as a JSON line) and a one-line summary."""
    cfg = load_config(config, sets)
    torch.manual_seed(cfg.train.seed)
    data = data_for(cfg, data_root)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build(cfg, Path(tmp), layers)
        samples = encode_records(data, "train", processor, cfg.data.max_length)
        losses = train(cfg, model, processor, samples)
        trained = time.perf_counter() - started
        model.eval()
        held_out = load_json(data / "test.json", limit=eval_n)
        tasks: dict[str, set] = {}
        for r in json.loads((data / "test.json").read_text())[:eval_n]:
            tasks.setdefault(r["task"], set()).add(r["id"])
        budgets = {"own": EvalConfig(pictures=0, max_new_tokens=4)}
        if cfg.model.attn == "gaze":
            budgets["all"] = EvalConfig(pictures=0, max_new_tokens=4, keep_ratio=1.0)
            budgets["random"] = EvalConfig(pictures=0, max_new_tokens=4, random_routing_seed=0)
        result = {"name": name, "set": sets, "layers": layers, "train_s": round(trained, 1),
                  "final_loss": sum(losses[-50:]) / min(50, len(losses))}  # fmt: skip
        for label, eval_config in budgets.items():
            with torch.no_grad():
                report = evaluate_samples(model, processor, held_out, eval_config)
            m = dict(report.metrics)
            m["eval/correct"] = float(sum(r.correct for r in report.samples))
            for task, ids in tasks.items():
                scored = [s.correct for s in report.samples if s.id in ids]
                m[f"eval/accuracy.{task}"] = sum(scored) / max(1, len(scored))
            result[label] = {
                k.removeprefix("eval/"): round(v, 4)
                for k, v in m.items()
                if not k.startswith("eval/routing_hit_rate/") or "layer" in k
            }
            hit, random = last_layer_hits(m)
            result[label]["last_hit"], result[label]["last_random"] = hit, random
            if label != "all" and cfg.model.attn == "gaze" and "grid_shape" in tasks:
                words = prompt_word_hits(
                    model, processor, held_out, colour_words(held_out), eval_config
                )
                result[label]["colour_word_hit"] = {str(k): round(v, 4) for k, v in words.items()}
    line = {k: result[k] for k in ("name", "train_s", "final_loss")}
    for label in budgets:
        r = result[label]
        line[label] = (
            f"acc {r.get('accuracy', 0):.3f} last-layer hit {r['last_hit'] or float('nan'):.3f} "
            f"rand {r['last_random'] or float('nan'):.3f} "
            + " ".join(f"{k[9:]} {v:.2f}" for k, v in r.items() if k.startswith("accuracy."))
        )
    print(json.dumps(line), flush=True)
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


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
    run(args.name, args.set, layers=args.layers, eval_n=args.eval, data_root=args.data,
        log=args.log)  # fmt: skip


if __name__ == "__main__":
    main()
