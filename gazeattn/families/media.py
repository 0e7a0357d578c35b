"""How each family's own processing turns an image or a video into pixel inputs and tokens.

A ``Media`` is one image or video after the checkpoint's image processor: its
pixel arrays (in the model's input names), its token grid ``(t, h, w)`` (per
frame ``h * w`` placeholder tokens, after any merge), and ``lead`` tokens that
precede each frame's grid (a CLS token kept by ``"full"`` feature selection).
A Qwen3-VL video also has text around each temporal patch (``frame_text``: its
timestamp and vision start before, its vision end after), and each temporal patch
is then a span of the layout of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from gazeattn.ops import Image, Video

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Media:
    kind: str  # "image" | "video"
    grid: tuple[int, int, int]
    token: str  # the placeholder each visual token is
    arrays: dict[str, np.ndarray]
    lead: int = 0
    # per frame (text before, text after) its tokens; empty: the frames follow each other
    frame_text: tuple[tuple[str, str], ...] = ()

    @property
    def part(self) -> Image | Video:
        """This item as a part of its sample's layout."""
        t, h, w = self.grid
        if self.kind == "image":
            return Image(h, w, lead=self.lead)
        return Video(t, h, w, lead=self.lead)

    def runs(self, context_token: str, num_context: int) -> list[tuple[str, int]]:
        """(token, count) runs of this media item in the sequence: each frame, then its context."""
        t, h, w = self.grid
        frame = [(self.token, self.lead + h * w)] + (
            [(context_token, num_context)] if num_context else []
        )
        return frame * t

    def spans(self, context_token: str, num_context: int) -> list[tuple[Image | Video, list]]:
        """(part, runs) of each span of the layout this item is: the item itself, or for a
        video with text between its frames, each frame."""
        if not self.frame_text:
            return [(self.part, self.runs(context_token, num_context))]
        _, h, w = self.grid
        frame = Media(kind=self.kind, grid=(1, h, w), token=self.token, arrays={}, lead=self.lead)
        return [(frame.part, frame.runs(context_token, num_context))] * self.grid[0]

    def text(self, context_token: str, num_context: int) -> str:
        """The placeholder text this item becomes in the prompt (tokenized with the rest)."""
        out = []
        for i, (_, runs) in enumerate(self.spans(context_token, num_context)):
            before, after = self.frame_text[i] if self.frame_text else ("", "")
            out.append(before + "".join(token * n for token, n in runs) + after)
        return "".join(out)


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

    @property
    def pixel_names(self) -> tuple[str, ...]:
        """The input names that hold pixels (the rest are their grids and timings): what a
        prefill on a cached visual prefix never reads."""
        return tuple(n for n in self.input_names if n.startswith("pixel_values"))

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

    def process_clip(self, clip, budget) -> Media:
        """A ``gazeattn.video.Clip``: its frames as ``process_video`` takes them (a family
        whose prompt shows the frames' times reads the clip's timing too)."""
        return self.process_video(list(clip.frames), budget)

    def fit_image(self, image, budget):
        """``image`` (RGB) at the size this family's processing resizes it to, where that is
        smaller: the image processor's own resize, done as soon as an image is decoded, so
        that a request holds no more pixels than its encoding uses. Encoding the result
        resizes it to its own size, which PIL does as a copy: the encoded pixels are the
        original's (tests/model/test_media_fit.py checks it for every family)."""
        if not self.image_processor.do_resize:
            return image
        return _smaller(image, self._resized(_chw(image), budget, video=False))

    def fit_video(self, frames: list, budget) -> list:
        """The frames of a video given without timing (as ``process_video`` takes them), each
        at the size its processing resizes it to, where that is smaller."""
        if not self.image_processor.do_resize:
            return list(frames)
        return [_smaller(f, self._resized(_chw(f), budget, video=True)) for f in frames]

    def _resized(self, array: np.ndarray, budget, *, video: bool) -> np.ndarray:
        """The image processor's resize of one uint8 [C, H, W] image or frame."""
        raise NotImplementedError


def _chw(image) -> np.ndarray:
    return np.asarray(image, np.uint8).transpose(2, 0, 1)


def _smaller(image, resized: np.ndarray):
    """``resized`` ([C, H, W]) as an image when it has fewer pixels than ``image``."""
    if resized.shape[1] * resized.shape[2] >= image.width * image.height:
        return image
    from PIL import Image as PILImage

    return PILImage.fromarray(np.ascontiguousarray(resized.transpose(1, 2, 0)))


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

    def _resized(self, array: np.ndarray, budget, *, video: bool) -> np.ndarray:
        ip = self.image_processor
        return ip.resize(array, size=ip.size, resample=ip.resample)

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

    def _resized(self, array: np.ndarray, budget, *, video: bool) -> np.ndarray:
        ip = self.image_processor
        factor = self.vision["patch_size"] * self.vision["merge_size"]
        size = self._size(budget, video=video)
        return ip.resize(array, size=size, resample=ip.resample, factor=factor)

    def process_video(self, frames: list, budget) -> Media:
        ip = self.image_processor
        p, merge, tps = (
            self.vision[k] for k in ("patch_size", "merge_size", "temporal_patch_size")
        )
        prepared = []
        for frame in frames:
            array = self._resized(_chw(frame), budget, video=True)
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


class Qwen3VLRules(QwenVLRules):
    """Qwen3-VL / Qwen3.5: images as Qwen2.5-VL's (16 px patches); videos as transformers'
    ``Qwen3VLVideoProcessor`` and ``Qwen3VLProcessor`` make them, without torchvision:

    - frames are sampled (when the checkpoint's ``do_sample_frames``, the default) at
      ``fps`` frames per second of video, between ``min_frames`` and ``max_frames`` and at
      most every frame, evenly (``np.linspace`` rounded) over the frames given;
    - the video's frames share one size from the video rule of ``smart_resize`` (the pixel
      bounds are over all frames; ``cap_pixels_per_frame`` as the stock option), resized
      and normalised by the image processor, and patched as the stock ``patchify``;
    - each temporal patch of ``temporal_patch_size`` frames is written
      ``<{t:.1f} seconds><|vision_start|>`` + its tokens + ``<|vision_end|>``, where ``t``
      is the mean time of its first and last frame (frame index / the video's fps).

    A clip without fps (frames given without timing) takes the stock default of 24 fps for
    sampling and timestamps, and says so once. A clip whose ``indices`` are given is taken
    as sampled already (the stock ``do_sample_frames=False`` with metadata).
    """

    input_names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    default_video_fps = 24.0
    _warned_fps = False

    @classmethod
    def vision_settings(cls, config, processor_settings: dict, video_settings: dict) -> dict:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        stock = Qwen3VLVideoProcessor
        vision = config.vision_config
        size = video_settings.get("size") or stock.size
        out = {
            "patch_size": int(vision.patch_size),
            "merge_size": int(vision.spatial_merge_size),
            "temporal_patch_size": int(vision.temporal_patch_size),
            "video_min_pixels": int(size["shortest_edge"]),
            "video_max_pixels": int(size["longest_edge"]),
        }
        for key in ("do_sample_frames", "fps", "num_frames", "min_frames", "max_frames"):
            out[key] = video_settings.get(key, getattr(stock, key))
        for key in ("cap_pixels_per_frame", "max_video_tokens"):
            out[key] = video_settings.get(key, getattr(stock, key))
        return out

    def process_video(self, frames: list, budget) -> Media:
        from gazeattn.video import Clip

        return self.process_clip(Clip(frames=list(frames)), budget)

    def process_clip(self, clip, budget) -> Media:
        fps = clip.fps
        if fps is None:
            if not Qwen3VLRules._warned_fps:
                logger.warning(
                    "a video without fps metadata: its frames are sampled and timestamped as "
                    "Qwen3-VL's processor does by default, at %s fps",
                    self.default_video_fps,
                )
                Qwen3VLRules._warned_fps = True
            fps = self.default_video_fps
        frames, indices = list(clip.frames), clip.indices
        if indices is None:
            picked = self._picked(len(frames), fps)
            frames, indices = [frames[i] for i in picked], picked.tolist()
        pixels, grid = self._pixels(frames, budget)
        start, end = self.markers
        text = tuple(
            (f"<{t:.1f} seconds>{start}", end)
            for t in timestamps(indices, fps, self.vision["temporal_patch_size"])
        )
        merge = self.vision["merge_size"]
        return Media(
            kind="video",
            grid=(grid[0], grid[1] // merge, grid[2] // merge),
            token=self.video_token,
            arrays={"pixel_values_videos": pixels, "video_grid_thw": np.asarray([grid], np.int64)},
            frame_text=text,
        )

    def fit_video(self, frames: list, budget) -> list:
        """The frames at the one size their video is resized to (from as many frames as the
        sampling keeps of them, at the default fps of frames given without timing)."""
        frames = list(frames)
        if not frames or len({f.size for f in frames}) > 1 or not self.image_processor.do_resize:
            return frames  # (frames of different sizes are refused when encoded)
        count = len(self._picked(len(frames), self.default_video_fps))
        height, width = self._video_size(count, frames[0].height, frames[0].width, budget)
        return [_smaller(f, self._resize_to(_chw(f), height, width)) for f in frames]

    def _picked(self, total: int, fps: float) -> np.ndarray:
        """Which of ``total`` frames given without indices are encoded."""
        if self.vision["do_sample_frames"]:
            return self.frame_indices(total, fps)
        return np.arange(total)

    def frame_indices(self, total: int, fps: float) -> np.ndarray:
        """Which of ``total`` frames of a ``fps`` video the stock ``sample_frames`` keeps."""
        v = self.vision
        count = v["num_frames"]
        if count is None and v["fps"] is not None:
            count = int(total / fps * v["fps"])
            count = min(max(count, v["min_frames"]), v["max_frames"], total)
        if count is None:
            count = min(max(total, v["min_frames"]), v["max_frames"])
        return np.linspace(0, total - 1, count).round().astype(int)

    def _pixels(self, frames: list, budget) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Patches [gt * gh * gw, C * tps * p * p] of the frames, and the grid (gt, gh, gw)."""
        ip = self.image_processor
        p, merge, tps = (
            self.vision[k] for k in ("patch_size", "merge_size", "temporal_patch_size")
        )
        arrays = [_chw(frame) for frame in frames]  # [C, H, W]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("the frames of a video must have one size")
        height, width = self._video_size(len(arrays), *arrays[0].shape[1:], budget)
        prepared = []
        for array in arrays:
            array = self._resize_to(array, height, width)
            array = ip.rescale(array.astype(np.float32), ip.rescale_factor)
            prepared.append(ip.normalize(array, ip.image_mean, ip.image_std))
        video = np.stack(prepared).astype(np.float32)  # [F, C, H, W]
        if pad := -len(video) % tps:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        f, c, _, _ = video.shape
        gt, gh, gw = f // tps, height // p, width // p
        # as the stock patchify: [gt, tps, C, gh/m, m, p, gw/m, m, p]
        # -> [gt, gh/m, gw/m, m, m, C, tps, p, p], one row per patch in merge-window order
        patches = video.reshape(gt, tps, c, gh // merge, merge, p, gw // merge, merge, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tps * p * p), np.float32)
        return flat, (gt, gh, gw)

    def _video_size(self, frames: int, height: int, width: int, budget) -> tuple[int, int]:
        """(height, width) of every frame of a ``frames``-frame video of that size."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        factor = self.vision["patch_size"] * self.vision["merge_size"]
        low, high = self._video_bounds(budget, frames, factor)
        return smart_resize(
            num_frames=frames,
            height=height,
            width=width,
            temporal_factor=self.vision["temporal_patch_size"],
            factor=factor,
            min_pixels=low,
            max_pixels=high,
        )

    def _resize_to(self, array: np.ndarray, height: int, width: int) -> np.ndarray:
        """The image processor's own resize (PIL) of a [C, H, W] frame to that size: its
        parent class's, since its own resize picks a per-image size."""
        from transformers.image_utils import SizeDict

        ip = self.image_processor
        resize = next(c for c in type(ip).__mro__[1:] if "resize" in c.__dict__).resize
        return resize(
            ip, image=array, size=SizeDict(height=height, width=width), resample=ip.resample
        )

    def _video_bounds(self, budget, frames: int, factor: int) -> tuple[int, int]:
        """(min, max) pixels over all of a video's frames: the checkpoint's, or the budget's
        per-frame bounds times the frames; capped per frame as the stock option says."""
        v = self.vision
        low = budget.min_pixels * frames if budget.min_pixels else v["video_min_pixels"]
        high = budget.max_pixels * frames if budget.max_pixels else v["video_max_pixels"]
        if v["cap_pixels_per_frame"]:
            cap = v["max_video_tokens"] * factor * factor
            high = max(min(cap, high // frames), int(low * 1.05)) * frames
        return low, high


def timestamps(indices, fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame (the last
    frame repeated to fill the final patch), as the stock Qwen3-VL processor computes them."""
    indices = list(indices)
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    times = [i / fps for i in indices]
    step = temporal_patch_size
    return [(times[i] + times[i + step - 1]) / 2 for i in range(0, len(times), step)]
