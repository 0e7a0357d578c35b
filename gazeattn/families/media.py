"""How each family's own processing turns an image or a video into pixel inputs and tokens.

A ``Media`` is one image or video after the checkpoint's image processor: its
pixel arrays (in the model's input names), its token grid ``(t, h, w)`` (per
frame ``h * w`` placeholder tokens, after any merge), and ``lead`` tokens that
precede each frame's grid (a CLS token kept by ``"full"`` feature selection).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True)
class Media:
    kind: str  # "image" | "video"
    grid: tuple[int, int, int]
    token: str  # the placeholder each visual token is
    arrays: dict[str, np.ndarray]
    lead: int = 0

    @property
    def part(self) -> list:
        """The JSON-able part of a sample's ``parts`` list (the layout is built from these)."""
        t, h, w = self.grid
        base = ["image", h, w] if self.kind == "image" else ["video", t, h, w]
        return base + ([self.lead] if self.lead else [])

    def runs(self, context_token: str, num_context: int) -> list[tuple[str, int]]:
        """(token, count) runs of this media item in the sequence: each frame, then its context."""
        t, h, w = self.grid
        frame = [(self.token, self.lead + h * w)] + (
            [(context_token, num_context)] if num_context else []
        )
        return frame * t


class MediaRules:
    """The family's markers, token counts and pixel preparation (subclasses per family)."""

    image_marker: str
    video_marker: str
    markers: tuple[str, ...] = ()
    input_names: tuple[str, ...] = ()

    def __init__(self, vision: dict, image_processor, image_token: str | None = None):
        self.vision = vision
        self.image_processor = image_processor
        self.image_token = image_token or self.image_marker
        self.video_token = self.video_marker

    @classmethod
    def vision_settings(cls, config, processor_settings: dict, video_settings: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def image_token_of(cls, tokenizer, processor_settings: dict) -> str:
        return getattr(tokenizer, "image_token", None) or processor_settings.get(
            "image_token", cls.image_marker
        )

    @property
    def visual_tokens(self) -> tuple[str, ...]:
        """The placeholder tokens visual features replace."""
        return (self.image_token,)

    def process_image(self, image, budget) -> Media:
        raise NotImplementedError

    def process_video(self, frames: list, budget) -> Media:
        raise NotImplementedError


class LlavaRules(MediaRules):
    """LLaVA: ``<image>`` becomes one token per patch of the tower's input (plus a CLS when kept).

    The tower sees the image processor's output (CLIP: shortest side resized and centre
    crop; SigLIP: resized square). ``"default"`` feature selection drops the CLS token,
    ``"full"`` keeps it (CLIP has one, SigLIP none). Video frames are images in a row:
    LLaVA has no video token of its own, so gaze adds ``<video>`` to the tokenizer.
    """

    image_marker = "<image>"
    video_marker = "<video>"
    input_names = ("pixel_values",)

    @classmethod
    def vision_settings(cls, config, processor_settings: dict, video_settings: dict) -> dict:
        from gazeattn.families import UnsupportedModel

        vision = config.vision_config
        towers = {"clip_vision_model": 1, "siglip_vision_model": 0, "siglip2_vision_model": 0}
        if vision.model_type not in towers:
            raise UnsupportedModel(
                f"vision tower {vision.model_type!r} is not supported; LLaVA checkpoints with "
                f"{sorted(towers)} towers are"
            )
        strategy = config.vision_feature_select_strategy
        lead = towers[vision.model_type] - (strategy == "default")
        if lead < 0:
            raise UnsupportedModel(
                f"vision_feature_select_strategy 'default' drops the first token of a "
                f"{vision.model_type} tower, which has no CLS token: the patch grid would lose a "
                "patch. Use 'full' for this tower."
            )
        return {"patch_size": int(vision.patch_size), "lead": int(lead)}

    def _media(self, kind: str, frames: list) -> Media:
        out = self.image_processor(images=frames, return_tensors="np")
        pixels = np.ascontiguousarray(out["pixel_values"], np.float32)  # [F, 3, H, W]
        p = self.vision["patch_size"]
        return Media(
            kind=kind,
            grid=(len(frames), pixels.shape[-2] // p, pixels.shape[-1] // p),
            token=self.image_token,
            arrays={"pixel_values": pixels},
            lead=self.vision["lead"],
        )

    def process_image(self, image, budget) -> Media:
        return self._media("image", [image])

    def process_video(self, frames: list, budget) -> Media:
        return self._media("video", frames)


class QwenVLRules(MediaRules):
    """Qwen2-VL / Qwen2.5-VL: each image is resized into the pixel budget (sides a multiple of
    ``patch * merge``), cut into patches, and every ``merge x merge`` patches become one
    ``<|image_pad|>`` token; a video's frames are stacked ``temporal_patch_size`` at a time
    and each temporal slice is a frame of ``<|video_pad|>`` tokens.

    Video frames are resized and normalised by the image processor's own methods
    (transformers' Qwen video processor needs torchvision, which our CPU machines lack:
    its resize is torchvision's, ours PIL's), then patched as that processor does. Frames
    given without timing are taken as sampled at 2 fps: one second per temporal patch of 2.
    """

    image_marker = "<|image_pad|>"
    video_marker = "<|video_pad|>"
    markers = ("<|vision_start|>", "<|vision_end|>")
    input_names = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )
    default_fps = 2.0

    @classmethod
    def vision_settings(cls, config, processor_settings: dict, video_settings: dict) -> dict:
        vision = config.vision_config
        size = video_settings.get("size") or {}
        return {
            "patch_size": int(vision.patch_size),
            "merge_size": int(vision.spatial_merge_size),
            "temporal_patch_size": int(vision.temporal_patch_size),
            "video_min_pixels": video_settings.get("min_pixels") or size.get("shortest_edge"),
            "video_max_pixels": video_settings.get("max_pixels") or size.get("longest_edge"),
        }

    @classmethod
    def image_token_of(cls, tokenizer, processor_settings: dict) -> str:
        return getattr(tokenizer, "image_token", None) or cls.image_marker

    @property
    def visual_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.video_token)

    def _size(self, budget, *, video: bool):
        from transformers.image_utils import SizeDict

        size = self.image_processor.size
        low, high = budget.min_pixels, budget.max_pixels
        if video:
            low = low or self.vision.get("video_min_pixels")
            high = high or self.vision.get("video_max_pixels")
        return SizeDict(
            shortest_edge=low or size.shortest_edge, longest_edge=high or size.longest_edge
        )

    def process_image(self, image, budget) -> Media:
        size = self._size(budget, video=False)
        out = self.image_processor(
            images=[image],
            size={"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge},
            return_tensors="np",
        )
        grid = np.asarray(out["image_grid_thw"], np.int64)
        merge = self.vision["merge_size"]
        _, gh, gw = (int(x) for x in grid[0])
        return Media(
            kind="image",
            grid=(1, gh // merge, gw // merge),
            token=self.image_token,
            arrays={
                "pixel_values": np.ascontiguousarray(out["pixel_values"], np.float32),
                "image_grid_thw": grid,
            },
        )

    def process_video(self, frames: list, budget) -> Media:
        ip = self.image_processor
        p, merge, tps = (
            self.vision[k] for k in ("patch_size", "merge_size", "temporal_patch_size")
        )
        size = self._size(budget, video=True)
        prepared = []
        for frame in frames:
            array = np.asarray(frame, np.uint8).transpose(2, 0, 1)  # [C, H, W]
            array = ip.resize(array, size=size, resample=ip.resample, factor=p * merge)
            array = ip.rescale(array.astype(np.float32), ip.rescale_factor)
            prepared.append(ip.normalize(array, ip.image_mean, ip.image_std))
        video = np.stack(prepared).astype(np.float32)  # [F, C, H, W]
        if pad := -len(video) % tps:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        f, c, height, width = video.shape
        gt, gh, gw = f // tps, height // p, width // p
        # as transformers' Qwen2VLVideoProcessor.patchify: [gt, tps, C, gh/m, m, p, gw/m, m, p]
        # -> [gt, gh/m, gw/m, m, m, C, tps, p, p], one row per patch in merge-window order
        patches = video.reshape(gt, tps, c, gh // merge, merge, p, gw // merge, merge, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tps * p * p), np.float32)
        return Media(
            kind="video",
            grid=(gt, gh // merge, gw // merge),
            token=self.video_token,
            arrays={
                "pixel_values_videos": flat,
                "video_grid_thw": np.asarray([[gt, gh, gw]], np.int64),
                "second_per_grid_ts": np.asarray([tps / self.default_fps], np.float32),
            },
        )
