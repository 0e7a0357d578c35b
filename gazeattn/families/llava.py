"""The LLaVA family's gaze model: ``LlavaForConditionalGeneration`` with gaze attention in its decoder."""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaForConditionalGeneration

from gazeattn.modeling import GazeModelMixin


@strict
class GazeLlavaConfig(LlavaConfig):
    """LlavaConfig plus the gaze settings (``gaze_config`` is ``GazeConfig.to_dict()``)."""

    model_type = "gaze_llava"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


class GazeLlavaForConditionalGeneration(GazeModelMixin, LlavaForConditionalGeneration):
    """LLaVA with gaze attention in the decoder and learnable context tokens."""

    config_class = GazeLlavaConfig

    def __init__(self, config: GazeLlavaConfig):
        super().__init__(config)
        self._init_gaze(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        gaze_layout=None,
        gaze_report: bool = False,
        gaze_selection: bool = False,
        **kwargs,
    ):
        """LLaVA's forward plus ``gaze_layout`` (see ``GazeModelMixin._gaze_forward``)."""
        return self._gaze_forward(
            input_ids,
            {"pixel_values": pixel_values},
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            gaze_layout=gaze_layout,
            gaze_report=gaze_report,
            gaze_selection=gaze_selection,
            **kwargs,
        )

    def _placeholder_ids(self) -> list[int]:
        return [self.config.image_token_id]

    def _visual_embeds(self, vision: dict) -> list[tuple[int, torch.Tensor]]:
        pixels = vision.get("pixel_values")
        if pixels is None or pixels.shape[0] == 0:
            return []
        features = self.model.get_image_features(
            pixel_values=pixels.to(self.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        return [(self.config.image_token_id, torch.cat(list(features), dim=0))]

    def _blank_vision(self) -> dict:
        size = self.config.vision_config.image_size
        return {"pixel_values": torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)}

    def _positions(self, input_ids, attention_mask, position_ids, cache, state, vision):
        if position_ids is not None or attention_mask is None:
            return position_ids
        past = cache.get_seq_length() if cache is not None else 0
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, past : past + input_ids.shape[1]]
