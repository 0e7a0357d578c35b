"""The Qwen2-VL / Qwen2.5-VL family's gaze models: M-RoPE positions that know the context tokens.

The stock models number positions from ``mm_token_type_ids`` and the grids
(``get_rope_index``): text runs count up, each image or video takes a
``(t, h, w)`` block of rotary positions from the current start, and the start
then moves by the larger side of the merged grid. The gaze models number them
from the layout instead, the same way, with each span's context tokens placed
after it like text. With no context tokens the positions equal the stock
model's; a decode step continues from where the prompt's numbering ended.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from gazeattn.modeling import GazeModelMixin
from gazeattn.ops import GazeLayout, TokenKind


@strict
class GazeQwen2VLConfig(Qwen2VLConfig):
    """Qwen2VLConfig plus the gaze settings (``gaze_config`` is ``GazeConfig.to_dict()``)."""

    model_type = "gaze_qwen2_vl"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


@strict
class GazeQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """Qwen2_5_VLConfig plus the gaze settings (``gaze_config`` is ``GazeConfig.to_dict()``)."""

    model_type = "gaze_qwen2_5_vl"

    gaze_config: dict | None = None
    context_token_id: int | None = None
    gaze_layers: list[int] | None = None


class _GazeQwenVL(GazeModelMixin):
    def __init__(self, config):
        super().__init__(config)
        self._init_gaze(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        gaze_layout=None,
        gaze_report: bool = False,
        gaze_selection: bool = False,
        **kwargs,
    ):
        """The stock forward plus ``gaze_layout`` (see ``GazeModelMixin._gaze_forward``).

        ``position_ids`` and ``mm_token_type_ids`` are not used: positions are numbered from
        the layout, which knows the context tokens.
        """
        vision = {
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "pixel_values_videos": pixel_values_videos,
            "video_grid_thw": video_grid_thw,
            "second_per_grid_ts": second_per_grid_ts,
        }
        return self._gaze_forward(
            input_ids,
            vision,
            attention_mask=attention_mask,
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
        return [self.config.image_token_id, self.config.video_token_id]

    def _visual_embeds(self, vision: dict) -> list[tuple]:
        return self._qwen_visual_embeds(vision, deepstack=False)

    def _qwen_visual_embeds(self, vision: dict, *, deepstack: bool) -> list[tuple]:
        """(placeholder id, features [N, hidden]) per kind of media in the batch; with
        ``deepstack`` (Qwen3-VL) a third item, the DeepStack features per injected layer."""
        # images and videos go through the tower in one call: under ZeRO-3 every rank must
        # gather the tower's parameters as often as the others, whatever its batch holds
        kinds = []
        for token, pixels, grid in (
            (self.config.image_token_id, "pixel_values", "image_grid_thw"),
            (self.config.video_token_id, "pixel_values_videos", "video_grid_thw"),
        ):
            if vision.get(pixels) is not None and vision[pixels].shape[0] > 0:
                kinds.append((token, vision[pixels], vision[grid]))
        if not kinds:
            return []
        output = self.model.get_image_features(
            torch.cat([pixels for _, pixels, _ in kinds]).to(self.dtype),
            torch.cat([grid for _, _, grid in kinds]),
            return_dict=True,
        )
        features = output.pooler_output
        out, start = [], 0
        for token, _, grid in kinds:
            items = slice(start, start + grid.shape[0])
            piece = (token, torch.cat(list(features[items]), dim=0))
            if deepstack:
                # [per injected layer: per item [n, hidden]] -> per layer [N, hidden]
                layers = output.deepstack_features or []
                piece += ([torch.cat(list(layer[items]), dim=0) for layer in layers],)
            out.append(piece)
            start += grid.shape[0]
        return out

    def _blank_vision(self) -> dict:
        vision = self.config.vision_config
        merge, patch = vision.spatial_merge_size, vision.patch_size
        width = vision.in_channels * vision.temporal_patch_size * patch * patch
        return {
            "pixel_values": torch.zeros(merge * merge, width, device=self.device, dtype=self.dtype),
            "image_grid_thw": torch.tensor([[1, merge, merge]], device=self.device),
        }

    def _time_interval(self, seconds: torch.Tensor | None, video: int):
        """Rotary steps between temporal patches of the ``video``-th video of the batch."""
        return 1

    def _positions(self, input_ids, attention_mask, position_ids, cache, state, vision):
        # positions come from the layout (the given ones, e.g. generate's, know no context tokens)
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=self.device)
        if past == 0 or state.rope_deltas is None:
            positions, deltas = mrope_positions(
                state.layout,
                attention_mask[:, : past + length],
                lambda video: self._time_interval(vision.get("second_per_grid_ts"), video),
            )
            state.rope_deltas = deltas
            return positions[:, :, past : past + length]
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + length]
        return (text + state.rope_deltas).unsqueeze(0).expand(3, -1, -1)


def mrope_positions(
    layout: GazeLayout, mask: torch.Tensor, interval
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, T] of a laid-out batch and the decode deltas [B, 1].

    ``interval(video)`` is the temporal step of the batch's ``video``-th video. A decode
    token's position is its text index (among valid tokens) plus its row's delta.
    """
    batch, total = mask.shape
    device = mask.device
    positions = torch.zeros(3, batch, total, dtype=torch.long, device=device)
    deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    kinds = layout.padded(total)[0].to(device)
    video = 0
    for b in range(batch):
        text = (kinds[b] == TokenKind.TEXT) & mask[b].bool()
        cur, prev = 0, 0
        for span in layout.spans[b]:
            t, h, w = span.grid
            first = span.frame_offsets[0]
            cur = _number_text(positions[:, b], text, prev, first, cur)
            step = interval(video) if span.is_video else 1
            video += int(span.is_video)
            temporal = (torch.arange(t, device=device) * step).long()
            rows = torch.arange(h, device=device).repeat_interleave(w)
            cols = torch.arange(w, device=device).repeat(h)
            for f, offset in enumerate(span.frame_offsets):
                frame = slice(offset, offset + h * w)
                positions[0, b, frame] = cur + temporal[f]
                positions[1, b, frame] = cur + rows
                positions[2, b, frame] = cur + cols
            cur += max(h, w)
            context = [c for frame in span.context_offsets for c in frame]
            if context:
                index = torch.tensor(context, device=device)
                positions[:, b, index] = cur + torch.arange(len(context), device=device)
                cur += len(context)
            end = max([span.frame_offsets[-1] + h * w, *[c + 1 for c in context]])
            if bool(text[first:end].any()):
                raise ValueError("text tokens inside an image or video span are not supported")
            prev = end
        cur = _number_text(positions[:, b], text, prev, total, cur)
        deltas[b] = cur - int(mask[b].sum())
    return positions, deltas


def _number_text(row: torch.Tensor, text: torch.Tensor, start: int, end: int, cur: int) -> int:
    """Number the text tokens of ``[start, end)`` from ``cur`` on (all three sections equal)."""
    index = torch.nonzero(text[start:end]).flatten() + start
    row[:, index] = cur + torch.arange(len(index), device=row.device)
    return cur + len(index)


class GazeQwen2VLForConditionalGeneration(_GazeQwenVL, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with gaze attention in the decoder and learnable context tokens."""

    config_class = GazeQwen2VLConfig


class GazeQwen2_5_VLForConditionalGeneration(_GazeQwenVL, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with gaze attention in the decoder and learnable context tokens."""

    config_class = GazeQwen2_5_VLConfig

    def _time_interval(self, seconds: torch.Tensor | None, video: int):
        # as the stock get_rope_index: tokens_per_second x seconds per temporal patch
        per_second = self.config.vision_config.tokens_per_second
        return per_second * (seconds[video] if seconds is not None else 1)
