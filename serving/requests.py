"""OpenAI chat request -> gazeattn GenerationRequest, with every limit checked.

Everything that can be wrong with a request is found here, before it joins a
batch, so one bad request never fails the others decoded with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gazeattn.generation import GenerationRequest
from gazeattn.processing import GazeProcessor, ProcessorInputError, SequenceTooLong
from serving.errors import BadRequest, NotFound
from serving.images import load_image
from serving.schemas import ChatCompletionRequest, ImagePart, TextPart, VideoFramesPart
from serving.settings import ServeSettings

MAX_STOP = 4


@dataclass(kw_only=True)
class Prepared:
    """A validated request: what generate_batch needs plus the extension options."""

    generation: GenerationRequest
    gaze: bool
    layer: int
    prompt_tokens: int


def check_options(body: ChatCompletionRequest, settings: ServeSettings, model_name: str) -> int:
    """Checks that need no decoding; returns the number of new tokens to generate."""
    if body.model != model_name:
        raise NotFound(
            f"the model {body.model!r} is not served here (this server has {model_name!r})",
            param="model",
            code="model_not_found",
        )
    if body.n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    if body.tools:
        raise BadRequest("tools are not supported by this server", param="tools")
    if body.logprobs:
        raise BadRequest("logprobs are not supported by this server", param="logprobs")
    stops = body.stop_list()
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise BadRequest(f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    default = min(settings.default_max_tokens, settings.max_tokens_limit)
    max_new = body.max_completion_tokens or body.max_tokens or default
    if max_new > settings.max_tokens_limit:
        raise BadRequest(
            f"max_tokens={max_new} exceeds this server's limit of {settings.max_tokens_limit}",
            param="max_tokens",
        )
    n_media = sum(
        1 if isinstance(part, ImagePart) else len(part.video_frames)
        for message in body.messages
        if isinstance(message.content, list)
        for part in message.content
        if not isinstance(part, TextPart)
    )
    if n_media > settings.max_images:
        raise BadRequest(
            f"{n_media} images and video frames exceed the limit of {settings.max_images}",
            param="messages",
            code="too_many_images",
        )
    return max_new


def prepare(
    body: ChatCompletionRequest,
    settings: ServeSettings,
    processor: GazeProcessor,
    model_name: str,
    num_layers: int,
) -> Prepared:
    """Validate, decode the images and count the prompt tokens (CPU work: run it off the loop)."""
    max_new = check_options(body, settings, model_name)
    layer = settings.routing_layer if body.gaze_layer is None else body.gaze_layer
    if not -num_layers <= layer < num_layers:
        raise BadRequest(
            f"gaze_layer={layer} is not a layer of this model ({num_layers} layers)",
            param="gaze_layer",
        )
    messages, images, videos = [], [], []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, list):
            content = [
                _part(part, images, videos, settings, f"messages.{i}.content.{j}")
                for j, part in enumerate(content)
            ]
        messages.append({"role": role, "content": content or ""})
    generation = GenerationRequest(
        messages=messages,
        images=images,
        videos=videos,
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=tuple(body.stop_list()),
    )
    limit = settings.max_prompt_tokens or processor.max_length
    try:
        sample = processor.encode_sample(
            messages, images=images, videos=videos, add_generation_prompt=True
        )
    except SequenceTooLong as err:
        raise BadRequest(str(err), param="messages", code="context_length_exceeded") from None
    except ProcessorInputError as err:
        raise BadRequest(str(err), param="messages") from None
    prompt_tokens = len(sample["input_ids"])
    if prompt_tokens > limit:
        raise BadRequest(
            f"the prompt has {prompt_tokens} tokens, more than this server's limit of {limit}",
            param="messages",
            code="context_length_exceeded",
        )
    context = processor.max_length
    if prompt_tokens + max_new > context:
        raise BadRequest(
            f"{prompt_tokens} prompt tokens + max_tokens={max_new} exceed the model's context "
            f"of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return Prepared(generation=generation, gaze=body.gaze, layer=layer, prompt_tokens=prompt_tokens)


def _part(part, images: list, videos: list, settings: ServeSettings, where: str) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    options = dict(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        allowed_prefixes=settings.allowed_image_url_prefixes,
        timeout_s=settings.image_fetch_timeout_s,
    )
    if isinstance(part, ImagePart):
        images.append(load_image(part.image_url.url, param=f"{where}.image_url", **options))
        return {"type": "image"}
    assert isinstance(part, VideoFramesPart)
    videos.append(
        [
            load_image(frame.url, param=f"{where}.video_frames.{k}", **options)
            for k, frame in enumerate(part.video_frames)
        ]
    )
    return {"type": "video"}
