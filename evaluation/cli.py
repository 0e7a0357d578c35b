"""Command lines of ``jobs/evaluate.py`` and ``jobs/compare.py``.

    jobs/evaluate.py --model PATH_OR_MLFLOW_URI (--shards ... | --data test.json)
                     [--gaze-top-k K | --keep-ratio R | --attn dense] [--run-id TRAINING_RUN]
    jobs/compare.py  --model PATH_OR_MLFLOW_URI (--shards ... | --data test.json)
                     [--points dense 0.5 0.25 0.125]

``--shards`` goes through the Ray Data pipeline with ``--workers`` model actors;
``--data`` (a JSON list of LLaVA records with a ``media/`` folder beside it) is read
in this process. Results go to MLflow (``--tracking-uri``, default $MLFLOW_TRACKING_URI
or ./mlflow.db) and to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from evaluation.compare import run_sweep, sweep_points
from evaluation.data import load_json
from evaluation.pictures import draw_gaze
from evaluation.runner import EvalConfig, EvalReport, evaluate_samples
from evaluation.tracking import dump_report, log_report, start_eval_run
from gazeattn.typed_config import describe
from tracking.models import ResolvedModel, resolve_model
from tracking.uri import resolve_tracking_uri


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or MLflow model URI")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--shards", nargs="*",
        help="WebDataset shards (Ray Data pipeline); none: the synthetic test split",
    )  # fmt: skip
    source.add_argument("--data", help="JSON list of LLaVA records, media/ beside it")
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--routing-layers", type=int, nargs="+", default=None)
    parser.add_argument("--pictures", type=int, default=4, help="gaze pictures for N samples")
    parser.add_argument("--picture-tokens", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="model actors (--shards)")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames sampled per video (default: the model's visual budget, as in training)",
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--out", default="eval_out")


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(parser)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--gaze-top-k", type=_top_k, default=None, metavar="K", help="regions per query, or all"
    )
    budget.add_argument("--keep-ratio", type=float, default=None)
    budget.add_argument("--attn", choices=("gaze", "dense"), default="gaze")
    parser.add_argument(
        "--random-routing", type=int, default=None, metavar="SEED",
        help="route to pseudo-random regions at the same budget (seeded): the ablation row",
    )  # fmt: skip
    parser.add_argument("--run-id", default=None, help="log into this (training) run")
    parser.add_argument("--experiment", default="gazeattn-eval")
    return parser


def _top_k(text: str) -> int | str:
    """--gaze-top-k: an int >= 1 or "all" (every visible region: exactly dense)."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an int >= 1 or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"an int >= 1 or 'all', got {text!r}")
    return value


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(parser)
    parser.add_argument(
        "--points", nargs="+", default=["dense", "0.5", "0.25", "0.125"],
        help="'dense', keep ratios (with a dot) and top-K (integers)",
    )  # fmt: skip
    parser.add_argument("--experiment", default="gazeattn-compare")
    parser.add_argument("--name", default="compare")
    return parser


def _config(args, **budget) -> EvalConfig:
    """The evaluation config of the command line, checked (a bad value exits with its flag)."""
    data = dict(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        routing_layers=args.routing_layers,
        pictures=args.pictures,
        picture_tokens=args.picture_tokens,
        **budget,
    )
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as err:
        raise SystemExit(f"evaluate: {describe(err)}") from None


def _load(model: ResolvedModel):
    from gazeattn.model import load_model

    loaded, processor = load_model(model.path)
    loaded.eval()
    return loaded, processor


def _frames_of(model_path) -> int:
    """The frames per video of the model's visual budget (saved with its processor)."""
    from gazeattn.processing import GazeProcessor

    return GazeProcessor.from_pretrained(str(model_path)).visual_budget.frames_per_video


def _local_samples(args):
    if args.shards is not None:
        raise ValueError("--shards goes through Ray (evaluate_shards); use --data here")
    return load_json(args.data, limit=args.limit)


def _client(args) -> MlflowClient | None:
    return None if args.no_mlflow else MlflowClient(resolve_tracking_uri(args.tracking_uri))


def evaluate_main(argv: list[str] | None = None) -> EvalReport:
    args = evaluate_parser().parse_args(argv)
    budget = {"attn": args.attn, "top_k": args.gaze_top_k, "keep_ratio": args.keep_ratio,
              "random_routing_seed": args.random_routing}  # fmt: skip
    config = _config(args, **budget)
    client = _client(args)
    model = resolve_model(args.model, client.tracking_uri if client else None)
    out = Path(args.out)
    if args.shards is not None:
        from evaluation.shards import evaluate_shards, shard_samples

        report = evaluate_shards(args.shards, model.path, config, workers=args.workers,
                                 gpus_per_worker=args.gpus_per_worker, limit=args.limit,
                                 frames_per_video=args.frames)  # fmt: skip
        frames = args.frames or _frames_of(model.path)
        samples = shard_samples(args.shards, limit=config.pictures, frames_per_video=frames)
    else:
        samples = _local_samples(args)
        loaded, processor = _load(model)
        report = evaluate_samples(loaded, processor, samples, config)
    by_id = {r.id: r for r in report.samples}
    pictures = [
        draw_gaze(
            s,
            by_id[s.id],
            out / "pictures" / config.label / f"{s.id}.png",
            tokens=config.picture_tokens,
        )  # fmt: skip
        for s in samples[: config.pictures]
        if s.id in by_id and by_id[s.id].routing
    ]
    dump_report(report, out / f"{config.label}.json")
    if client is not None:
        run_id = args.run_id or start_eval_run(
            client, experiment=args.experiment, run_name=f"eval/{config.label}", model=model
        )
        log_report(client, run_id, report, pictures=pictures, params={"eval.model": model.uri})
        if not args.run_id:
            client.set_terminated(run_id)
        print(f"MLflow run: {run_id}")
    print(json.dumps(report.metrics, indent=1))
    return report


def compare_main(argv: list[str] | None = None):
    args = compare_parser().parse_args(argv)
    points = [p if p == "dense" else (float(p) if "." in p else int(p)) for p in args.points]
    configs = sweep_points(
        points,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        routing_layers=args.routing_layers,
        pictures=args.pictures,
        picture_tokens=args.picture_tokens,
    )
    client = _client(args)
    model = resolve_model(args.model, client.tracking_uri if client else None)
    loaded, processor = _load(model)
    samples = _local_samples(args) if args.data else None
    if samples is None:
        from evaluation.shards import shard_samples

        samples = shard_samples(
            args.shards,
            limit=args.limit,
            frames_per_video=args.frames or processor.visual_budget.frames_per_video,
        )
    result = run_sweep(loaded, processor, samples, configs, args.out, client=client,
                       experiment=args.experiment, model_info=model, sweep_name=args.name,
                       params={"eval.model": model.uri})  # fmt: skip
    print(result.markdown)
    print(f"chart: {result.chart}")
    if result.run_id:
        print(f"MLflow sweep run: {result.run_id}")
    return result
