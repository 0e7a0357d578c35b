"""Training throughput: gaze vs the dense twin, and DeepSpeed ZeRO-3 (2 Ray workers) vs one process.

All four runs use the same tiny-but-not-trivial model (384 px images, 576 visual
tokens each), the same synthetic image samples and the same global batch. The
single-process runs use torch AdamW without Ray or DeepSpeed; the ZeRO-3 runs are
the fine-tuning job itself (jobs/finetune.py's code path). Prints samples/s and
the ratios, writes bench/results/train.json.

Run: python bench/train.py [--steps 8] [--global-batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402
from gazeattn.model import load_model  # noqa: E402
from gazeattn.ops import GazeConfig  # noqa: E402
from pipelines.conversation import to_messages  # noqa: E402

SIZE = {"image_size": 384, "patch_size": 16, "hidden": 256, "layers": 4, "heads": 8, "kv_heads": 2}
BUDGETS = {"gaze": GazeConfig(keep_ratio=0.25), "dense": GazeConfig(top_k="all", backend="dense")}


def image_samples(data_dir: Path, processor, count: int) -> list[dict]:
    records = [r for r in json.loads((data_dir / "train.json").read_text()) if r.get("image")]
    samples = []
    for record in records[:count]:
        names = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images = [np.asarray(Image.open(data_dir / "media" / n).convert("RGB")) for n in names]
        samples.append(processor.encode_sample(to_messages(record["conversations"]), images=images))
    return samples


def single_process(
    model_dir: Path, data_dir: Path, config: GazeConfig, steps: int, batch: int
) -> float:
    """samples/s of plain torch training in this process (after one warm-up step)."""
    model, processor = load_model(model_dir, gaze=config)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    samples = image_samples(data_dir, processor, batch * (steps + 1))
    batches = [
        processor.collate(samples[i : i + batch]) for i in range(0, len(samples) - batch + 1, batch)
    ]
    elapsed = 0.0
    for i, b in enumerate(batches[: steps + 1]):
        start = time.perf_counter()
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:
            elapsed += time.perf_counter() - start
    return steps * batch / elapsed


def zero3(root: Path, attn: str, steps: int, batch: int) -> float:
    """samples/s reported by the fine-tuning job (2 ZeRO-3 workers, global batch ``batch``)."""
    from training.config import load_config
    from training.trainer import run_finetune

    sets = {
        "model.name_or_path": str(root / "stock"),
        "model.attn": attn,
        "model.gaze.keep_ratio": 0.25,
        # as in single_process (the demo config trains the tower; this benchmark does not)
        "model.freeze_vision": True,
        "top_k_schedule.warmup_steps": 0,
        "train.max_steps": steps + 1,
        "train.checkpoint_every": steps + 1,
        "train.micro_batch_size": batch // 2,
        "data.synthetic_dir": str(root / "data"),
        "data.synthetic.n_train": batch * (steps + 2),
        "data.synthetic.image_size": 384,
        "data.synthetic.video_fraction": 0.0,
        "data.progress_bars": False,
        "run.name": f"bench-{attn}",
        "run.storage_path": str(root / "ray"),
        "mlflow.enabled": False,
    }
    result = run_finetune(load_config("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()]))
    return float(result.metrics["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from gazeattn.tiny import build_tiny
    from pipelines.config import SyntheticSettings
    from pipelines.synthetic import build

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny(root / "stock", gaze=False, **SIZE)
        n = args.global_batch * (args.steps + 2)
        build(
            root / "data",
            SyntheticSettings(n_train=n, n_test=2, image_size=384, video_fraction=0.0),
            progress=False,
        )
        rates = {}
        for attn, config in BUDGETS.items():
            rates[f"single-{attn}"] = single_process(
                root / "stock", root / "data", config, args.steps, args.global_batch
            )
        for attn in BUDGETS:
            rates[f"zero3-{attn}"] = zero3(root, attn, args.steps, args.global_batch)
    print(f"{'run':>14} {'samples/s':>10}")
    for name, rate in rates.items():
        print(f"{name:>14} {rate:>10.2f}")
    ratios = {
        "gaze_vs_dense_single": rates["single-gaze"] / rates["single-dense"],
        "gaze_vs_dense_zero3": rates["zero3-gaze"] / rates["zero3-dense"],
        "zero3_vs_single_gaze": rates["zero3-gaze"] / rates["single-gaze"],
        "zero3_vs_single_dense": rates["zero3-dense"] / rates["single-dense"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    path = write_results(
        "train",
        {
            "steps": args.steps,
            "global_batch": args.global_batch,
            "model": SIZE,
            "samples_per_s": rates,
            "ratios": ratios,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
