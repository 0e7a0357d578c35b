"""Model families: which stock checkpoints convert to which gaze model, and how each lays out media.

A family plugs in by giving, for its token sequence, the visual layout (segment
grids) and how its checkpoint's own processing turns an image or video into
pixel inputs and placeholder tokens (``MediaRules``), and a gaze model class
that subclasses the stock one. Supported:

- ``llava``: ``LlavaForConditionalGeneration`` (CLIP or SigLIP towers, ``"default"`` /
  ``"full"`` feature selection, a feature layer or a list of them; Llama, Mistral,
  Qwen2, Qwen3 decoders): llava-1.5, llava-interleave-qwen, Cambrian-style models.
- ``qwen2_vl`` / ``qwen2_5_vl``: ``Qwen2VLForConditionalGeneration`` and
  ``Qwen2_5_VLForConditionalGeneration`` (dynamic resolution, 2x2 merger, M-RoPE,
  videos as temporal patches).
- ``qwen3_vl`` / ``qwen3_vl_moe``: ``Qwen3VLForConditionalGeneration`` and
  ``Qwen3VLMoeForConditionalGeneration`` (16 px patches, DeepStack, interleaved M-RoPE,
  a timestamp before each temporal patch of a video).
- ``qwen3_5`` / ``qwen3_5_moe``: ``Qwen3_5ForConditionalGeneration`` and
  ``Qwen3_5MoeForConditionalGeneration`` (Qwen3-VL's vision side without DeepStack, a
  hybrid decoder of linear-attention and full-attention layers; gaze routes in the latter).

Any other architecture is refused with an error that names these, and so is a checkpoint
of these whose DeepStack settings or decoder layer types the family does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gazeattn.families.media import LlavaRules, Media, MediaRules, Qwen3VLRules, QwenVLRules

__all__ = [
    "FAMILIES",
    "Family",
    "Media",
    "MediaRules",
    "UnsupportedModel",
    "check_structure",
    "family_of",
    "media_rules",
    "stock_processor",
]


class UnsupportedModel(ValueError):
    """A checkpoint of an architecture gaze attention does not (yet) support."""


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str
    stock_model_type: str
    gaze_model_type: str
    rules: type[MediaRules]
    module: str  # gazeattn.families.<module> defines the gaze config and model classes
    config_class_name: str
    model_class_name: str
    stock_class_name: str
    # module paths in the model: the vision tower (without its projector) and the projector
    vision_module: str
    projector_module: str
    # decoder layer types the gaze model knows (text_config.layer_types), and whether the
    # tower's DeepStack features are added to the decoder
    layer_types: tuple[str, ...] = ("full_attention",)
    deepstack: bool = False

    def classes(self):
        """(gaze config class, gaze model class), imported on first use."""
        import importlib

        module = importlib.import_module(f"gazeattn.families.{self.module}")
        return getattr(module, self.config_class_name), getattr(module, self.model_class_name)

    def stock_class(self):
        import transformers

        return getattr(transformers, self.stock_class_name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llava",
            stock_model_type="llava",
            gaze_model_type="gaze_llava",
            rules=LlavaRules,
            module="llava",
            config_class_name="GazeLlavaConfig",
            model_class_name="GazeLlavaForConditionalGeneration",
            stock_class_name="LlavaForConditionalGeneration",
            vision_module="model.vision_tower",
            projector_module="model.multi_modal_projector",
        ),
        Family(
            name="qwen2_vl",
            stock_model_type="qwen2_vl",
            gaze_model_type="gaze_qwen2_vl",
            rules=QwenVLRules,
            module="qwen2_vl",
            config_class_name="GazeQwen2VLConfig",
            model_class_name="GazeQwen2VLForConditionalGeneration",
            stock_class_name="Qwen2VLForConditionalGeneration",
            vision_module="model.visual",
            projector_module="model.visual.merger",
        ),
        Family(
            name="qwen2_5_vl",
            stock_model_type="qwen2_5_vl",
            gaze_model_type="gaze_qwen2_5_vl",
            rules=QwenVLRules,
            module="qwen2_vl",
            config_class_name="GazeQwen2_5_VLConfig",
            model_class_name="GazeQwen2_5_VLForConditionalGeneration",
            stock_class_name="Qwen2_5_VLForConditionalGeneration",
            vision_module="model.visual",
            projector_module="model.visual.merger",
        ),
        *(
            Family(
                name=name,
                stock_model_type=name,
                gaze_model_type=f"gaze_{name}",
                rules=Qwen3VLRules,
                module="qwen3_vl",
                config_class_name=f"Gaze{cls}Config",
                model_class_name=f"Gaze{cls}ForConditionalGeneration",
                stock_class_name=f"{cls}ForConditionalGeneration",
                vision_module="model.visual",
                projector_module="model.visual.merger",
                layer_types=layer_types,
                deepstack=deepstack,
            )
            for name, cls, layer_types, deepstack in (
                ("qwen3_vl", "Qwen3VL", ("full_attention",), True),
                ("qwen3_vl_moe", "Qwen3VLMoe", ("full_attention",), True),
                ("qwen3_5", "Qwen3_5", ("linear_attention", "full_attention"), False),
                ("qwen3_5_moe", "Qwen3_5Moe", ("linear_attention", "full_attention"), False),
            )
        ),
    )
}

SUPPORTED = (
    "LlavaForConditionalGeneration (model_type 'llava'), Qwen2VLForConditionalGeneration "
    "('qwen2_vl'), Qwen2_5_VLForConditionalGeneration ('qwen2_5_vl'), "
    "Qwen3VLForConditionalGeneration ('qwen3_vl'), Qwen3VLMoeForConditionalGeneration "
    "('qwen3_vl_moe'), Qwen3_5ForConditionalGeneration ('qwen3_5') and "
    "Qwen3_5MoeForConditionalGeneration ('qwen3_5_moe')"
)


def family_of(config) -> Family:
    """The family of a stock or gaze config; UnsupportedModel for any other architecture."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in (family.stock_model_type, family.gaze_model_type):
            check_structure(family, config)
            return family
    raise UnsupportedModel(
        f"model_type {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
        f"is not supported by gaze attention; supported: {SUPPORTED}. LLaVA-NeXT and "
        "LLaVA-OneVision (anyres tiles, image_newline) are refused rather than loaded as LLaVA."
    )


def check_structure(family: Family, config) -> None:
    """Refuse a checkpoint of ``family`` whose decoder layer types or DeepStack settings the
    gaze model does not know (UnsupportedModel), rather than load it as a near relative."""
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"]
    unknown = sorted(set(types) - set(family.layer_types))
    if unknown:
        raise UnsupportedModel(
            f"{family.stock_class_name} checkpoint with decoder layer types {unknown}: the gaze "
            f"model knows {list(family.layer_types)}"
        )
    if "full_attention" not in types:
        raise UnsupportedModel("a decoder without full-attention layers has nothing to route")
    vision = getattr(config, "vision_config", None)
    indexes = getattr(vision, "deepstack_visual_indexes", None)
    if indexes and not family.deepstack:
        raise UnsupportedModel(
            f"{family.stock_class_name} checkpoint with deepstack_visual_indexes {list(indexes)}: "
            "this family adds no DeepStack features to its decoder"
        )
    if family.deepstack:
        depth = getattr(vision, "depth", 0)
        valid = all(isinstance(i, int) and 0 <= i < depth for i in indexes or ())
        if not indexes or not valid or len(indexes) > text.num_hidden_layers:
            raise UnsupportedModel(
                f"{family.stock_class_name} checkpoint with deepstack_visual_indexes "
                f"{indexes!r}: expected 1 to {text.num_hidden_layers} vision layer indexes "
                f"below the tower's depth {depth}"
            )


def media_rules(family: str, vision: dict, image_processor, image_token=None) -> MediaRules:
    if family not in FAMILIES:
        raise UnsupportedModel(f"unknown family {family!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[family].rules(vision, image_processor, image_token)


def stock_processor(cls, path: str, **kwargs):
    """A GazeProcessor (``cls``) over a stock checkpoint's own processing files, no gaze yet."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
    config = AutoConfig.from_pretrained(path, **hub)
    family = family_of(config)
    image_processor = AutoImageProcessor.from_pretrained(path, **hub)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    settings = read_json(path, "processor_config.json", hub)
    settings.update(
        {
            k: v
            for k, v in read_json(path, "preprocessor_config.json", hub).items()
            if k not in settings
        }
    )
    video = read_json(path, "video_preprocessor_config.json", hub)
    vision = family.rules.vision_settings(config, settings, video)
    return cls(
        image_processor,
        tokenizer,
        chat_template=_chat_template(path, tokenizer, hub),
        family=family.name,
        vision=vision,
        image_token=family.rules.image_token_of(tokenizer, settings),
        stop_tokens=_stop_tokens(path, tokenizer, hub),
        max_length=config.text_config.max_position_embeddings,
    )


_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def read_json(path: str, name: str, hub: dict) -> dict[str, Any]:
    from transformers.utils import cached_file

    found = cached_file(
        path,
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )
    return json.loads(Path(found).read_text()) if found else {}


def _chat_template(path: str, tokenizer, hub: dict) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, or the tokenizer's."""
    from transformers.utils import cached_file

    jinja = cached_file(
        path,
        "chat_template.jinja",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub,
    )
    if jinja:
        return Path(jinja).read_text()
    template = read_json(path, "chat_template.json", hub).get("chat_template")
    return template or getattr(tokenizer, "chat_template", None)


def _stop_tokens(path: str, tokenizer, hub: dict) -> list[str]:
    """The model's end-of-turn tokens: the tokenizer's eos and the generation config's."""
    ids = read_json(path, "generation_config.json", hub).get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token and token not in tokens:
            tokens.append(token)
    if not tokens:
        raise UnsupportedModel("the checkpoint's tokenizer has no eos token to end turns with")
    return tokens
