"""Typed settings of the serving app: the model, request limits, security, batching.

They arrive as the ``args`` of a Serve application (``infra/serve_config.yaml``) or
from ``jobs/serve.py``; every field has a default that runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gazeattn.ops.config import Backend, GazeConfig, at_budget, dense_twin


class GazeOverride(BaseModel):
    """Changes the checkpoint's ``GazeConfig`` at load time: its budget (``top_k`` or
    ``keep_ratio``) and backend, or ``attn: dense`` for its dense twin (comparison runs).
    Only these fields; the regions and context tokens are the checkpoint's own."""

    model_config = ConfigDict(extra="forbid")

    attn: Literal["gaze", "dense"] = "gaze"
    top_k: int | Literal["all"] | None = None
    keep_ratio: float | None = None
    backend: Backend = "auto"

    @model_validator(mode="after")
    def _fits_gaze_config(self) -> GazeOverride:
        if self.attn == "dense" and (self.top_k, self.keep_ratio) != (None, None):
            raise ValueError("attn 'dense' takes no top_k or keep_ratio")
        if (self.top_k, self.keep_ratio) != (None, None):
            # GazeConfig's own checks, on a config with these values
            GazeConfig(top_k=self.top_k, keep_ratio=self.keep_ratio, backend=self.backend)
        return self

    def apply(self, base: GazeConfig) -> GazeConfig:
        """``base`` (the checkpoint's config) with this override."""
        if self.attn == "dense":
            return dense_twin(base)
        if (self.top_k, self.keep_ratio) == (None, None):
            return dataclasses.replace(base, backend=self.backend)
        routed = at_budget(base, top_k=self.top_k, keep_ratio=self.keep_ratio)
        return dataclasses.replace(routed, backend=self.backend)


def placement(device: str, dtype: str, checkpoint: Path) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a replica runs the model (``ServeSettings.device``/``dtype``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.device(device)
    if dtype != "auto":
        return where, getattr(torch, dtype)
    if where.type == "cpu":
        return where, torch.float32
    config = json.loads((checkpoint / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return where, getattr(torch, saved) if saved in ("bfloat16", "float16") else torch.bfloat16


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # a gaze model directory, or an MLflow model URI (models:/name/1, runs:/id/path)
    model: str
    # the name clients send as "model"; defaults to the directory's name
    model_name: str | None = None
    gaze: GazeOverride | None = None
    # "auto": CUDA when the replica has a GPU, else the CPU; or a torch device ("cuda:1")
    device: str = "auto"
    # "auto": the checkpoint's own dtype (bf16 after our GPU fine-tuning) on a GPU, float32 on
    # the CPU (where bf16 matmuls are slow); or a dtype by name
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    # request limits (bad values get 4xx with a message, never a 500)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=64)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_images: int = Field(16, ge=0)  # images + video frames per request
    # pixels of all images + frames of one request together (each also max_image_pixels)
    max_request_pixels: int = Field(2 * 4096 * 4096, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)  # None: the processor's max_length
    max_tokens_limit: int = Field(1024, ge=1)
    default_max_tokens: int = Field(64, ge=1)

    # security
    api_key_env: str = "GAZEATTN_API_KEY"  # unset or empty variable: no authentication
    # remote URLs: opt-in; each entry a scheme, host, optional port and path prefix (matched
    # parsed, see serving.images.allowed)
    allowed_image_url_prefixes: list[str] = Field(default_factory=list)
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    # allow-listed hosts on private, loopback or link-local addresses (an internal image store)
    allow_private_image_hosts: bool = False

    # continuous batching (gazeattn.engine) and the gaze extension
    max_batch_size: int = Field(16, ge=1)  # sequences decoding together in a replica
    max_prefill_tokens: int = Field(8192, ge=1)  # prompt tokens prefilled between decode steps
    # a longer prompt (a 16-frame video) prefills in chunks of at most max_prefill_tokens, one
    # per step, so running streams keep decoding (a model without recurrent layers)
    chunked_prefill: bool = True
    max_pending: int = Field(64, ge=1)  # running + waiting requests; beyond: 429
    # memory for prefilled visual prefixes reused by requests with the same images or video
    # (gazeattn.prefix_cache, least recently used out first); 0 turns prefix caching off
    prefix_cache_bytes: int = Field(2**30, ge=0)
    # processes that validate requests (decode images, encode prompts) beside the decode loop
    prepare_workers: int = Field(2, ge=1)
    # memory of each of them for processed images and videos reused by later requests with the
    # same pixels (gazeattn.media_cache, least recently used out first); 0 turns it off
    media_cache_bytes: int = Field(2**28, ge=0)
    routing_layer: int = -1

    @model_validator(mode="after")
    def _device_parses(self) -> ServeSettings:
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"device {self.device!r} is neither 'auto' nor a torch device"
                ) from None
        return self

    @model_validator(mode="after")
    def _allow_list_parses(self) -> ServeSettings:
        from serving.images import parsed_url_has_credentials, url_parts

        for entry in self.allowed_image_url_prefixes:
            if url_parts(entry) is None or parsed_url_has_credentials(entry):
                raise ValueError(
                    f"allowed_image_url_prefixes: {entry!r} is not an http(s) URL with a host "
                    "(and no user or password)"
                )
        return self
