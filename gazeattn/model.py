"""Loading and converting: stock hub checkpoints in, gaze models in transformers' own layout out.

- ``load_model(name_or_path, gaze=...)`` takes a local directory or a hub id (resolved
  through the HF cache), of a stock checkpoint of a supported family or of a saved gaze
  model, and returns ``(model, processor)``.
- ``convert_to_gaze`` turns a stock model into its family's gaze model: the context token
  (and LLaVA's video token) join the tokenizer, the embeddings grow when the vocabulary
  has no spare rows, the gaze settings go into the config, and generation never samples
  a placeholder.
- ``register_auto_classes`` (run by ``import gazeattn``) makes ``AutoConfig``,
  ``AutoModelForImageTextToText`` and ``AutoProcessor`` load saved gaze checkpoints as gaze
  models, with no ``trust_remote_code``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import AddedToken
from torch import nn

from gazeattn.families import FAMILIES, Family, UnsupportedModel, family_of
from gazeattn.families.llava import GazeLlavaForConditionalGeneration
from gazeattn.modeling import (
    ATTN_NAME,
    GazeModelMixin,
    GazeState,
    LayerReport,
    gaze_attention_forward,
    gaze_module,
    is_gaze_model,
    register_attention,
    set_gaze_budget,
    set_gaze_top_k,
)
from gazeattn.ops import GazeConfig

__all__ = [
    "ATTN_NAME",
    "GazeLlavaForConditionalGeneration",
    "GazeModelMixin",
    "GazeState",
    "LayerReport",
    "UnsupportedModel",
    "convert_to_gaze",
    "gaze_attention_forward",
    "gaze_module",
    "is_gaze_model",
    "load_model",
    "register_attention",
    "register_auto_classes",
    "set_gaze_budget",
    "set_gaze_top_k",
]

ATTN = {"text_config": ATTN_NAME, "vision_config": "sdpa"}
EMBEDDING_MULTIPLE = 64
HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def register_auto_classes() -> None:
    """Register every family's gaze config, model and the GazeProcessor with the Auto classes."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from gazeattn.processing import GazeProcessor

    register_attention()
    for family in FAMILIES.values():
        config_cls, model_cls = family.classes()
        AutoConfig.register(family.gaze_model_type, config_cls, exist_ok=True)
        AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
        AutoProcessor.register(config_cls, GazeProcessor, exist_ok=True)


def _add_tokens(processor, family: Family) -> None:
    """The context token, and for LLaVA a video token, as special tokens of the tokenizer."""
    tokenizer = processor.tokenizer
    wanted = [processor.context_token]
    if family.name == "llava":
        wanted.append(processor.video_token)
    new = [t for t in wanted if processor._token_id(t) is None]
    if new:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True
        )


def _grow_embeddings(model: nn.Module, vocab: int) -> None:
    """Resize the embeddings (and an untied head) to hold ``vocab`` ids, padded to a multiple of 64.

    New rows start at the mean of the old ones (transformers' mean resizing), so the new
    tokens do not shift the output distribution at the start of fine-tuning.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab <= rows:
        return
    # seeded: converting the same checkpoint twice gives the same rows (an adapter checkpoint
    # is rebuilt on its converted base at load time)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.resize_token_embeddings(
            vocab, pad_to_multiple_of=EMBEDDING_MULTIPLE, mean_resizing=True
        )
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]


def _context_init(model: GazeModelMixin, num: int, how: str) -> torch.Tensor:
    """Context-token init: the mean projected visual embedding of a mid-gray image plus small
    noise (``visual_mean``), or transformers' normal init (``normal``)."""
    hidden = model.config.text_config.hidden_size
    if how == "normal":
        std = getattr(model.config.text_config, "initializer_range", 0.02)
        return torch.randn(num, hidden, generator=torch.Generator().manual_seed(0)) * std
    if how != "visual_mean":
        raise ValueError(f"context_init must be 'visual_mean' or 'normal', got {how!r}")
    with torch.no_grad():
        features = torch.cat([p[1] for p in model._visual_embeds(model._blank_vision())])
        mean = features.float().mean(0).cpu()
    noise = torch.randn(num, hidden, generator=torch.Generator().manual_seed(0)) * 0.02 * mean.std()
    return mean[None] + noise


def convert_to_gaze(
    model: nn.Module,
    processor,
    gaze: GazeConfig,
    *,
    layers: list[int] | None = None,
    context_init: str = "visual_mean",
):
    """``(gaze model, processor)`` from a stock model of a supported family and its processor.

    The gaze model shares the stock model's weight tensors (no copy); ``processor`` is updated
    in place (tokens added, gaze settings set). ``layers`` limits routing to those decoder
    layers (the others attend densely).
    """
    register_attention()
    family = family_of(model.config)
    _add_tokens(processor, family)
    _grow_embeddings(model, len(processor.tokenizer))
    processor.with_gaze(gaze)
    config_cls, model_cls = family.classes()
    data = model.config.to_dict()
    data.pop("model_type", None)
    config = config_cls(
        **data,
        gaze_config=gaze.to_dict(),
        context_token_id=processor.context_token_id,
        gaze_layers=list(layers) if layers else None,
    )
    config.text_config._attn_implementation = ATTN_NAME
    config.vision_config._attn_implementation = "sdpa"
    gaze_model = _build_sharing(model, model_cls, config)
    if gaze.num_context_tokens:
        init = _context_init(gaze_model, gaze.num_context_tokens, context_init)
        with torch.no_grad():
            gaze_model.gaze_context.weight.copy_(init.to(gaze_model.gaze_context.weight))
    gaze_model.generation_config = _generation_config(model, processor)
    # in the mode of the model it replaces (from_pretrained gives eval mode): a converted
    # model must not start in training mode, where a text-only step also runs the vision tower
    gaze_model.train(model.training)
    return gaze_model, processor


def _build_sharing(model: nn.Module, model_cls, config) -> GazeModelMixin:
    """The gaze model built on the meta device, then given the stock model's tensors."""
    with torch.device("meta"):
        gaze_model = model_cls(config)
    missing, unexpected = gaze_model.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected or set(missing) - {"gaze_context.weight"}:
        raise RuntimeError(
            f"weights do not fit the gaze model: missing {missing}, unexpected {unexpected}"
        )
    device, dtype = model.device, model.dtype
    # buffers that are not saved (rotary frequencies) come from the stock model too
    stock_buffers = dict(model.named_buffers())
    for name, _ in list(gaze_model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        gaze_model.get_submodule(owner).register_buffer(
            leaf, stock_buffers[name], persistent=name in model.state_dict()
        )
    context = gaze_model.gaze_context
    if context.weight is not None:
        shape = context.weight.shape
        context.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
    gaze_model.tie_weights()
    return gaze_model


def _generation_config(model: nn.Module, processor):
    """The stock generation config, stopping at every end-of-turn token and never sampling a
    placeholder (image, video or context token) that only the processor may place."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = processor.stop_token_ids
    config.suppress_tokens = processor.placeholder_ids
    if config.pad_token_id is None:
        config.pad_token_id = processor.tokenizer.pad_token_id
    return config


def load_model(
    name_or_path: str | Path,
    gaze: GazeConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    context_init: str = "visual_mean",
    **kwargs,
):
    """Load a gaze checkpoint, or a stock one of a supported family (converted when ``gaze`` is given).

    ``name_or_path`` is a local directory or a hub id (resolved through the HF cache, so
    offline use works once the files are cached).

    - An adapter checkpoint (peft's format, ``gazeattn.adapters.save_adapter``) loads its
      base as it was converted for training, with the adapter on top (``merge_adapter=True``
      merges it into the weights).

    - A gaze checkpoint loads as saved; ``gaze`` (when given) replaces its routing settings
      (the number of context tokens must match the checkpoint's).
    - A stock checkpoint loads as the stock model when ``gaze`` is None, and is converted
      into a gaze model otherwise (context tokens initialised as ``context_init`` says).
    Returns (model, processor); any other architecture raises UnsupportedModel.
    """
    from transformers import AutoConfig

    from gazeattn.adapters import GAZE_BASE_FILE, load_adapter
    from gazeattn.families import read_json
    from gazeattn.processing import GazeProcessor

    register_auto_classes()
    path = str(name_or_path)
    hub = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
    merge = kwargs.pop("merge_adapter", False)
    if read_json(path, GAZE_BASE_FILE, hub):
        if gaze is not None:
            raise ValueError("an adapter checkpoint keeps the gaze settings it was trained with")
        model, processor = load_adapter(path, merge=merge, dtype=dtype, **hub, **kwargs)
        return (model.to(device) if device is not None else model), processor
    config = AutoConfig.from_pretrained(path, **hub)
    family = family_of(config)
    processor = GazeProcessor.from_pretrained(path, **hub)
    if config.model_type == family.gaze_model_type:
        saved = GazeConfig.from_dict(config.gaze_config)
        if gaze is not None and gaze.num_context_tokens != saved.num_context_tokens:
            raise ValueError(
                f"a gaze checkpoint's number of context tokens cannot change at load time "
                f"(saved {saved.num_context_tokens}, asked {gaze.num_context_tokens})"
            )
        _, model_cls = family.classes()
        model = model_cls.from_pretrained(
            path, attn_implementation=ATTN, dtype=dtype, **hub, **kwargs
        )
        if gaze is not None:
            model.gaze_config = gaze
            model.config.gaze_config = gaze.to_dict()
            processor.with_gaze(gaze)
    else:
        model = family.stock_class().from_pretrained(
            path, attn_implementation="sdpa", dtype=dtype, **hub, **kwargs
        )
        if gaze is not None:
            model, processor = convert_to_gaze(model, processor, gaze, context_init=context_init)
    if device is not None:
        model = model.to(device)
    return model, processor
