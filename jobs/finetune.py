"""Fine-tune a gaze model on Ray Train with DeepSpeed ZeRO-3, tracked in MLflow.

    python jobs/finetune.py --config configs/demo.yaml [--set train.max_steps=50 ...]
    ray job submit --working-dir . --runtime-env runtime_env.yaml -- \
        python jobs/finetune.py --config configs/demo.yaml

Rerunning with the same run.name resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gazeattn.typed_config import ConfigError  # noqa: E402
from training.checkpointing import ResumeMismatch  # noqa: E402
from training.config import load_config  # noqa: E402
from training.trainer import run_finetune  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=None, help="YAML under configs/ (default: built-in defaults)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:  # a typo or a wrong type: stop here, before Ray starts
        parser.error(str(err))
    try:
        result = run_finetune(config)
    except ResumeMismatch as err:  # the run name's checkpoints are another configuration's
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"[finetune] final metrics: {result.metrics}")
    print(f"[finetune] exported model: {result.export_dir}")
    if result.mlflow_uri:
        print(f"[finetune] MLflow run {result.mlflow_run_id} at {result.mlflow_uri}")


if __name__ == "__main__":
    main()
