"""Driver side of fine-tuning: prepare, fit on Ray Train, export, register in MLflow."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from gazeattn.typed_config import flatten, to_dict
from pipelines.stream import RESUME_DATASET, TRAIN_DATASET, ingest_config
from tracking.storage import (
    Location,
    StorageError,
    check_writable,
    copy_dir,
    is_complete,
    is_uri,
    local_copy,
    open_location,
    publish,
    staging_location,
)
from tracking.uri import resolve_tracking_uri
from training.checkpointing import EXPORT_SUBDIR, check_resume
from training.config import REPO, FinetuneConfig, name_the_accelerator
from training.loop import StepHook, deepspeed_config, train_loop
from training.tracking import TRACKING_ERRORS, Tracker, resolve_run

log = logging.getLogger(__name__)

# what prepare_model builds under the run's directory: the tiny stock model, the gaze start
TINY_BASE = "tiny-base"
GAZE_INIT = "gaze-init"
PACKAGES = ("torch", "ray", "deepspeed", "transformers", "mlflow", "triton", "webdataset")


@dataclass(kw_only=True)
class FinetuneResult:
    # where the export is: a local directory or an object-store URI (run.export_dir)
    export_dir: str
    metrics: dict
    mlflow_uri: str | None
    mlflow_run_id: str | None
    registered_model: str | None
    mlflow_model_uri: str | None = None


def storage_root(cfg: FinetuneConfig) -> Location:
    """``run.storage_path`` opened and writable: a local directory (relative to the working
    directory) or an object-store URI; a ``StorageError`` names it otherwise."""
    return check_writable(cfg.run.storage_path, "run.storage_path")


def export_location(cfg: FinetuneConfig, root: Location) -> Location:
    if cfg.run.export_dir:
        return check_writable(cfg.run.export_dir, "run.export_dir")
    return root.join(cfg.run.name, "export")


def prepare_model(cfg: FinetuneConfig, root: Location) -> str:
    """The checkpoint the workers load: a gaze checkpoint, converted once here when needed.

    Conversion (stock LLaVA -> gaze, context tokens initialised from visual features) runs
    on the driver with full weights, so that the workers load an ordinary checkpoint that
    ZeRO-3 partitions at load time. "tiny" builds the offline tiny stock model first. With
    object storage the converted model is uploaded beside the checkpoints, where every node
    reads it, and its URI returned. A source that does not exist fails here, at submission.
    """
    out = root.join(cfg.run.name, GAZE_INIT)
    # complete means published with its manifest: transformers writes config.json before
    # the weights, so a conversion stopped half-way has one and is done again
    if is_complete(out):
        return out.uri
    with tempfile.TemporaryDirectory(prefix="gazeattn-prepare-") as tmp:
        work = Path(root.join(cfg.run.name).path) if root.is_local else Path(tmp)
        source = cfg.model.name_or_path
        if source == "tiny":
            source = _tiny_base(cfg, open_location(work / TINY_BASE))
        if _is_gaze_checkpoint(source):
            return source
        print(f"[finetune] converting {source} into a gaze model at {out.uri}", flush=True)
        # built beside its place (locally: put there by a rename), or uploaded from tmp
        staged = staging_location(out) if root.is_local else open_location(Path(tmp) / GAZE_INIT)
        try:
            _convert(cfg, source, Path(staged.path))
            if root.is_local:
                publish(staged, out)
            else:
                copy_dir(staged, out)
        finally:
            if root.is_local and staged.exists():
                shutil.rmtree(staged.path, ignore_errors=True)
    return out.uri


def _forget_prepared(run: Location, changes: list[str]) -> None:
    """A new start of a run name whose model settings changed builds its model again: the
    tiny base and the converted start of the old settings are deleted."""
    if not any(change.startswith("model.") for change in changes):
        return
    for prepared in (run.join(TINY_BASE), run.join(GAZE_INIT)):
        if prepared.exists():
            print(f"[finetune] model settings changed: building {prepared.uri} again", flush=True)
            prepared.filesystem.delete_dir(prepared.path)


def _tiny_base(cfg: FinetuneConfig, out: Location) -> str:
    """The offline tiny stock model at ``out`` (local), built once (again if unfinished)."""
    from gazeattn.tiny import build_tiny

    if not is_complete(out):
        staged = staging_location(out)
        try:
            build_tiny(staged.path, gaze=False, **cfg.model.tiny_options)
            publish(staged, out)
        finally:
            shutil.rmtree(staged.path, ignore_errors=True)
    return out.path


def _is_gaze_checkpoint(source: str) -> bool:
    """Whether ``source`` (a directory, object-store URI or hub name) holds a gaze model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(local_copy(source) if is_uri(source) else source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"model.name_or_path {source}: not a model directory, URI or hub name that "
            f"resolves ({err})"
        ) from None
    return getattr(config, "gaze_config", None) is not None


def _convert(cfg: FinetuneConfig, source, out: Path) -> None:
    from gazeattn.model import load_model

    model, processor = load_model(
        source, gaze=cfg.model.gaze_config(), context_init=cfg.model.context_init
    )
    processor.with_budget(cfg.model.visual_budget)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def adapter_base(cfg: FinetuneConfig, model_path: str) -> str | None:
    """The base an adapter export names (None without LoRA): the checkpoint the run started
    from (a hub id or path, converted again the same way at load time), or for the tiny model
    the converted start itself."""
    if cfg.model.lora is None:
        return None
    return model_path if cfg.model.name_or_path == "tiny" else cfg.model.name_or_path


def run_finetune(cfg: FinetuneConfig, *, hooks: list[StepHook] = ()) -> FinetuneResult:
    """Fine-tune as configured and return where the export is; resumes a run of the same name
    (``training.checkpointing.ResumeMismatch`` when its checkpoints were written with another
    configuration). ``hooks``: called by every worker around each step (``StepEvent``)."""
    from pipelines.dataset import build_train_dataset

    name_the_accelerator(cfg)
    # bad storage, a missing model or a mismatched resume fails here, before Ray starts
    root = storage_root(cfg)
    run = root.join(cfg.run.name)
    _forget_prepared(run, check_resume(cfg, run))
    export = export_location(cfg, root)
    model_path = prepare_model(cfg, root)
    # read before ray.init: in a `ray job submit` driver, ray.init can replace the job's
    # working directory, after which relative paths (and os.getcwd) fail
    ds_config = deepspeed_config(cfg)
    if not ray.is_initialized():
        # joins the cluster under `ray job submit` (or RAY_ADDRESS); else starts a local Ray
        ray.init()
    processor = _pipeline_processor(cfg, model_path)

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

    datasets = {
        TRAIN_DATASET: build_train_dataset(cfg.data, processor),
        # the rest of an interrupted epoch; read only by a resumed worker group
        RESUME_DATASET: build_train_dataset(cfg.data, processor, resume=True),
    }
    loop_config = {
        "config": to_dict(cfg),
        # the JSON itself: a path of the driver's working directory means nothing on a node
        "deepspeed": ds_config,
        "model_path": model_path,
        "mlflow_uri": uri,
        "mlflow_run_id": run_id,
        "hooks": list(hooks),
        "adapter_base": adapter_base(cfg, model_path),
        # after the datasets: a generated split exists once they are built
        "heldout": heldout_path(cfg),
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
        torch_config=TorchConfig(
            backend="nccl" if cfg.scaling.use_gpu else "gloo",
            timeout_s=cfg.scaling.collective_timeout_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            # with a filesystem given, Ray takes the path inside it (bucket/prefix, no scheme)
            storage_path=root.path,
            storage_filesystem=None if root.is_local else root.filesystem,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ingest_config(),
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
            export_dir="",
            metrics=result.metrics,
            mlflow_uri=uri,
            mlflow_run_id=run_id,
            registered_model=None,
        )
    _copy_export(result.checkpoint, export, merge=cfg.model.export_adapter == "merge")
    registered = model_uri = None
    if run_id is not None:
        from tracking.models import log_model

        try:
            with tempfile.TemporaryDirectory(prefix="gazeattn-export-") as tmp:
                model_uri = log_model(
                    uri, run_id, _local_export(export, tmp), cfg.mlflow.registered_model_name
                )
            registered = cfg.mlflow.registered_model_name
        except TRACKING_ERRORS as err:  # the export is the result; MLflow holds a copy
            print(
                f"[finetune] WARNING: could not log the model to MLflow ({err}); it is at {export.uri}",
                flush=True,
            )
    return FinetuneResult(
        export_dir=export.uri,
        metrics=result.metrics,
        mlflow_uri=uri,
        mlflow_run_id=run_id,
        registered_model=registered,
        mlflow_model_uri=model_uri,
    )


def heldout_path(cfg: FinetuneConfig) -> str | None:
    """The generated held-out split the workers score every ``train.heldout_every`` steps
    (None when off, or for shards of one's own: their records need not say where the answer
    is)."""
    if not cfg.train.heldout_every:
        return None
    test_json = Path(cfg.data.synthetic_dir) / "test.json"
    if cfg.data.shards or not test_json.exists():
        print(
            f"[finetune] train.heldout_every is set but there is no generated held-out split "
            f"({test_json}): no held-out metrics during training",
            flush=True,
        )
        return None
    return str(test_json.resolve())


def _pipeline_processor(cfg: FinetuneConfig, model_path: str):
    """The processor the driver-side pipeline encodes with: the model's, at the run's budget."""
    from gazeattn.processing import GazeProcessor

    local = str(local_copy(model_path)) if is_uri(model_path) else model_path
    return GazeProcessor.from_pretrained(local).with_budget(cfg.model.visual_budget)


def _local_export(export: Location, tmp: str) -> Path:
    if export.is_local:
        return Path(export.path)
    local = open_location(tmp).join("export")
    copy_dir(export, local)
    return Path(local.path)


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


def _copy_export(checkpoint, export: Location, *, merge: bool = True) -> None:
    """The final checkpoint's HF export (``hf/``) to the export location (any filesystem).

    An adapter export (LoRA) is merged into its base here when ``merge``: the export is then
    a plain gaze checkpoint."""
    from gazeattn.adapters import ADAPTER_FILE

    src = Location(
        filesystem=checkpoint.filesystem,
        path=f"{checkpoint.path.rstrip('/')}/{EXPORT_SUBDIR}",
        uri=f"{checkpoint.path}/{EXPORT_SUBDIR}",
    )
    if not (src.is_file("config.json") or src.is_file(ADAPTER_FILE)):
        raise RuntimeError(f"the final checkpoint {checkpoint.path} holds no export under hf/")
    try:
        if merge and src.is_file(ADAPTER_FILE):
            _merge_adapter(src, export)
        else:
            copy_dir(src, export)
    except OSError as err:
        raise StorageError(f"could not write the export to {export.uri}: {err}") from err


def _merge_adapter(src: Location, export: Location) -> None:
    from gazeattn import load_model

    with tempfile.TemporaryDirectory(prefix="gazeattn-merge-") as tmp:
        adapter = open_location(tmp).join("adapter")
        copy_dir(src, adapter)
        model, processor = load_model(adapter.path, merge_adapter=True)
        merged = Path(tmp) / "merged"
        model.save_pretrained(merged)
        processor.save_pretrained(merged)
        print(f"[finetune] merged the LoRA adapters into the export {export.uri}", flush=True)
        copy_dir(open_location(str(merged)), export)


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
