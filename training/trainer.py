"""Driver side of fine-tuning: prepare, fit on Ray Train, export, register in MLflow."""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from gazeattn.typed_config import flatten, to_dict
from training.config import REPO, FinetuneConfig
from training.loop import EXPORT_SUBDIR, train_loop
from training.tracking import TRACKING_ERRORS, Tracker, resolve_run, resolve_tracking_uri

log = logging.getLogger(__name__)

PACKAGES = ("torch", "ray", "deepspeed", "transformers", "mlflow", "triton", "webdataset")


@dataclass(kw_only=True)
class FinetuneResult:
    export_dir: Path
    metrics: dict
    mlflow_uri: str | None
    mlflow_run_id: str | None
    registered_model: str | None


def storage_root(cfg: FinetuneConfig) -> Path:
    path = Path(cfg.run.storage_path)
    if "://" in cfg.run.storage_path:
        raise ValueError("remote storage_path needs a shared filesystem mount in this version")
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def prepare_model(cfg: FinetuneConfig, root: Path) -> str:
    """The checkpoint the workers load: a gaze checkpoint, converted once here when needed.

    Conversion (stock LLaVA -> gaze, context tokens initialised from visual features) runs
    on the driver with full weights, so that the workers load an ordinary checkpoint that
    ZeRO-3 partitions at load time. "tiny" builds the offline tiny stock model first.
    """
    from transformers import AutoConfig

    from gazeattn.model import load_model

    source = cfg.model.name_or_path
    if source == "tiny":
        from gazeattn.tiny import build_tiny

        source = root / cfg.run.name / "tiny-base"
        if not (source / "config.json").exists():
            build_tiny(source, gaze=False, **cfg.model.tiny_options)
    if getattr(AutoConfig.from_pretrained(source), "gaze_config", None) is not None:
        return str(source)
    out = root / cfg.run.name / "gaze-init"
    if not (out / "config.json").exists():
        print(f"[finetune] converting {source} into a gaze model at {out}", flush=True)
        model, processor = load_model(source, gaze=cfg.model.gaze_config())
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return str(out)


def run_finetune(cfg: FinetuneConfig, *, crash: dict | None = None) -> FinetuneResult:
    """Fine-tune as configured and return where the export is; resumes a run of the same name."""
    from pipelines.dataset import build_train_dataset

    if not ray.is_initialized():
        # joins the cluster under `ray job submit` (or RAY_ADDRESS); else starts a local Ray
        ray.init()
    root = storage_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    model_path = prepare_model(cfg, root)

    uri = run_id = None
    if cfg.mlflow.enabled:
        uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
        try:
            run_id = _start_tracking(cfg, uri)
        except TRACKING_ERRORS as err:  # tracking must not stop training
            log.warning("MLflow at %s is unreachable (%s): training without tracking", uri, err)
            print(
                f"[finetune] WARNING: MLflow at {uri} is unreachable; training without tracking",
                flush=True,
            )
            uri = None

    loop_config = {
        "config": to_dict(cfg),
        "repo": str(REPO),
        "model_path": model_path,
        "mlflow_uri": uri,
        "mlflow_run_id": run_id,
        "crash": crash,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {}),
                **cfg.scaling.resources_per_worker,
            },
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(root),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": build_train_dataset(cfg.data, model_path)},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if cfg.train.stop_after is not None and result.metrics.get("step", 0) < cfg.train.max_steps:
        print(
            f"[finetune] stopped at step {result.metrics.get('step')} (train.stop_after)",
            flush=True,
        )
        return FinetuneResult(
            export_dir=Path(),
            metrics=result.metrics,
            mlflow_uri=uri,
            mlflow_run_id=run_id,
            registered_model=None,
        )
    export_dir = _copy_export(cfg, root, result.checkpoint)
    registered = None
    if run_id is not None:
        from training.export import log_model

        try:
            registered = log_model(uri, run_id, export_dir, cfg.mlflow.registered_model_name)
        except TRACKING_ERRORS as err:  # the export on disk is the result; MLflow holds a copy
            print(
                f"[finetune] WARNING: could not log the model to MLflow ({err}); it is at {export_dir}",
                flush=True,
            )
    return FinetuneResult(
        export_dir=export_dir,
        metrics=result.metrics,
        mlflow_uri=uri,
        mlflow_run_id=run_id,
        registered_model=registered,
    )


def _start_tracking(cfg: FinetuneConfig, uri: str) -> str:
    run_id = resolve_run(uri, cfg.mlflow.experiment, cfg.run.name, tags={"attn": cfg.model.attn})
    tracker = Tracker(uri, run_id)
    params = flatten(to_dict(cfg))
    params["git_commit"] = _git_commit()
    params.update({f"version.{p}": _version(p) for p in PACKAGES})
    tracker.log_params(params)
    tracker.set_tags({"attn": cfg.model.attn, "mlflow.runName": cfg.run.name})
    tracker.close()
    return run_id


def _copy_export(cfg: FinetuneConfig, root: Path, checkpoint) -> Path:
    out = Path(cfg.run.export_dir) if cfg.run.export_dir else root / cfg.run.name / "export"
    with checkpoint.as_directory() as ckpt:
        src = Path(ckpt) / EXPORT_SUBDIR
        if not (src / "config.json").exists():
            raise RuntimeError(
                f"the final checkpoint {ckpt} holds no export under {EXPORT_SUBDIR}/"
            )
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out)
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"
