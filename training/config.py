"""The fine-tuning job's typed config; ``configs/*.yaml`` files are instances of it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from gazeattn.adapters import LoraSettings
from gazeattn.ops.config import GazeConfig, dense_twin
from gazeattn.processing import VisualBudget
from gazeattn.typed_config import Settings, load_yaml
from pipelines.config import DataConfig

REPO = Path(__file__).resolve().parent.parent
# validation context of a config rebuilt in a Ray worker: no checks of the driver's files
IN_WORKER = "in_worker"


class ModelSettings(Settings):
    # a local directory or hub name; "tiny" builds the offline tiny model into the run's storage
    name_or_path: str = "tiny"
    # "dense" trains the dense twin (same context tokens, no routing) as the baseline
    attn: Literal["gaze", "dense"] = "gaze"
    # the gaze settings (``gazeattn.ops.GazeConfig``); either budget alone: top_k or keep_ratio
    gaze: GazeConfig = Field(default_factory=lambda: GazeConfig(keep_ratio=0.25))
    # how much of each image and video the model sees (Qwen-VL's min/max pixels, frames per
    # video): saved with the model, so evaluation and serving see media as training did
    visual_budget: VisualBudget = Field(default_factory=VisualBudget)
    # how a stock checkpoint's new context tokens start: the mean visual embedding, or noise
    context_init: Literal["visual_mean", "normal"] = "visual_mean"
    freeze_vision: bool = True
    # the projector (LLaVA's multi_modal_projector, Qwen-VL's merger) trains unless frozen here
    freeze_projector: bool = False
    # LoRA adapters (peft) on the decoder's projections; None trains the decoder fully
    lora: LoraSettings | None = None
    # with lora: merge the adapters into the export (a plain gaze checkpoint), or export them
    # in peft's format beside the base model ("adapter"); gazeattn.load_model reads both
    export_adapter: Literal["merge", "adapter"] = "merge"
    gradient_checkpointing: bool = False
    # gazeattn.tiny.build_tiny options for name_or_path "tiny", e.g. {"family": "qwen2.5-vl"}
    tiny_options: dict[str, Any] = Field(default_factory=dict)

    def gaze_config(self) -> GazeConfig:
        return dense_twin(self.gaze) if self.attn == "dense" else self.gaze


class OptimSettings(Settings):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    # optimizer steps of linear warm-up
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = Field(1.0, ge=0)


class TopKSchedule(Settings):
    """Progressive Top-K: dense until it starts, the configured budget ``warmup_steps``
    optimizer steps later (``training.schedules``). It starts at step 0 (``start: step``) or
    at the first step whose training loss, averaged over the ranks and the last
    ``loss_window`` steps, is at most ``start_loss`` (``start: loss``: it waits until the
    model attends)."""

    warmup_steps: int = Field(0, ge=0)
    kind: Literal["linear", "cosine"] = "linear"
    start: Literal["step", "loss"] = "step"
    start_loss: float | None = Field(None, gt=0)
    loss_window: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _loss_start_has_a_threshold(self) -> TopKSchedule:
        if self.start == "loss" and self.start_loss is None:
            raise ValueError("top_k_schedule.start 'loss' needs top_k_schedule.start_loss")
        return self


class TrainSettings(Settings):
    """Every step count here counts optimizer steps: one step is ``grad_accum`` micro-batches
    of ``micro_batch_size`` samples on each worker."""

    max_steps: int = Field(20, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    log_every: int = Field(1, ge=1)
    # every N optimizer steps (and at the last), every rank scores the first
    # ``heldout_samples`` of the generated held-out split and rank 0 logs accuracy and the
    # last layer's routing hit rate, its random baseline and lift as ``heldout/*`` metrics,
    # so routing is seen being learned next to the loss (0: never; needs generated data,
    # whose records know where the answer is)
    heldout_every: int = Field(0, ge=0)
    heldout_samples: int = Field(64, ge=1)
    seed: int = 0
    deepspeed_config: str = "configs/deepspeed/zero3_cpu.json"
    # a micro-batch whose loss is not finite (or an update with non-finite gradients) is
    # skipped and counted (metric nonfinite_skipped); this many in a row stop the run
    max_nonfinite_in_a_row: int = Field(10, ge=1)
    # stop after this many steps in this attempt (tests use it to simulate a stopped run)
    stop_after: int | None = Field(None, ge=1)


class ScalingSettings(Settings):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, ge=0)
    gpus_per_worker: float = Field(0, ge=0)
    # extra Ray resources per worker, e.g. {"train_slot": 1} to force placement
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # Ray placement group strategy of the worker group; STRICT_SPREAD: one worker per node
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # how long a collective waits for a peer before the run fails (torch.distributed timeout)
    collective_timeout_s: int = Field(1800, ge=10)


class RunSettings(Settings):
    name: str = Field("gaze-demo", min_length=1)
    # a local directory, or a URI pyarrow opens (s3://bucket/prefix, gs://..., abfs://...)
    storage_path: str = "outputs/ray"
    max_failures: int = Field(1, ge=-1)
    # where the final HF export goes (a directory or URI); None: <storage_path>/<name>/export
    export_dir: str | None = None


class MlflowSettings(Settings):
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else the local sqlite store
    tracking_uri: str | None = None
    experiment: str = "gazeattn"
    registered_model_name: str | None = "gazeattn-demo"
    system_metrics: bool = True


class FinetuneConfig(Settings):
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    top_k_schedule: TopKSchedule = Field(default_factory=TopKSchedule)
    train: TrainSettings = Field(default_factory=TrainSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)

    @model_validator(mode="after")
    def _deepspeed_config_fits(self, info: ValidationInfo) -> FinetuneConfig:
        if (info.context or {}).get(IN_WORKER):
            # a worker gets the JSON itself from the driver, which checked it
            return self
        path = deepspeed_config_path(self)
        if not path.is_file():
            raise ValueError(f"train.deepspeed_config: no file {path}")
        try:
            ds = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"train.deepspeed_config: {path} is not JSON ({err})") from None
        # a number in the JSON must agree with the config, which the schedules count by
        for key, field in (
            ("gradient_accumulation_steps", "grad_accum"),
            ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ):
            value = ds.get(key, "auto")
            if value != "auto" and value != getattr(self.train, field):
                raise ValueError(
                    f"train.{field} is {getattr(self.train, field)} but {path.name} sets "
                    f'{key}: {value} (use "auto" there)'
                )
        return self


def deepspeed_config_path(cfg: FinetuneConfig) -> Path:
    """The DeepSpeed JSON; a relative path is relative to the working directory when it is
    there, else to this checkout (the driver reads it; the workers get its contents)."""
    path = Path(cfg.train.deepspeed_config)
    if path.is_absolute() or (Path.cwd() / path).is_file():
        return path.resolve()
    return REPO / path


def name_the_accelerator(cfg: FinetuneConfig) -> None:
    """Tell DeepSpeed (before it is imported, in the driver and in each worker) which
    accelerator the job uses: left to guess, it warns on every CPU process that it found none.
    A ``DS_ACCELERATOR`` already set wins."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    """The config of ``path`` (None: the defaults) with ``key.sub=value`` overrides, checked:
    a ``gazeattn.typed_config.ConfigError`` names every unknown key and wrong value."""
    return load_yaml(FinetuneConfig, path, overrides)
