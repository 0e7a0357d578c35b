"""The OpenAI chat-completions schema (the subset served) and the gaze extension.

Requests accept what the official ``openai`` client sends; unknown top-level
fields are ignored (as OpenAI-compatible servers do), unsupported ones that
change the meaning (``n > 1``, tools, logprobs) are refused by the app.

Extensions (documented in the README):
- a content part ``{"type": "video_frames", "video_frames": [{"url": "data:..."}, ...]}``
  is one video given as its ordered frames;
- ``"gaze": true`` adds the routing of each generated token to the response;
  ``"gaze_layer"`` picks the decoder layer (default: the server's, the last one).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Open):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoFramesPart(_Open):
    type: Literal["video_frames"]
    video_frames: list[ImageURL] = Field(min_length=1)


ContentPart = Annotated[TextPart | ImagePart | VideoFramesPart, Field(discriminator="type")]


class ChatMessage(_Open):
    # "developer" is what newer OpenAI clients send for system prompts
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
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
    # refused when set, so a client never silently gets less than it asked for
    tools: list[Any] | None = None
    logprobs: bool | None = None
    # the gaze extension
    gaze: bool = False
    gaze_layer: int | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


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
    logprobs: None = None


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
