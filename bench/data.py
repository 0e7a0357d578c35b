"""Samples/s through decode + processing: the Ray Data pipeline vs webdataset + DataLoader.

    PYTHONPATH=. python bench/data.py [--samples 192] [--workers 2] [--image-size 96]

Both sides read the same shards, decode with the same functions
(``pipelines.decode``), encode with the same tiny model's processor and collate
the same batches, with the same number of CPU workers: Ray Data decode+encode
tasks (``build_train_dataset(cfg, processor)``) vs ``torch.utils.data.DataLoader``
workers over a ``webdataset.WebDataset``. Two mixes: images only, and images
with ~30% videos. Times are full passes (the Ray cluster is already up, as in a
job; each side does one warm-up pass first). Prints the ratio Ray / DataLoader
and writes ``bench/results/data.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import write_results


def make_data(root: Path, *, samples: int, image_size: int, video_fraction: float) -> list[str]:
    from pipelines.make_shards import make_shards, shard_paths
    from pipelines.synthetic import generate

    paths = generate(
        root, n_train=samples, n_test=0, image_size=image_size, video_fraction=video_fraction
    )
    # about 8 shards, so every worker of either side has files to read
    media = sum(p.stat().st_size for p in (root / "media").iterdir())
    # media plus, per sample, ~2 KB of tar headers and json
    size = (media + 2048 * samples) // 8 + 4096
    make_shards(paths["train"], root / "media", root / "shards", shard_size=size, progress=False)
    return shard_paths(root / "shards")


def ray_pass(shards, processor, cfg, batch_size: int) -> int:
    from pipelines.dataset import build_train_dataset, iter_train_batches

    ds = build_train_dataset(cfg, processor)
    return sum(
        len(b["input_ids"])
        for b in iter_train_batches(ds, processor, cfg, batch_size=batch_size, epoch=0)
    )


class WdsSamples:
    """webdataset sample -> encoded sample, with the pipeline's own decode and encode."""

    def __init__(self, processor, cfg):
        self.processor, self.cfg = processor, cfg

    def __call__(self, sample: dict):

        from pipelines.dataset import decoded_row, encode_row
        from pipelines.decode import BadSample, decode_sample

        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        frames = self.processor.visual_budget.frames_per_video
        try:
            decoded = decode_sample(members, frames=frames, max_side=self.cfg.max_image_side)
            out = encode_row(decoded_row("", "", decoded), self.processor, self.cfg)
        except BadSample:
            return None
        out.pop("truncated")
        return out


def loader_pass(shards, processor, cfg, batch_size: int, workers: int) -> int:
    import torch
    import webdataset as wds

    dataset = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        .map(WdsSamples(processor, cfg))
        .select(lambda s: s is not None)
        .batched(batch_size, collation_fn=processor.collate, partial=False)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return sum(len(b["input_ids"]) for b in loader)


def timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    count = fn()
    return count, time.perf_counter() - start


def run_mix(name, root, args, processor) -> dict:
    from pipelines.config import DataConfig

    shards = make_data(
        root / name,
        samples=args.samples,
        image_size=args.image_size,
        video_fraction=0.3 if name == "video_mix" else 0.0,
    )
    cfg = DataConfig(
        shards=shards,
        shuffle_files=False,
        progress_bars=False,
        decode_workers=args.workers,
        decode_cpus=1.0,
        decode_batch_size=args.decode_batch_size,
    )
    result = {"shards": len(shards)}
    for side, fn in (
        ("ray_data", lambda: ray_pass(shards, processor, cfg, args.batch_size)),
        (
            "dataloader",
            lambda: loader_pass(shards, processor, cfg, args.batch_size, args.workers),
        ),
    ):
        fn()  # warm-up: worker start, imports, file cache
        count, seconds = timed(fn)
        result[side] = {"samples": count, "seconds": seconds, "samples_per_s": count / seconds}
    result["ratio"] = result["ray_data"]["samples_per_s"] / result["dataloader"]["samples_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    from gazeattn.model import load_model
    from gazeattn.processing import VisualBudget
    from gazeattn.tiny import build_tiny

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, processor = load_model(build_tiny(root / "tiny", image_size=args.image_size))
        processor.with_budget(VisualBudget(frames_per_video=args.frames))
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            mixes = {name: run_mix(name, root, args, processor) for name in ("images", "video_mix")}
        finally:
            ray.shutdown()
    for name, r in mixes.items():
        print(
            f"{name:10s} ray_data {r['ray_data']['samples_per_s']:7.1f} samples/s  "
            f"dataloader {r['dataloader']['samples_per_s']:7.1f} samples/s  "
            f"ratio {r['ratio']:.2f}x"
        )
    path = write_results("data", {"settings": vars(args), "mixes": mixes})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
