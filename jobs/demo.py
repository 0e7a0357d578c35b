"""The README's first command: the main job on the embedded default.

Generates synthetic image/video shards, fine-tunes the tiny gaze model with 2
DeepSpeed ZeRO-3 workers on a local Ray (CPU), logs to the local MLflow store,
evaluates dense vs gaze budgets on the held-out split (a table and a chart in
MLflow), checks the model on its own training answers against the most-frequent-answer
baseline, and prints the KV savings, the final loss and the MLflow UI command.

    python jobs/demo.py [--config configs/demo.yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.cli import compare_main  # noqa: E402
from gazeattn.typed_config import ConfigError  # noqa: E402
from training.config import load_config  # noqa: E402
from training.trainer import run_finetune  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    # a local demo: token authentication is for shared clusters
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:  # a typo or a wrong type: stop here, before Ray starts
        parser.error(str(err))
    print(
        f"[demo] fine-tuning {config.model.name_or_path} ({config.model.attn}) with {config.scaling.num_workers} ZeRO-3 workers"
    )
    result = run_finetune(config)
    metrics = result.metrics
    print("\n[demo] done")
    print(
        f"[demo] final loss: {metrics.get('loss', float('nan')):.4f} after {metrics.get('step')} steps"
    )
    if "visual_dense" in metrics:
        print(
            f"[demo] visual KV entries per text query: {metrics['visual_attended']:.1f} gaze vs "
            f"{metrics['visual_dense']:.1f} dense -> {metrics['kv_savings_pct']:.1f}% fewer "
            f"(routing entropy {metrics['routing_entropy']:.2f})"
        )
    print(f"[demo] exported model: {result.export_dir}")
    test_json = Path(config.data.synthetic_dir) / "test.json"
    if test_json.exists():
        print("[demo] evaluating dense vs gaze budgets on the held-out split")
        compare = [
            "--model",
            str(result.export_dir),
            "--data",
            str(test_json),
            "--max-new-tokens",
            "8",
        ]
        compare += ["--out", str(Path(config.run.storage_path) / config.run.name / "compare")]
        compare += ["--tracking-uri", result.mlflow_uri] if result.mlflow_uri else ["--no-mlflow"]
        compare_main(compare)
    train_json = Path(config.data.synthetic_dir) / "train.json"
    if train_json.exists():
        training_answers(result.export_dir, train_json)
    if result.mlflow_uri:
        print(f"[demo] MLflow run {result.mlflow_run_id}; open the UI with:")
        print(
            f"    .venv/bin/mlflow ui --backend-store-uri {result.mlflow_uri} --host 127.0.0.1 --port 5000"
        )


def training_answers(export_dir: Path, train_json: Path) -> float:
    """Greedy answers of the fine-tuned model to its own training questions, at its own
    gaze budget; prints the accuracy beside the most-frequent-answer baseline."""
    from evaluation.data import load_json
    from evaluation.metrics import majority_share
    from evaluation.runner import EvalConfig, evaluate_samples
    from gazeattn import load_model

    model, processor = load_model(export_dir)
    samples = load_json(train_json)
    report = evaluate_samples(model.eval(), processor, samples, EvalConfig(max_new_tokens=8))
    accuracy = report.metrics["eval/accuracy"]
    baseline = majority_share([s.answer for s in samples])
    print(
        f"[demo] its own {len(samples)} training questions: accuracy {accuracy:.2f} "
        f"(the most frequent answer alone: {baseline:.2f}), "
        f"{report.metrics['eval/kv_savings_pct']:.0f}% fewer visual KV entries than dense"
    )
    return accuracy


if __name__ == "__main__":
    main()
