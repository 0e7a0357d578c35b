"""The fine-tuning job's typed config; ``configs/*.yaml`` files are instances of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gazeattn.ops import GazeConfig
from gazeattn.typed_config import load_yaml
from pipelines.config import DataConfig

REPO = Path(__file__).resolve().parent.parent


@dataclass(kw_only=True)
class GazeSettings:
    region_size: tuple[int, int, int] = (1, 6, 6)
    top_k: int | None = None
    keep_ratio: float | None = 0.25
    num_context_tokens: int = 4
    routing: Literal["kv_head", "query_head"] = "kv_head"
    backend: Literal["auto", "reference", "triton", "dense"] = "auto"

    def build(self) -> GazeConfig:
        return GazeConfig(
            region_size=tuple(self.region_size),
            top_k=self.top_k,
            keep_ratio=self.keep_ratio,
            num_context_tokens=self.num_context_tokens,
            routing=self.routing,
            backend=self.backend,
        )


@dataclass(kw_only=True)
class ModelSettings:
    # a local directory or hub name; "tiny" builds the offline tiny model into the run's storage
    name_or_path: str = "tiny"
    # "dense" trains the dense twin (same context tokens, no routing) as the baseline
    attn: Literal["gaze", "dense"] = "gaze"
    gaze: GazeSettings = field(default_factory=GazeSettings)
    freeze_vision: bool = True
    gradient_checkpointing: bool = False
    tiny_options: dict = field(default_factory=dict)

    def gaze_config(self) -> GazeConfig:
        config = self.gaze.build()
        if self.attn == "dense":
            return GazeConfig(
                **{**config.to_dict(), "top_k": "all", "keep_ratio": None, "backend": "dense"}
            )
        return config


@dataclass(kw_only=True)
class OptimSettings:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class TopKSchedule:
    """Progressive Top-K: dense at step 0, the configured budget after ``warmup_steps``."""

    warmup_steps: int = 0
    kind: Literal["linear", "cosine"] = "linear"


@dataclass(kw_only=True)
class TrainSettings:
    max_steps: int = 20
    micro_batch_size: int = 2
    grad_accum: int = 1
    checkpoint_every: int = 10
    log_every: int = 1
    seed: int = 0
    deepspeed_config: str = "configs/deepspeed/zero3_cpu.json"
    # stop after this many steps in this attempt (tests use it to simulate a stopped run)
    stop_after: int | None = None


@dataclass(kw_only=True)
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    # extra Ray resources per worker, e.g. {"train_slot": 1} to force placement
    resources_per_worker: dict = field(default_factory=dict)
    # Ray placement group strategy of the worker group; STRICT_SPREAD: one worker per node
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass(kw_only=True)
class RunSettings:
    name: str = "gaze-demo"
    storage_path: str = "outputs/ray"
    max_failures: int = 1
    export_dir: str | None = None


@dataclass(kw_only=True)
class MlflowSettings:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else the local sqlite store
    tracking_uri: str | None = None
    experiment: str = "gazeattn"
    registered_model_name: str | None = "gazeattn-demo"
    system_metrics: bool = True


@dataclass(kw_only=True)
class FinetuneConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSettings = field(default_factory=OptimSettings)
    top_k_schedule: TopKSchedule = field(default_factory=TopKSchedule)
    train: TrainSettings = field(default_factory=TrainSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    config = load_yaml(FinetuneConfig, path, overrides)
    # fail at submission, not in a worker, on a bad gaze setting
    config.model.gaze_config()
    return config
