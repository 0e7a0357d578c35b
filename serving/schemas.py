"""The OpenAI chat-completions schema (the subset served) and the gaze extension.

Every field of a request is honoured or refused, never silently ignored:

- unknown fields anywhere in the body are refused with a 400 naming them (``extra="forbid"``,
  turned into ``BadRequest`` by ``serving.app.parse_body``);
- OpenAI (and vLLM) fields this server does not implement are declared, and accepted only at
  the value that asks for nothing (``tools: []``, ``response_format: {"type": "text"}``,
  ``top_k: -1``, ...); any other value is a 400 naming the field (``NEUTRAL`` below,
  checked by ``serving.requests.check_options``).

Extensions (documented in the README):
- a content part ``{"type": "video_frames", "video_frames": [{"url": "data:..."}, ...]}``
  is one video given as its ordered frames;
- ``"gaze": true`` adds the routing of each generated token to the response;
  ``"gaze_layer"`` picks the decoder layer (default: the server's, the last one).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    # "low"/"high" would change how many tokens an image becomes: refused (see NEUTRAL)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoFramesPart(_Strict):
    type: Literal["video_frames"]
    video_frames: list[ImageURL] = Field(min_length=1)


ContentPart = Annotated[TextPart | ImagePart | VideoFramesPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    # "developer" is what newer OpenAI clients send for system prompts
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    # refused when set: the chat template has no participant names, and there are no tools
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI's: usage in every chunk is not offered; only false (or absent) is accepted
    include_obfuscation: bool | None = None


# field -> the values that ask for nothing this server does not do
NEUTRAL: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    # vLLM's sampling extensions
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    # inside messages and parts
    "name": (None,),
    "tool_calls": (None, []),
    "refusal": (None,),
    "detail": (None, "auto"),
    "include_obfuscation": (None, False),
}


class ChatCompletionRequest(_Strict):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    # the range torch.Generator.manual_seed takes; beyond it a seed would fail inside decoding
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    logit_bias: dict[str, float] | None = None
    # end-user identifiers: logged with the request id (abuse monitoring)
    user: str | None = None
    safety_identifier: str | None = None
    # a cache-routing hint: this server has no prompt cache, so it changes nothing
    prompt_cache_key: str | None = None
    # accepted only at their NEUTRAL values
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    service_tier: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    # the gaze extension
    gaze: bool = False
    gaze_layer: int | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class PromptTokensDetails(BaseModel):
    # prompt tokens whose prefill came from the prefix cache (OpenAI's field)
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class RoutedRegion(BaseModel):
    # (span, t0, t1, h0, h1, w0, w1) in token-grid units of span ``span`` (see GazeReport.grids)
    box: list[int]
    heads: int  # how many routing heads chose this region


class TokenRouting(BaseModel):
    token_id: int
    regions: list[RoutedRegion]


class GazeReport(BaseModel):
    layer: int
    # (t, h, w) token grid of each image (t = 1) or video, in prompt order
    grids: list[list[int]]
    # visual KV entries per generated token, mean over layers and heads: gaze vs dense
    visual_entries_attended: float
    visual_entries_dense: float
    savings: float
    tokens: list[TokenRouting]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    gaze: GazeReport | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    gaze: GazeReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gazeattn"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
