"""The Qwen3-VL and Qwen3.5 families' gaze models (dense and MoE decoders).

They share the Qwen-VL gaze model of ``gazeattn.families.qwen2_vl`` (M-RoPE positions
numbered from the layout, one vision-tower call per forward) and differ from it in:

- **Timestamped videos.** The stock processor writes each temporal patch of a video as
  ``<t seconds><|vision_start|>`` + its tokens + ``<|vision_end|>``, and the stock
  ``get_rope_index`` numbers each temporal patch as an image of its own (grid
  ``(1, h, w)``, the timestamps as text between them). The processor
  (``gazeattn.families.media.Qwen3VLRules``) lays out each temporal patch as a span of
  its own, so the Qwen-VL numbering gives the stock positions; interleaved M-RoPE only
  changes how the stock rotary embedding spreads the three sections over the head, not
  the positions. A context token is numbered like text right after its own span (the
  Qwen2.5-VL rule): ``max(h, w)`` past the span's start, then one step per context token.
- **DeepStack (Qwen3-VL).** Features of some vision layers are added to the hidden states
  at the visual positions after the first decoder layers. **Context tokens receive
  nothing from these injections**: the stock model injects at the placeholder positions
  only, and a context token is a learned summary of its frame that reads the frame
  through attention (where the injected features are already in the visual tokens'
  states); adding the frame's mean would feed it the same features twice and tie the
  learned token to the tower's scale. The injections reach exactly the visual tokens,
  images and videos in sequence order (``GazeModelMixin._deepstack_inputs``).
- **Hybrid decoder (Qwen3.5).** Only the ``full_attention`` layers attend, so only they
  route (gaze attention is their attention function) and only they hold keys and values;
  the ``linear_attention`` layers run unchanged over every token and keep their
  recurrent state in transformers' hybrid cache. KV savings and routing reports count
  the full-attention layers (the others never report). ``gaze_layers`` may name only
  full-attention layers.

A checkpoint whose DeepStack settings or layer types these rules do not cover is refused
(``gazeattn.families.check_structure``), never loaded as a near relative.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

from gazeattn.families.qwen2_vl import _GazeQwenVL


@strict
class GazeQwen3VLConfig(Qwen3VLConfig):
    """Qwen3VLConfig plus the gaze settings (``gaze_config`` is ``GazeConfig.to_dict()``)."""

    model_type = "gaze_qwen3_vl"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


@strict
class GazeQwen3VLMoeConfig(Qwen3VLMoeConfig):
    """Qwen3VLMoeConfig plus the gaze settings."""

    model_type = "gaze_qwen3_vl_moe"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


@strict
class GazeQwen3_5Config(Qwen3_5Config):
    """Qwen3_5Config plus the gaze settings."""

    model_type = "gaze_qwen3_5"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


@strict
class GazeQwen3_5MoeConfig(Qwen3_5MoeConfig):
    """Qwen3_5MoeConfig plus the gaze settings."""

    model_type = "gaze_qwen3_5_moe"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


class _GazeDeepStack(_GazeQwenVL):
    """Qwen3-VL: the tower's DeepStack features go to the decoder with the visual features."""

    def _visual_embeds(self, vision: dict) -> list[tuple]:
        # (placeholder id, features [N, hidden], DeepStack features per injected layer)
        return self._qwen_visual_embeds(vision, deepstack=True)


class _GazeHybrid(_GazeQwenVL):
    """A hybrid decoder: the cache must hold recurrent states for the linear-attention layers."""

    def _init_gaze(self, config) -> None:
        super()._init_gaze(config)
        types = config.text_config.layer_types
        wrong = [i for i in self.gaze_layers or () if types[i] != "full_attention"]
        if wrong:
            raise ValueError(
                f"gaze_layers {wrong} are linear-attention layers; gaze routes only in the "
                f"full-attention layers {[i for i, t in enumerate(types) if t == 'full_attention']}"
            )

    def _gaze_cache(self, cache):
        return hybrid_cache(cache, self.config)


def hybrid_cache(cache, config):
    """``cache`` with transformers' layer per decoder layer type, when it was built empty and
    without the model's config (``GazeCache()`` in generation and the engine's prefill):
    linear-attention layers keep conv and recurrent states, full-attention layers keys and
    values. A cache that already has layers is returned unchanged."""
    if cache is None or cache.layers or getattr(cache, "layer_class_to_replicate", None) is None:
        return cache
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    cache.layers = [
        DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for t, kw in zip(types, kwargs, strict=True)
    ]
    cache.layer_class_to_replicate = None
    return cache


class GazeQwen3VLForConditionalGeneration(_GazeDeepStack, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with gaze attention in the decoder and learnable context tokens."""

    config_class = GazeQwen3VLConfig


class GazeQwen3VLMoeForConditionalGeneration(_GazeDeepStack, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE with gaze attention in the decoder and learnable context tokens."""

    config_class = GazeQwen3VLMoeConfig


class GazeQwen3_5ForConditionalGeneration(_GazeHybrid, Qwen3_5ForConditionalGeneration):
    """Qwen3.5 with gaze attention in its full-attention layers and learnable context tokens."""

    config_class = GazeQwen3_5Config


class GazeQwen3_5MoeForConditionalGeneration(_GazeHybrid, Qwen3_5MoeForConditionalGeneration):
    """Qwen3.5-MoE with gaze attention in its full-attention layers and context tokens."""

    config_class = GazeQwen3_5MoeConfig


__all__ = [
    "GazeQwen3VLConfig",
    "GazeQwen3VLForConditionalGeneration",
    "GazeQwen3VLMoeConfig",
    "GazeQwen3VLMoeForConditionalGeneration",
    "GazeQwen3_5Config",
    "GazeQwen3_5ForConditionalGeneration",
    "GazeQwen3_5MoeConfig",
    "GazeQwen3_5MoeForConditionalGeneration",
    "hybrid_cache",
]
