"""What fine-tuning trains: frozen parts, LoRA adapters on the decoder, and a per-module report.

- ``freeze(model, vision=..., projector=...)`` freezes the vision tower and/or the
  projector (Qwen-VL's merger is the projector: it trains unless asked otherwise).
- ``apply_lora(model, LoraSettings(...))`` puts peft LoRA adapters on the decoder's
  linear layers only; the context tokens stay fully trainable, and so do the
  projector and the vision tower when they are not frozen (an adapter checkpoint
  holds them beside the adapter).
- ``trainable_report(model)`` is the table a run prints at start: parameters and
  trainable parameters per module.
- ``save_adapter`` / ``load_adapter``: an adapter checkpoint in peft's format whose
  base is the stock checkpoint id; ``gazeattn.load_model`` reads it (and can merge it).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from gazeattn.families import family_of

ADAPTER_FILE = "adapter_config.json"
GAZE_BASE_FILE = "gaze_adapter.json"
# the fully trained tensors of an adapter checkpoint (context tokens, projector, ...)
TRAINED_FILE = "trained.safetensors"
DECODER = "model.language_model"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True, frozen=True)
class LoraSettings:
    """LoRA on the decoder's attention and MLP projections (``target_modules`` by leaf name)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LINEAR_NAMES

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be an int >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("lora target_modules must name at least one linear layer")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


def module_groups(model: nn.Module) -> dict[str, str]:
    """Report name -> parameter-name prefix of the model's parts (family-aware)."""
    base = _gaze_base(model)
    family = family_of(base.config)
    return {
        "vision_tower": family.vision_module,
        "projector": family.projector_module,
        "embeddings": f"{DECODER}.embed_tokens",
        "decoder": DECODER,
        "lm_head": "lm_head",
        "context_tokens": "gaze_context",
    }


def _group_of(name: str, groups: dict[str, str]) -> str:
    name = name.replace("base_model.model.", "")
    # the most specific prefix wins (the projector sits inside Qwen's vision tower)
    best = max(
        (g for g, prefix in groups.items() if name == prefix or name.startswith(prefix + ".")),
        key=lambda g: len(groups[g]),
        default="other",
    )
    if "lora_" in name:
        return "lora_adapters"
    return best


def freeze(model: nn.Module, *, vision: bool = True, projector: bool = False) -> None:
    """Freeze the vision tower (without its projector) and/or the projector."""
    groups = module_groups(model)
    frozen = {g for g, on in (("vision_tower", vision), ("projector", projector)) if on}
    for name, param in model.named_parameters():
        if _group_of(name, groups) in frozen:
            param.requires_grad_(False)


def apply_lora(
    model: nn.Module, settings: LoraSettings, *, vision: bool = False, projector: bool = True
):
    """A peft model with LoRA on the decoder; the context tokens (and the ``projector`` and
    ``vision`` tower when trained) stay fully trainable and are saved with the adapter.

    They are trained in place rather than as peft ``modules_to_save`` copies: a copy of a
    ZeRO-3 partitioned module is not a partitioned module.
    """
    from peft import LoraConfig, get_peft_model

    groups = module_groups(model)
    names = "|".join(re.escape(n) for n in settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=rf"{re.escape(DECODER)}\..*\.({names})",
    )
    trained = {"context_tokens"} | ({"projector"} if projector else set())
    trained |= {"vision_tower"} if vision else set()
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if _group_of(name, groups) in trained:
            param.requires_grad_(True)
    return peft_model


def _extra_trained(peft_model) -> list[str]:
    """Names (in the base model) of the trainable parameters that are not LoRA weights."""
    return [
        name.removeprefix("base_model.model.")
        for name, param in peft_model.named_parameters()
        if param.requires_grad and "lora_" not in name
    ]


def trainable_report(model: nn.Module) -> str:
    """Parameters and trainable parameters per module, as a table."""
    groups = module_groups(model)
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = rows.setdefault(_group_of(name, groups), [0, 0])
        count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        row[0] += count
        row[1] += count if param.requires_grad else 0
    total = sum(r[0] for r in rows.values())
    trained = sum(r[1] for r in rows.values())
    lines = [f"{'module':<16}{'parameters':>14}{'trainable':>14}{'%':>8}"]
    for group, (count, train) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{group:<16}{count:>14,}{train:>14,}{100 * train / max(count, 1):>7.1f}%")
    lines.append(f"{'total':<16}{total:>14,}{trained:>14,}{100 * trained / max(total, 1):>7.1f}%")
    return "\n".join(lines)


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file() and (Path(path) / GAZE_BASE_FILE).is_file()


def save_adapter(peft_model, processor, out: str | Path, *, base: str, state_dict=None) -> None:
    """The adapter in peft's format, the fully trained tensors beside it and the processor,
    whose base is ``base`` (the stock checkpoint id or path) converted with the processor's
    gaze config; ``load_model(out)`` rebuilds the model from both. ``state_dict``: the
    model's full state (gathered under ZeRO-3), else read from the model."""
    from safetensors.torch import save_file

    out = Path(out)
    state = state_dict if state_dict is not None else peft_model.state_dict()
    peft_model.save_pretrained(out, state_dict=state)
    extra = {}
    for name in _extra_trained(peft_model):
        key = name if name in state else f"base_model.model.{name}"
        extra[name] = state[key].detach().cpu().contiguous()
    save_file(extra, str(out / TRAINED_FILE))
    processor.save_pretrained(out)
    config = json.loads((out / ADAPTER_FILE).read_text())
    config["base_model_name_or_path"] = base
    (out / ADAPTER_FILE).write_text(json.dumps(config, indent=2))
    gaze = {"base": base, "gaze_config": processor.gaze_config.to_dict()}
    (out / GAZE_BASE_FILE).write_text(json.dumps(gaze, indent=2))


def load_adapter(path: str | Path, *, merge: bool = False, **kwargs):
    """``(model, processor)`` of an adapter checkpoint: its base converted as at training, the
    fully trained tensors and the adapter on top (merged into the weights when ``merge``)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from gazeattn.model import load_model
    from gazeattn.ops import GazeConfig
    from gazeattn.processing import GazeProcessor

    path = Path(path)
    saved = json.loads((path / GAZE_BASE_FILE).read_text())
    model, _ = load_model(saved["base"], gaze=GazeConfig.from_dict(saved["gaze_config"]), **kwargs)
    trained = load_file(str(path / TRAINED_FILE))
    missing = set(trained) - set(model.state_dict())
    if missing:
        raise ValueError(f"{path}: trained tensors {sorted(missing)} are not in the base model")
    model.load_state_dict(trained, strict=False)
    model = PeftModel.from_pretrained(model, path)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, GazeProcessor.from_pretrained(path)


def _gaze_base(model: nn.Module) -> nn.Module:
    from gazeattn.modeling import unwrap

    return unwrap(model)
