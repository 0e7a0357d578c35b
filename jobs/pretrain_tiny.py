"""Pretrain the tiny dense checkpoint the demo starts from, as a user starts from a hub one.

A user fine-tunes a pretrained checkpoint whose tower and decoder already see; our machines
cannot download one, so this script makes a small one, reproducibly: the tiny stock LLaVA
model of ``model.tiny_options`` (random weights, seeded), trained densely (no context tokens,
no routing: exactly the stock model's function) in one process on the generated grid task of
``data.synthetic`` (its own seed: no image of the demo's data), in one stage or several
(``--config`` again: each from the weights of the one before), then saved in the hub's own stock layout (``LlavaForConditionalGeneration``
weights, config, tokenizer, image processor and chat template). Beside it: ``pretrain.log``
(this run's output) and ``pretrain.json`` (per stage: the settings, the held-out accuracy
per question kind, versions, commit).

    python jobs/pretrain_tiny.py [--config STAGE.yaml ...] [--out DIR] [--set k=v]
                                 [--resize-input PX]

``--resize-input PX``: the first stage starts from its checkpoint at PX px squares
(``gazeattn.tiny.resize_llava_input``), as ``checkpoints/tiny-grid4q`` was made.

The demo (``configs/demo.yaml``, ``model.name_or_path``) converts the saved checkpoint into
its gaze model and its dense twin and fine-tunes both from these same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gazeattn.tiny import resize_llava_input  # noqa: E402
from gazeattn.typed_config import ConfigError  # noqa: E402
from training.config import FinetuneConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "checkpoints" / "tiny-grid3"
# the first checkpoint: one stage, "which shape is the red one?". The demo's (tiny-grid3q)
# is three runs more from it, the question asked first (configs/pretrain-tiny-q1.yaml says
# how); bench/RESULTS.md, "The claim", says what other stages gave
DEFAULT_STAGES = (REPO / "configs" / "pretrain-tiny.yaml",)
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors")


class Tee:
    """stdout copied into a log file (the checkpoint keeps the output of its run)."""

    def __init__(self, stream, log) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()


def pretrain(cfg: FinetuneConfig, out: Path, *, eval_limit: int | None = None) -> dict:
    """One stage: build (or load ``model.name_or_path``), train, score and save the stock
    checkpoint into ``out``; returns its record (one entry of ``pretrain.json``)."""
    import torch

    from evaluation.data import load_json
    from evaluation.runner import EvalConfig, evaluate_samples
    from gazeattn.adapters import freeze
    from gazeattn.model import convert_to_gaze, load_model
    from gazeattn.tiny import build_stock
    from pipelines.synthetic import generate
    from training.single import encode_records, train

    if cfg.model.attn != "dense" or cfg.model.gaze.num_context_tokens:
        raise ConfigError(
            "pretraining is the stock model's function: model.attn dense and "
            "model.gaze.num_context_tokens 0"
        )
    torch.manual_seed(cfg.train.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gazeattn-pretrain-") as tmp:
        data = Path(tmp) / "data"
        print(f"[pretrain] generating the {cfg.data.synthetic.task} task in {data}", flush=True)
        generate(data, cfg.data.synthetic)
        if cfg.model.name_or_path == "tiny":
            stock_dir = build_stock(Path(tmp) / "stock", **cfg.model.tiny_options)
        else:  # a further stage: from an earlier stage's checkpoint
            stock_dir = Path(cfg.model.name_or_path)
        stock, processor = load_model(stock_dir)
        # the dense twin without context tokens shares the stock model's tensors: training
        # it trains the stock model (the anchor test: it computes the stock function)
        model, processor = convert_to_gaze(stock, processor, cfg.model.gaze_config())
        freeze(model, vision=cfg.model.freeze_vision, projector=cfg.model.freeze_projector)
        samples = encode_records(data, "train", processor, cfg.data.max_length)
        print(
            f"[pretrain] {len(samples)} training samples, {cfg.train.max_steps} steps", flush=True
        )
        losses = train(cfg, model, processor, samples, log_every=cfg.train.log_every)
        model.eval()
        held_out = load_json(data / "test.json", limit=eval_limit)
        tasks = {r["id"]: r["task"] for r in json.loads((data / "test.json").read_text())}
        with torch.no_grad():
            report = evaluate_samples(model, processor, held_out, EvalConfig(pictures=0))
        accuracy = _per_task(report, tasks)
        print(f"[pretrain] held-out accuracy: {json.dumps(accuracy)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        # the stock layout: the built checkpoint's processor files, the trained weights
        for f in stock_dir.iterdir():
            if f.name not in WEIGHT_FILES and not f.name.startswith("pretrain"):
                shutil.copy2(f, out / f.name)
        stock.save_pretrained(out, safe_serialization=True)
        _check_reload(out, model, processor, samples[0])
    record = {
        "config": cfg.model_dump(mode="json"),
        "train_s": round(time.perf_counter() - started, 1),
        "final_loss": sum(losses[-50:]) / min(50, len(losses)),
        "held_out": accuracy,
        "commit": _git_commit(),
        "versions": {p: _version(p) for p in ("torch", "transformers")},
    }
    return record


def _per_task(report, tasks: dict[str, str]) -> dict[str, float]:
    scored: dict[str, list[bool]] = {}
    for s in report.samples:
        scored.setdefault(tasks[s.id], []).append(s.correct)
    out = {task: round(sum(v) / len(v), 4) for task, v in sorted(scored.items())}
    out["all"] = round(report.metrics["eval/accuracy"], 4)
    return out


def _check_reload(out: Path, model, processor, sample: dict) -> None:
    """The saved stock checkpoint computes what was trained: its logits equal the trained
    model's on a training sample (the stock processor's own inputs through the converter)."""
    import torch

    from gazeattn.model import load_model

    batch = processor.collate([sample])
    with torch.no_grad():
        want = model(**batch).logits
        reloaded, _ = load_model(out, gaze=model.gaze_config)
        got = reloaded.eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _git_commit() -> str:
    """HEAD, with "+dirty" when the working tree has changes (the run is not that commit's)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.check_output([*git, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()  # fmt: skip
        changes = subprocess.check_output([*git, "status", "--porcelain", "--untracked-files=no"],
                                          text=True, stderr=subprocess.DEVNULL)  # fmt: skip
        return head + ("+dirty" if changes.strip() else "")
    return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", dest="stages", action="append", default=None, metavar="YAML",
        help="a stage's config, in order; each later stage starts from the one before "
        f"(default: {', '.join(str(p.relative_to(REPO)) for p in DEFAULT_STAGES)})",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="an override for every stage",
    )  # fmt: skip
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--eval-limit", type=int, default=None, help="first N held-out samples")
    parser.add_argument(
        "--resize-input", type=int, metavar="PX",
        help="the first stage starts from its LLaVA checkpoint at PX px squares, its position "
        "embeddings interpolated (gazeattn.tiny.resize_llava_input)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    stages = args.stages or [str(p) for p in DEFAULT_STAGES]
    try:
        configs = [load_config(path, args.overrides) for path in stages]
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    if args.resize_input and configs[0].model.name_or_path == "tiny":
        parser.error("--resize-input resizes a saved checkpoint: the first stage's "
                     "model.name_or_path is 'tiny' (set model.tiny_options.image_size instead)")  # fmt: skip
    import torch

    torch.set_num_threads(int(os.environ.get("PRETRAIN_THREADS", "2")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out / "pretrain.log", "w") as log, tempfile.TemporaryDirectory() as tmp:
        stdout = sys.stdout
        sys.stdout = Tee(stdout, log)
        words = sys.argv[1:] if argv is None else argv
        print("$ python jobs/pretrain_tiny.py " + " ".join(words), flush=True)
        try:
            source = None
            if args.resize_input:
                first = configs[0].model.name_or_path
                source = str(Path(tmp) / "resized")
                resize_llava_input(first, source, args.resize_input)
                print(f"[pretrain] {first} resized to {args.resize_input} px: {source}", flush=True)
            for i, (path, cfg) in enumerate(zip(stages, configs, strict=True)):
                if source is not None:  # from the stage before
                    cfg = cfg.model_copy(
                        update={"model": cfg.model.model_copy(update={"name_or_path": source})}
                    )
                last = i == len(stages) - 1
                target = out if last else Path(tmp) / f"stage{i + 1}"
                print(f"[pretrain] stage {i + 1}/{len(stages)}: {path}", flush=True)
                records.append(pretrain(cfg, target, eval_limit=args.eval_limit))
                records[-1]["stage"] = os.path.relpath(Path(path).resolve(), REPO)
                records[-1]["command"] = "python jobs/pretrain_tiny.py " + " ".join(words)
                source = str(target)
        finally:
            sys.stdout = stdout
    record = {"stages": records, "held_out": records[-1]["held_out"]}
    if args.resize_input:  # the first stage's name_or_path is the resized copy's (temporary)
        record["resized_input"] = args.resize_input
        record["resized_from"] = configs[0].model.name_or_path
    (out / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    seconds = sum(r["train_s"] for r in records)
    print(f"[pretrain] saved {out} in {seconds:.0f} s: {record['held_out']}")


if __name__ == "__main__":
    main()
