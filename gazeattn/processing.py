"""GazeProcessor: the checkpoint's own processing, plus the context tokens and layout gaze needs.

A vision-language checkpoint already knows how to turn a chat into model inputs:
its image processor (resize, crop, normalise, dynamic resolution), its tokenizer
and chat template, and its rule for how many tokens an image becomes. The
GazeProcessor keeps all of that (``image_processor``, ``tokenizer`` and
``chat_template`` are the checkpoint's) and adds only:

- after each image or video frame, ``num_context_tokens`` context-token placeholders;
- the ``gaze_layout`` of the batch (where every segment, region and context token is);
- training labels from the model's own chat template: assistant turns only, each ending
  with the model's end-of-turn token.

The family-specific part (which tokens stand for an image, how pixels are
prepared, how big the token grid is) lives in ``gazeattn.families``.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image as PILImage
from transformers import BatchFeature, ProcessorMixin

from gazeattn.media_cache import MediaCache, media_key
from gazeattn.ops import GazeConfig, GazeLayout, build_layout
from gazeattn.ops.layout import Part
from gazeattn.sample import IGNORE, EncodedSample

if TYPE_CHECKING:
    from gazeattn.families.media import Media

CONTEXT_TOKEN = "<|gaze_ctx|>"


# markers around each assistant content when locating the turns (Unicode private use; a
# conversation holding them takes the rendered path)
_OPEN, _CLOSE = "\ue000", "\ue001"
# assistant turns located by rendering each one's prefix, when a template defeats the markers
MAX_RENDERED_TURNS = 64


class ProcessorInputError(ValueError):
    """A request or sample the processor cannot encode; the message says what is wrong."""


class SequenceTooLong(ProcessorInputError):
    def __init__(self, length: int, limit: int):
        super().__init__(f"sequence of {length} tokens exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


@dataclass(kw_only=True, frozen=True)
class VisualBudget:
    """How much of each image and video the model sees: set once per run, saved with the model.

    Training, evaluation and serving read it from the same place (the processor), so a
    served model sees images and videos exactly as it was trained on them.

    - ``min_pixels`` / ``max_pixels``: the area a dynamic-resolution model (Qwen-VL) resizes
      each image and frame into; None keeps the checkpoint's own bounds. Fixed-size towers
      (LLaVA) resize to their input size whatever these say.
    - ``frames_per_video``: frames sampled from each video, spread uniformly over the clip
      (``frame_sampling``).
    """

    min_pixels: int | None = None
    max_pixels: int | None = None
    frames_per_video: int = 8
    frame_sampling: Literal["uniform"] = "uniform"

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int or None, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        if not isinstance(self.frames_per_video, int) or self.frames_per_video < 1:
            raise ValueError(f"frames_per_video must be an int >= 1, got {self.frames_per_video!r}")
        if self.frame_sampling != "uniform":
            raise ValueError(f"frame_sampling must be 'uniform', got {self.frame_sampling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class GazeProcessor(ProcessorMixin):
    """The checkpoint's image processor, tokenizer and chat template, plus gaze's context tokens.

    Entry points follow transformers: ``processor(text=, images=, videos=)``,
    ``apply_chat_template(messages, tokenize=True, return_dict=True)`` (images inside the
    messages), ``batch_decode``, ``save_pretrained`` / ``AutoProcessor.from_pretrained``
    (after ``import gazeattn``). For training, ``encode_sample`` encodes one conversation
    with labels and ``collate`` pads samples into a batch. Every batch carries
    ``gaze_layout``.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        family: str = "llava",
        vision: dict | None = None,
        gaze_config: dict | None = None,
        context_token: str = CONTEXT_TOKEN,
        image_token: str | None = None,
        video_token: str | None = None,
        stop_tokens: list[str] | None = None,
        visual_budget: dict | None = None,
        max_length: int = 32768,
        max_media: int = 64,
        **kwargs,
    ):
        from gazeattn.families import media_rules

        self.family = family
        self.vision = dict(vision or {})
        self.gaze_config = _as_gaze_config(gaze_config)
        self.context_token = context_token
        self.visual_budget = _as_budget(visual_budget)
        self.max_length = max_length
        self.max_media = max_media
        image_processor = pil_backend(image_processor)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        if self.chat_template is None:
            self.chat_template = getattr(tokenizer, "chat_template", None)
        self.rules = media_rules(family, self.vision, image_processor, image_token)
        self.image_token = self.rules.image_token
        self.video_token = self.rules.video_token
        self.stop_tokens = list(stop_tokens or [tokenizer.eos_token])
        # processed media by content (gazeattn.media_cache), where a server sets one
        self.media_cache: MediaCache | None = None
        self._check_tokens()

    # ---- settings

    @property
    def num_context_tokens(self) -> int:
        return self.gaze_config.num_context_tokens if self.gaze_config else 0

    @property
    def region_size(self) -> tuple[int, int, int]:
        return self.gaze_config.region_size if self.gaze_config else (1, 6, 6)

    @property
    def context_token_id(self) -> int | None:
        return self._token_id(self.context_token)

    @property
    def image_token_id(self) -> int:
        return self._token_id(self.image_token)

    @property
    def video_token_id(self) -> int | None:
        return self._token_id(self.video_token)

    @property
    def stop_token_ids(self) -> list[int]:
        return [i for i in (self._token_id(t) for t in self.stop_tokens) if i is not None]

    @property
    def placeholder_ids(self) -> list[int]:
        """Ids only the processor may place (media and context placeholders): never generated."""
        ids = {self._token_id(t) for t in (*self.rules.visual_tokens, self.video_token)}
        ids.add(self.context_token_id)
        return sorted(i for i in ids if i is not None)

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        ids = self.tokenizer.convert_tokens_to_ids([token])
        unk = self.tokenizer.unk_token_id
        return (
            None
            if not ids or ids[0] is None or (ids[0] == unk and token != self.tokenizer.unk_token)
            else ids[0]
        )

    def _check_tokens(self) -> None:
        if self._token_id(self.image_token) is None:
            raise ProcessorInputError(
                f"the tokenizer has no image token {self.image_token!r}: a {self.family} checkpoint "
                "needs one (its processor's image_token)"
            )
        if self.num_context_tokens and self.context_token_id is None:
            raise ProcessorInputError(
                f"the tokenizer has no context token {self.context_token!r}; convert the checkpoint "
                "with gazeattn.load_model(path, gaze=GazeConfig(...)), which adds it"
            )

    def with_gaze(self, gaze_config: GazeConfig | None) -> GazeProcessor:
        """This processor for another gaze config (None: the stock model, no context tokens)."""
        self.gaze_config = gaze_config
        self._check_tokens()
        return self

    def with_budget(self, budget: VisualBudget | None) -> GazeProcessor:
        """This processor with another visual budget (None: the checkpoint's defaults)."""
        self.visual_budget = budget or VisualBudget()
        return self

    def fit_image(self, image):
        """``image`` (RGB) shrunk now to the size its encoding resizes it to (where smaller),
        with the same resize: encoding the result gives the original's pixels."""
        return self.rules.fit_image(image, self.visual_budget)

    def fit_video(self, frames: list) -> list:
        """``fit_image`` for the frames of one video given without timing."""
        return self.rules.fit_video(frames, self.visual_budget)

    # ---- persistence: transformers' processor files, plus our settings in processor_config.json

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("rules", None)
        out.pop("media_cache", None)
        out["gaze_config"] = self.gaze_config.to_dict() if self.gaze_config else None
        out["visual_budget"] = self.visual_budget.to_dict()
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> GazeProcessor:
        """A saved gaze processor, or the processor of a stock checkpoint of a supported family."""
        from gazeattn.families import stock_processor

        path = str(pretrained_model_name_or_path)
        data = _processor_config(path, kwargs)
        if data.get("processor_class") == cls.__name__:
            return super().from_pretrained(path, **kwargs)
        return stock_processor(cls, path, **kwargs)

    # ---- images and videos

    def _prepare_image(self, image: Any) -> PILImage.Image:
        """A PIL image, HWC uint8 array, path or URL -> an RGB PIL image; clear errors otherwise."""
        if isinstance(image, str):
            from transformers.image_utils import load_image

            try:
                image = load_image(image)
            except (OSError, ValueError) as error:
                raise ProcessorInputError(
                    f"cannot read the image {image[:80]!r}: {error}"
                ) from error
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
                f"an image must be a PIL image, a uint8 array, a path or a URL, got {type(image).__name__}"
            )
        if min(image.size) < 1:
            raise ProcessorInputError(f"empty image of size {image.size}")
        try:
            return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise ProcessorInputError(f"cannot convert the image to RGB: {error}") from error

    def _prepare_video(self, video: Any):
        """A video (frames, a [F, H, W, C] array, a path, or a ``gazeattn.video.Clip``) ->
        a Clip of RGB PIL frames (with the timing the input had)."""
        from gazeattn.video import Clip, read_clip

        if isinstance(video, str):
            try:
                video = read_clip(video, self.visual_budget.frames_per_video)
            except (OSError, ValueError) as error:
                raise ProcessorInputError(
                    f"cannot read the video {video[:80]!r}: {error}"
                ) from error
        if isinstance(video, Clip):
            frames = self._prepare_frames(list(video.frames))
            return Clip(frames=frames, fps=video.fps, indices=video.indices)
        return Clip(frames=self._prepare_frames(video))

    def _prepare_frames(self, video: Any) -> list[PILImage.Image]:
        if isinstance(video, np.ndarray) and video.ndim == 4:
            video = list(video)
        if not isinstance(video, list | tuple):
            raise ProcessorInputError(
                f"a video must be a list of frames or a path, got {type(video).__name__}"
            )
        if not video:
            raise ProcessorInputError("a video without frames")
        return [self._prepare_image(frame) for frame in video]

    # ---- encoding one sequence

    def _encode(
        self,
        text: str,
        images: list,
        videos: list,
        *,
        label_spans: Sequence[tuple[int, int]] = (),
        add_special_tokens: bool | None = None,
        max_length: int | None = None,
    ) -> EncodedSample:
        """One prompt with media markers -> its encoded sample.

        The i-th image marker takes ``images[i]`` and the j-th video marker ``videos[j]``;
        each becomes the family's visual tokens plus the context placeholders, and the whole
        expanded text is tokenized at once (so ids equal the stock processor's when there are
        no context tokens). ``label_spans`` are character spans of ``text`` to train on.
        """
        pieces = _split_markers(text, (self.image_token, self.video_token))
        n_images = sum(p == self.image_token for p in pieces)
        n_videos = sum(p == self.video_token for p in pieces)
        if n_images != len(images) or n_videos != len(videos):
            raise ProcessorInputError(
                f"{len(images)} images and {len(videos)} videos given, but the text has "
                f"{n_images} {self.image_token} and {n_videos} {self.video_token} markers"
            )
        images = [self._prepare_image(image) for image in images]
        videos = [self._prepare_video(video) for video in videos]
        if len(images) + sum(len(v.frames) for v in videos) > self.max_media:
            raise ProcessorInputError(f"more than {self.max_media} images and frames")
        image_iter, video_iter = iter(images), iter(videos)
        expanded, plan, vision, keys = [], [], [], []
        shift = []  # (position in text, growth so far) at the end of each marker
        pos = growth = 0
        for piece in pieces:
            if piece in (self.image_token, self.video_token):
                if piece == self.image_token:
                    media, key = self._process(next(image_iter), video=False)
                else:
                    media, key = self._process(next(video_iter), video=True)
                keys.append(key)
                replacement = media.text(self.context_token, self.num_context_tokens)
                plan.append(media)
                vision.append(media.arrays)
                expanded.append(replacement)
                growth += len(replacement) - len(piece)
                pos += len(piece)
                shift.append((pos, growth))
            else:
                expanded.append(piece)
                pos += len(piece)
        full = "".join(expanded)
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and full.startswith(bos))
        encoded = self.tokenizer(
            full,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=bool(label_spans),
        )
        ids = list(encoded["input_ids"])
        labels = [IGNORE] * len(ids)
        if label_spans:
            moved = sorted((_moved(s, shift), _moved(e, shift)) for s, e in label_spans)
            ends = [e for _, e in moved]
            for i, (start, end) in enumerate(encoded["offset_mapping"]):
                # the spans do not overlap: only the first one ending after ``start`` can
                k = bisect.bisect_right(ends, start)
                if k < len(moved) and moved[k][0] < end:
                    labels[i] = ids[i]
        parts = self._parts(ids, plan)
        limit = max_length or self.max_length
        if len(ids) > limit:
            raise SequenceTooLong(len(ids), limit)
        return EncodedSample(
            input_ids=np.asarray(ids, np.int64),
            labels=np.asarray(labels, np.int64),
            vision=_merge_arrays(vision),
            parts=parts,
            media_keys=tuple(keys) if self.media_cache is not None else None,
        )

    def _process(self, item, *, video: bool) -> tuple[Media, str | None]:
        """One prepared image (or ``Clip``) through the family's processing, and its content
        key: through the media cache where this processor has one (else the key is None)."""
        budget = self.visual_budget
        if video:
            process = partial(self.rules.process_clip, item, budget)
        else:
            process = partial(self.rules.process_image, item, budget)
        if self.media_cache is None:
            return process(), None
        frames, timing = (list(item.frames), (item.fps, item.indices)) if video else ([item], ())
        key = media_key("video" if video else "image", frames, budget, timing)
        return self.media_cache.media(key, process), key

    def _parts(self, ids: list[int], plan: list) -> list[Part]:
        """Walk the ids along the expansion plan: text runs, then each media item's tokens."""
        visual = {self._token_id(t) for t in self.rules.visual_tokens}
        parts: list[Part] = []
        i = 0
        spans = [
            s for media in plan for s in media.spans(self.context_token, self.num_context_tokens)
        ]
        for part, runs in spans:
            start = i
            while i < len(ids) and ids[i] not in visual:
                i += 1
            if i > start:
                parts.append(i - start)
            expect = []
            for token, n in runs:
                expect += [self._token_id(token)] * n
            got = ids[i : i + len(expect)]
            if got != expect:
                raise ProcessorInputError(
                    "the tokenizer did not keep the media placeholders whole: "
                    f"{self.image_token!r}/{self.context_token!r} must be special tokens"
                )
            parts.append(part)
            i += len(expect)
        if any(t in visual for t in ids[i:]):
            raise ProcessorInputError("media tokens in text: use image/video content parts")
        if i < len(ids):
            parts.append(len(ids) - i)
        return parts

    # ---- chat messages

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (media as the family's markers)."""
        return self._apply(
            self._template_messages(messages), add_generation_prompt=add_generation_prompt
        )

    def _apply(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The template's text for messages already in its form (``_template_messages``)."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Messages as the template expects them: list contents, media parts without payloads."""
        if not messages:
            raise ProcessorInputError("empty conversation")
        renders_video = self._renders_video()
        out = []
        for message in messages:
            role = message.get("role")
            if role not in ("system", "user", "assistant"):
                raise ProcessorInputError(f"unknown role {role!r}")
            parts = []
            for part in _content_parts(message.get("content")):
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text", "")
                    if not isinstance(text, str):
                        raise ProcessorInputError("a text part needs a string 'text'")
                    self._check_text(text)
                    parts.append({"type": "text", "text": text})
                elif kind in ("image", "image_url"):
                    parts.append({"type": "image"})
                elif kind == "video":
                    parts.append(
                        {"type": "video"}
                        if renders_video
                        else {"type": "text", "text": self.video_token}
                    )
                else:
                    raise ProcessorInputError(f"unknown content part type {kind!r}")
                if role == "assistant" and parts[-1]["type"] != "text":
                    raise ProcessorInputError("images and videos in assistant turns")
            out.append({"role": role, "content": parts})
        return out

    def _renders_video(self) -> bool:
        """Whether the chat template writes a marker for a video part (LLaVA-1.5's does not)."""
        if self.chat_template is None:
            raise ProcessorInputError("the checkpoint has no chat template")
        known = self.__dict__.get("_video_rendered")
        if known is None or known[0] != self.chat_template:
            probe = [{"role": "user", "content": [{"type": "video"}]}]
            text = self.tokenizer.apply_chat_template(
                probe, chat_template=self.chat_template, tokenize=False
            )
            known = (self.chat_template, self.video_token in text)
            self.__dict__["_video_rendered"] = known
        return known[1]

    def _check_text(self, text: str) -> None:
        markers = {self.image_token, self.video_token, self.context_token, *self.rules.markers}
        if any(m and m in text for m in markers):
            raise ProcessorInputError("media tokens in text: use {'type': 'image'} content parts")

    def _assistant_spans(
        self, messages: list[dict], text: str, *, add_generation_prompt: bool = False
    ) -> tuple[str, list]:
        """Character spans of each assistant turn in ``text`` (the rendered ``messages``).

        A turn is what rendering it adds to the prompt that asks for it (trailing whitespace
        left out); it ends with the model's end-of-turn token, inserted when the template
        writes none (as LLaVA-1.5's), so a fine-tuned model learns to stop. Returns the text
        with any insertions, and the spans in it.

        The turns are found in linear time (``_marked_turns``: one rendering with each
        assistant content between markers); a template that does not render markers through
        falls back to rendering each turn's prefix (``_rendered_turns``), which is quadratic
        and so refused beyond ``MAX_RENDERED_TURNS`` assistant turns.
        """
        found = self._marked_turns(messages, text, add_generation_prompt)
        if found is None:
            found = self._rendered_turns(messages, text)
        pieces, spans, last, inserted = [], [], 0, 0
        eos = self.tokenizer.eos_token
        for start, end, needs_eos in found:
            pieces.append(text[last:end])
            extra = len(eos) if needs_eos else 0
            if needs_eos:
                pieces.append(eos)
            spans.append((start + inserted, end + inserted + extra))
            inserted += extra
            last = end
        pieces.append(text[last:])
        return "".join(pieces), spans

    def _turn(self, messages: list[dict], i: int, text: str) -> tuple[int, int]:
        """Where assistant turn ``i`` starts and ends in ``text``, by rendering its prefix (the
        definition of a turn): the prompt asking for it, and the prompt with it."""
        before = self._apply(messages[:i], add_generation_prompt=True)
        after = self._apply(messages[: i + 1])
        if not (after.startswith(before) and text.startswith(after)):
            raise ProcessorInputError(
                "the chat template does not render a conversation as a prefix of its "
                "continuation; assistant turns cannot be located for the labels"
            )
        return len(before), len(after)

    def _span(self, text: str, start: int, end: int) -> tuple[int, int, bool]:
        """(start, end, needs an end-of-turn token) of the turn ``text[start:end]``."""
        turn = text[start:end].rstrip()
        ends = any(turn.endswith(t) for t in self.stop_tokens)
        return start, start + len(turn), not ends

    def _rendered_turns(self, messages: list[dict], text: str) -> list[tuple[int, int, bool]]:
        asked = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(asked) > MAX_RENDERED_TURNS:
            raise ProcessorInputError(
                f"{len(asked)} assistant turns: this chat template's turns can only be located "
                f"by rendering each one's prefix, done for at most {MAX_RENDERED_TURNS}"
            )
        return [self._span(text, *self._turn(messages, i, text)) for i in asked]

    def _marked_turns(
        self, messages: list[dict], text: str, add_generation_prompt: bool
    ) -> list[tuple[int, int, bool]] | None:
        """The turns from one rendering with every assistant content between markers.

        A turn's start is its content's start less the template's header remainder (what the
        turn adds before its content, e.g. LLaVA-1.5's space after "ASSISTANT:"), and its end
        its content's end plus the template's end of turn; both are read off the last turn,
        rendered by definition (``_turn``), and must be the same text at every turn; the
        first turn is checked by definition too. None when the template does not pass the
        markers through unchanged or its turns are not framed alike.
        """
        asked = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not asked:
            return []
        if _OPEN in text or _CLOSE in text:
            return None
        marked = self._apply(
            [_with_markers(m) if m["role"] == "assistant" else m for m in messages],
            add_generation_prompt=add_generation_prompt,
        )
        bounds, removed = [], 0  # content (start, end) of each turn, in ``text``'s positions
        for match in re.finditer(f"[{_OPEN}{_CLOSE}]", marked):
            bounds.append((match.group(), match.start() - removed))
            removed += 1
        expected = [_OPEN, _CLOSE] * len(asked)
        if [m for m, _ in bounds] != expected or re.sub(f"[{_OPEN}{_CLOSE}]", "", marked) != text:
            return None
        content = [(bounds[2 * k][1], bounds[2 * k + 1][1]) for k in range(len(asked))]
        last_start, last_end = self._turn(messages, asked[-1], text)
        header = last_start - content[-1][0]  # negative: the header remainder's length
        closing = text[content[-1][1] : last_end]
        if header > 0 or last_end < content[-1][1]:
            return None
        header_text = text[content[-1][0] + header : content[-1][0]]
        found = []
        for start, end in content:
            if text[start + header : start] != header_text:
                return None
            if text[end : end + len(closing)] != closing:
                return None
            found.append(self._span(text, start + header, end + len(closing)))
        if self._span(text, *self._turn(messages, asked[0], text)) != found[0]:
            return None
        return found

    def encode_sample(
        self,
        messages: list[dict],
        images: Sequence[Any] | None = None,
        videos: Sequence[Sequence[Any]] | None = None,
        max_length: int | None = None,
        *,
        add_generation_prompt: bool = False,
    ) -> EncodedSample:
        """One conversation -> its ``EncodedSample`` (labels: the assistant turns' tokens).

        ``images``/``videos`` match the conversation's image/video parts in order.
        """
        images, videos = list(images or []), list(videos or [])
        _count_parts(messages, len(images), len(videos))
        messages = self._template_messages(messages)
        text = self._apply(messages, add_generation_prompt=add_generation_prompt)
        text, spans = self._assistant_spans(
            messages, text, add_generation_prompt=add_generation_prompt
        )
        return self._encode(
            text,
            images,
            videos,
            label_spans=spans,
            max_length=max_length,
        )

    # ---- batching

    def layout_of(
        self,
        parts_list: list[list[Part]],
        *,
        padding_side: str = "right",
        length: int | None = None,
    ) -> GazeLayout:
        return build_layout(
            parts_list,
            region_size=self.region_size,
            num_context_tokens=self.num_context_tokens,
            padding_side=padding_side,
            length=length,
        )

    def collate(self, samples: list[EncodedSample], padding_side: str = "right") -> dict[str, Any]:
        """Pad encoded samples into a batch: tensors plus the matching ``gaze_layout``."""
        if not samples:
            raise ProcessorInputError("no samples to collate")
        length = max(len(s) for s in samples)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        batch = len(samples)
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s)
            where = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[b, where] = torch.as_tensor(s.input_ids)
            labels[b, where] = torch.as_tensor(s.labels)
            mask[b, where] = 1
        vision = {
            key: torch.as_tensor(value)
            for key, value in _merge_arrays([s.vision for s in samples]).items()
        }
        layout = self.layout_of(
            [s.parts for s in samples], padding_side=padding_side, length=length
        )
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            **vision,
            "gaze_layout": layout,
        }

    # ---- transformers-style entry points

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        return_tensors: str | None = "pt",
        padding_side: str = "left",
        add_special_tokens: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prompts with the template's media markers (e.g. from apply_chat_template) -> a batch.

        ``images``/``videos`` are consumed in marker order across the prompts (flat, or one
        list per prompt as apply_chat_template passes them). Returns input_ids, attention_mask,
        the family's pixel inputs and ``gaze_layout``.
        """
        if isinstance(images, str | PILImage.Image | np.ndarray) and text is None:
            raise ProcessorInputError("give text= with one marker per image")
        if return_tensors not in ("pt", None):
            raise ValueError("only return_tensors='pt' is supported")
        if text is None:
            raise ProcessorInputError("text= is required")
        texts = [text] if isinstance(text, str) else list(text)
        images, videos = _flat_images(images), _flat_videos(videos)
        samples, used_i, used_v = [], 0, 0
        for prompt in texts:
            n_i, n_v = prompt.count(self.image_token), prompt.count(self.video_token)
            samples.append(
                self._encode(
                    prompt,
                    images[used_i : used_i + n_i],
                    videos[used_v : used_v + n_v],
                    add_special_tokens=add_special_tokens,
                )
            )
            used_i, used_v = used_i + n_i, used_v + n_v
        if used_i != len(images) or used_v != len(videos):
            raise ProcessorInputError(
                f"{len(images)} images and {len(videos)} videos given, but the prompts have "
                f"{used_i} {self.image_token} and {used_v} {self.video_token} markers"
            )
        batch = self.collate(samples, padding_side=padding_side)
        batch.pop("labels")
        layout = batch.pop("gaze_layout")
        feature = BatchFeature(batch)
        feature["gaze_layout"] = layout
        return feature

    def decode(self, ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(sequences, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.rules.input_names, "gaze_layout"]


def _processor_config(path: str, kwargs: dict) -> dict:
    """processor_config.json of ``path`` (a directory or a hub id in the HF cache), or {}."""
    from transformers.utils import cached_file

    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    options = {k: kwargs[k] for k in keys if k in kwargs}
    found = cached_file(
        path,
        "processor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **options,
    )
    return json.loads(Path(found).read_text()) if found else {}


def _as_gaze_config(value) -> GazeConfig | None:
    if value is None or isinstance(value, GazeConfig):
        return value
    return GazeConfig.from_dict(value)


def pil_backend(image_processor):
    """``image_processor`` on transformers' PIL backend (its ``...Pil`` class, same settings).

    Where torchvision is installed (GPU machines), transformers picks the torchvision backend
    of CLIP's, SigLIP's and Qwen-VL's processors; without it (our CPU machines), the PIL one.
    The two resize differently, and the families' media rules call the processor's own
    methods on numpy arrays, which only the PIL backend takes: the first GPU run failed there
    (bench/RESULTS.md). So every machine processes images as training did, with PIL."""
    from transformers.image_processing_backends import PilBackend

    if image_processor is None or isinstance(image_processor, PilBackend):
        return image_processor
    import transformers

    pil = getattr(transformers, f"{type(image_processor).__name__}Pil", None)
    if pil is None:
        # a checkpoint this install cannot process, found when the processor is built: not a
        # request's input error (ProcessorInputError, which a server answers with a 400)
        raise ValueError(
            f"{type(image_processor).__name__} has no PIL backend in this transformers; "
            "gazeattn processes images with the PIL backend"
        )
    return pil.from_dict(image_processor.to_dict())


def _as_budget(value) -> VisualBudget:
    if value is None:
        return VisualBudget()
    return value if isinstance(value, VisualBudget) else VisualBudget(**value)


def _moved(pos: int, shift: list[tuple[int, int]]) -> int:
    """A position of the unexpanded text in the expanded one (markers grow as they expand)."""
    growth = 0
    for end, total in shift:
        if end > pos:
            break
        growth = total
    return pos + growth


def _merge_arrays(items: list[dict]) -> dict[str, np.ndarray]:
    """Concatenate per-media (or per-sample) arrays key by key, in order."""
    keys: list[str] = []
    for item in items:
        keys += [k for k in item if k not in keys]
    return {k: np.concatenate([item[k] for item in items if k in item]) for k in keys}


def _flat_images(images) -> list:
    """Images given flat, or one list per prompt (as apply_chat_template passes them)."""
    if images is None:
        return []
    if not isinstance(images, list | tuple):
        return [images]
    out = []
    for item in images:
        out.extend(item) if isinstance(item, list | tuple) else out.append(item)
    return out


def _is_frame(item) -> bool:
    return isinstance(item, PILImage.Image) or (
        isinstance(item, np.ndarray) and item.ndim in (2, 3)
    )


def _is_video(item) -> bool:
    """A video: a path, a [F, H, W, C] array, a Clip, or a non-empty list of frames."""
    from gazeattn.video import Clip

    if isinstance(item, str | Clip) or (isinstance(item, np.ndarray) and item.ndim == 4):
        return True
    return isinstance(item, list | tuple) and bool(item) and _is_frame(item[0])


def _flat_videos(videos) -> list:
    """Videos given as one video, a flat list of videos, or one list of videos per prompt."""
    if videos is None:
        return []
    if _is_video(videos) and not isinstance(videos, str | np.ndarray):
        return [videos]
    if not isinstance(videos, list | tuple):
        return [videos]
    out = []
    for item in videos:
        out.append(item) if _is_video(item) else out.extend(item)
    return out


def _count_parts(messages: list[dict], n_images: int, n_videos: int) -> None:
    counts = {"image": 0, "video": 0}
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                kind = "image" if kind == "image_url" else kind
                if kind in counts:
                    counts[kind] += 1
    if counts["image"] > n_images:
        raise ProcessorInputError("more image placeholders than images given")
    if counts["video"] > n_videos:
        raise ProcessorInputError("more video placeholders than videos given")
    if (counts["image"], counts["video"]) != (n_images, n_videos):
        raise ProcessorInputError(
            f"{n_images} images and {n_videos} videos given, but the messages have "
            f"{counts['image']} image and {counts['video']} video placeholders"
        )


def _content_parts(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ProcessorInputError("message content must be a string or a non-empty list of parts")
    if not all(isinstance(p, dict) for p in content):
        raise ProcessorInputError("every content part must be a dict with a 'type'")
    return content


def _split_markers(text: str, markers: tuple[str, ...]) -> list[str]:
    out, rest = [], text
    while rest:
        hits = [(rest.find(m), m) for m in markers if m and m in rest]
        if not hits:
            out.append(rest)
            break
        pos, marker = min(hits)
        if pos:
            out.append(rest[:pos])
        out.append(marker)
        rest = rest[pos + len(marker) :]
    return out


def _with_markers(message: dict) -> dict:
    """An assistant message (template form) with its content between ``_OPEN`` and ``_CLOSE``."""
    parts = [dict(p) for p in message["content"]]
    texts = [i for i, p in enumerate(parts) if p["type"] == "text"]
    if not texts:
        return {**message, "content": [*parts, {"type": "text", "text": _OPEN + _CLOSE}]}
    parts[texts[0]]["text"] = _OPEN + parts[texts[0]]["text"]
    parts[texts[-1]]["text"] = parts[texts[-1]]["text"] + _CLOSE
    return {**message, "content": parts}
