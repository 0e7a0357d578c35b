"""GazeProcessor: chat messages + images/videos -> token ids, labels, pixels and the gaze layout.

Each image (or video frame) becomes ``h * w`` image tokens followed by the
model's context-token placeholders; the layout built from the same parts tells
the attention where every segment, region and context token is. No
torchvision: images are resized with PIL and normalised with numpy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from gazeattn.ops import GazeConfig, GazeLayout, Image, Video, build_layout

PROCESSOR_FILE = "gaze_processor.json"
IGNORE = -100


class ProcessorInputError(ValueError):
    """A request or sample the processor cannot encode; the message says what is wrong."""


class SequenceTooLong(ProcessorInputError):
    def __init__(self, length: int, limit: int):
        super().__init__(f"sequence of {length} tokens exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


@dataclass(kw_only=True)
class ProcessorSettings:
    image_size: int
    patch_size: int
    num_context_tokens: int = 4
    region_size: tuple[int, int, int] = (1, 6, 6)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_length: int = 32768
    max_media: int = 64


class GazeProcessor:
    """Text + images + videos -> model inputs, following transformers' processor conventions."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        settings: ProcessorSettings,
        gaze_config: GazeConfig | None = None,
    ):
        self.tokenizer = tokenizer
        self.settings = settings
        self.gaze_config = gaze_config
        self.image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        self.context_token_id = tokenizer.convert_tokens_to_ids(tokenizer.context_token)
        self.image_token = tokenizer.image_token
        self.video_token = tokenizer.video_token
        self.chat_template = tokenizer.chat_template

    # ---- construction and persistence

    @classmethod
    def from_model_config(
        cls, tokenizer, model_config, gaze_config: GazeConfig | None
    ) -> GazeProcessor:
        vision = model_config.vision_config
        n_ctx = gaze_config.num_context_tokens if gaze_config else 0
        region = gaze_config.region_size if gaze_config else (1, 6, 6)
        settings = ProcessorSettings(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_context_tokens=n_ctx,
            region_size=region,
            max_length=model_config.text_config.max_position_embeddings,
        )
        return cls(tokenizer, settings, gaze_config)

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        data = {
            "settings": {**self.settings.__dict__, "region_size": list(self.settings.region_size)},
            "gaze_config": self.gaze_config.to_dict() if self.gaze_config else None,
        }
        (out / PROCESSOR_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, gaze_config: GazeConfig | None = None
    ) -> GazeProcessor:
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        data = json.loads((path / PROCESSOR_FILE).read_text())
        settings = data["settings"]
        settings["region_size"] = tuple(settings["region_size"])
        for key in ("image_mean", "image_std"):
            settings[key] = tuple(settings[key])
        saved = GazeConfig.from_dict(data["gaze_config"]) if data.get("gaze_config") else None
        processor = cls(tokenizer, ProcessorSettings(**settings), gaze_config or saved)
        if gaze_config is not None:
            processor.settings.num_context_tokens = gaze_config.num_context_tokens
            processor.settings.region_size = gaze_config.region_size
        return processor

    # ---- images

    @property
    def grid(self) -> int:
        return self.settings.image_size // self.settings.patch_size

    @property
    def regions_per_frame(self) -> int:
        _, rh, rw = self.settings.region_size
        return -(-self.grid // rh) * -(-self.grid // rw)

    def preprocess_image(self, image: Any) -> np.ndarray:
        """PIL image or HWC uint8 array -> [3, S, S] float32, resized and normalised."""
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
                raise ProcessorInputError(
                    f"an image array must be HxWx{{1,3,4}} uint8, got {image.shape} {image.dtype}"
                )
            image = PILImage.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
        if not isinstance(image, PILImage.Image):
            raise ProcessorInputError(
                f"an image must be a PIL image or a uint8 array, got {type(image).__name__}"
            )
        if min(image.size) < 1:
            raise ProcessorInputError(f"empty image of size {image.size}")
        if image.mode not in ("RGB", "RGBA", "L", "P", "LA", "I;16", "CMYK", "YCbCr"):
            raise ProcessorInputError(f"unsupported image mode {image.mode!r}")
        size = self.settings.image_size
        rgb = image.convert("RGB").resize((size, size), PILImage.Resampling.BICUBIC)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.settings.image_mean, np.float32)) / np.asarray(
            self.settings.image_std, np.float32
        )
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    # ---- encoding

    def encode_sample(
        self,
        messages: list[dict],
        images: Sequence[Any] | None = None,
        videos: Sequence[Sequence[Any]] | None = None,
        max_length: int | None = None,
        *,
        add_generation_prompt: bool = False,
    ) -> dict[str, Any]:
        """One conversation -> numpy arrays and plain values (Ray Data can carry them).

        Returns input_ids [T] int64, labels [T] (-100 outside assistant turns), pixel_values
        [N, 3, S, S] float32 (images and video frames in order), parts (JSON-able segment list).
        """
        images, videos = list(images or []), list(videos or [])
        if not messages:
            raise ProcessorInputError("empty conversation")
        if len(images) + sum(len(v) for v in videos) > self.settings.max_media:
            raise ProcessorInputError(f"more than {self.settings.max_media} images and frames")
        ids: list[int] = []
        labels: list[int] = []
        parts: list[list] = []
        pixels: list[np.ndarray] = []
        media = {"image": iter(images), "video": iter(videos)}
        used = {"image": 0, "video": 0}
        for message in messages:
            role = message.get("role")
            if role not in ("system", "user", "assistant"):
                raise ProcessorInputError(f"unknown role {role!r}")
            train = role == "assistant"
            self._text(f"<|im_start|>{role}\n", ids, labels, parts, train=False)
            for part in _content_parts(message.get("content")):
                kind = part.get("type")
                if kind == "text":
                    self._text(part.get("text", ""), ids, labels, parts, train=train)
                elif kind in ("image", "video"):
                    item = next(media[kind], None)
                    if item is None:
                        raise ProcessorInputError(f"more {kind} placeholders than {kind}s given")
                    used[kind] += 1
                    frames = [item] if kind == "image" else list(item)
                    if not frames:
                        raise ProcessorInputError("a video without frames")
                    self._media(kind, frames, ids, labels, parts, pixels)
                else:
                    raise ProcessorInputError(f"unknown content part type {kind!r}")
            self._text("<|im_end|>", ids, labels, parts, train=train)
            self._text("\n", ids, labels, parts, train=False)
        if used["image"] != len(images) or used["video"] != len(videos):
            raise ProcessorInputError(
                f"{len(images)} images and {len(videos)} videos given, but the messages have "
                f"{used['image']} image and {used['video']} video placeholders"
            )
        if add_generation_prompt:
            self._text("<|im_start|>assistant\n", ids, labels, parts, train=False)
        limit = max_length or self.settings.max_length
        if len(ids) > limit:
            raise SequenceTooLong(len(ids), limit)
        size = self.settings.image_size
        return {
            "input_ids": np.asarray(ids, np.int64),
            "labels": np.asarray(labels, np.int64),
            "pixel_values": np.stack(pixels)
            if pixels
            else np.zeros((0, 3, size, size), np.float32),
            "parts": parts,
        }

    def _text(self, text: str, ids, labels, parts, *, train: bool) -> None:
        if not text:
            return
        if (
            self.image_token in text
            or self.video_token in text
            or self.tokenizer.context_token in text
        ):
            raise ProcessorInputError("media tokens in text: use {'type': 'image'} content parts")
        new = self.tokenizer.encode(text, add_special_tokens=False)
        ids += new
        labels += new if train else [IGNORE] * len(new)
        if parts and parts[-1][0] == "text":
            parts[-1][1] += len(new)
        else:
            parts.append(["text", len(new)])

    def _media(self, kind: str, frames, ids, labels, parts, pixels) -> None:
        g, n_ctx = self.grid, self.settings.num_context_tokens
        for frame in frames:
            pixels.append(self.preprocess_image(frame))
            new = [self.image_token_id] * (g * g) + [self.context_token_id] * n_ctx
            ids += new
            labels += [IGNORE] * len(new)
        parts.append(["image", g, g] if kind == "image" else ["video", len(frames), g, g])

    # ---- batching

    def layout_of(
        self, parts_list: list[list], *, padding_side: str = "right", length: int | None = None
    ) -> GazeLayout:
        sequences = [[_part(p) for p in parts] for parts in parts_list]
        return build_layout(
            sequences,
            region_size=self.settings.region_size,
            num_context_tokens=self.settings.num_context_tokens,
            padding_side=padding_side,
            length=length,
        )

    def collate(self, samples: list[dict], padding_side: str = "right") -> dict[str, Any]:
        """Pad encoded samples into a batch: tensors plus the matching ``gaze_layout``."""
        if not samples:
            raise ProcessorInputError("no samples to collate")
        length = max(len(s["input_ids"]) for s in samples)
        pad = self.tokenizer.pad_token_id
        batch = len(samples)
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            where = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[b, where] = torch.as_tensor(np.asarray(s["input_ids"]))
            if s.get("labels") is not None:
                labels[b, where] = torch.as_tensor(np.asarray(s["labels"]))
            mask[b, where] = 1
        pixels = [torch.as_tensor(np.asarray(s["pixel_values"], np.float32)) for s in samples]
        size = self.settings.image_size
        pixel_values = torch.cat(pixels) if pixels else torch.zeros(0, 3, size, size)
        layout = self.layout_of(
            [_parts_of(s) for s in samples], padding_side=padding_side, length=length
        )
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "gaze_layout": layout,
        }

    # ---- transformers-style entry points

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs,
    ):
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs
        )

    def __call__(
        self,
        text: str | list[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Sequence[Any]] | None = None,
        return_tensors: str = "pt",
        padding_side: str = "left",
    ) -> BatchFeature:
        """Prompts with ``<image>``/``<video>`` markers (e.g. from apply_chat_template) -> a batch.

        ``images``/``videos`` are consumed in marker order across the prompts.
        """
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        texts = [text] if isinstance(text, str) else list(text)
        image_iter, video_iter = iter(images or []), iter(videos or [])
        samples = []
        for prompt in texts:
            samples.append(self._encode_prompt(prompt, image_iter, video_iter))
        if next(image_iter, None) is not None or next(video_iter, None) is not None:
            raise ProcessorInputError("more images or videos than <image>/<video> markers")
        batch = self.collate(samples, padding_side=padding_side)
        batch.pop("labels")
        layout = batch.pop("gaze_layout")
        feature = BatchFeature(batch)
        feature["gaze_layout"] = layout
        return feature

    def _encode_prompt(self, prompt: str, image_iter, video_iter) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        parts: list[list] = []
        pixels: list[np.ndarray] = []
        pieces = _split_markers(prompt, (self.image_token, self.video_token))
        for piece in pieces:
            if piece in (self.image_token, self.video_token):
                kind = "image" if piece == self.image_token else "video"
                item = next(image_iter if kind == "image" else video_iter, None)
                if item is None:
                    raise ProcessorInputError(f"more {piece} markers than {kind}s given")
                self._media(
                    kind, [item] if kind == "image" else list(item), ids, labels, parts, pixels
                )
            else:
                self._text(piece, ids, labels, parts, train=False)
        size = self.settings.image_size
        if len(ids) > self.settings.max_length:
            raise SequenceTooLong(len(ids), self.settings.max_length)
        return {
            "input_ids": np.asarray(ids, np.int64),
            "labels": None,
            "pixel_values": np.stack(pixels)
            if pixels
            else np.zeros((0, 3, size, size), np.float32),
            "parts": parts,
        }

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, **kwargs)


def _content_parts(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ProcessorInputError("message content must be a string or a non-empty list of parts")
    return content


def _split_markers(text: str, markers: tuple[str, ...]) -> list[str]:
    out, rest = [], text
    while rest:
        hits = [(rest.find(m), m) for m in markers if m in rest]
        if not hits:
            out.append(rest)
            break
        pos, marker = min(hits)
        if pos:
            out.append(rest[:pos])
        out.append(marker)
        rest = rest[pos + len(marker) :]
    return out


def _parts_of(sample: dict) -> list:
    parts = sample["parts"]
    return json.loads(parts) if isinstance(parts, str) else parts


def _part(p) -> int | Image | Video:
    kind = p[0]
    if kind == "text":
        return int(p[1])
    if kind == "image":
        return Image(int(p[1]), int(p[2]))
    if kind == "video":
        return Video(int(p[1]), int(p[2]), int(p[3]))
    raise ProcessorInputError(f"unknown part {p!r}")
