"""The gaze model: a LLaVA-architecture model whose decoder attends through gaze attention.

- Decoder attention goes through transformers' ``AttentionInterface`` under the
  name ``"gaze"`` (with ``sdpa_mask`` registered for it in ``AttentionMaskInterface``);
  the vision tower keeps SDPA.
- The batch layout (``gaze_layout``, from ``GazeProcessor``) and the per-call
  routing state reach the attention function as forward kwargs (``gaze_state``),
  which transformers passes down to every attention call.
- Learnable context tokens replace the processor's context placeholders inside
  ``forward`` (a submodule, so ZeRO-3 gathers its parameter there).
- The GazeConfig is stored in the model config (``config.gaze_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, LlavaForConditionalGeneration
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from gazeattn.ops import GazeConfig, GazeLayout, GazeStats, gaze_attention, region_descriptors

ATTN_NAME = "gaze"


@dataclass(kw_only=True)
class LayerReport:
    """What one decoder layer's gaze attention did in one forward call."""

    layer: int
    attended_mean: float
    dense_mean: float
    selected: torch.Tensor | None = None  # [B, Hr, Tq, K] region ids, -1 padded

    @property
    def savings(self) -> float:
        return 0.0 if self.dense_mean == 0 else 1.0 - self.attended_mean / self.dense_mean


@dataclass(kw_only=True)
class GazeState:
    """Per-call (or per-generation, when kept on the cache) routing state of a gaze model."""

    layout: GazeLayout
    config: GazeConfig
    top_k: int | None = None
    layers: frozenset[int] | None = None
    report: bool = False
    keep_selection: bool = False
    descriptors: dict[int, torch.Tensor] = field(default_factory=dict)
    reports: dict[int, LayerReport] = field(default_factory=dict)
    stats: dict[int, GazeStats] = field(default_factory=dict)

    def record(self, layer: int, stats: GazeStats) -> None:
        if not self.report:
            return
        self.stats[layer] = stats
        self.reports[layer] = LayerReport(
            layer=layer,
            attended_mean=stats.attended_mean(),
            dense_mean=stats.dense_mean(),
            selected=stats.selected if self.keep_selection else None,
        )


def gaze_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention function: q [B, Hq, S, D], k/v [B, Hkv, T, D] -> ([B, S, Hq, D], None)."""
    state: GazeState | None = kwargs.get("gaze_state")
    if state is None:
        raise ValueError(
            "gaze attention needs gaze_state; call the model with gaze_layout= from GazeProcessor"
        )
    layer = module.layer_idx
    config = state.config
    if state.layers is not None and layer not in state.layers:
        config = dataclasses.replace(config, top_k="all", keep_ratio=None, backend="dense")
    tq, tk = query.shape[2], key.shape[2]
    descriptors = state.descriptors.get(layer)
    if descriptors is None and tq == tk and tk >= state.layout.length and config.backend != "dense":
        # prefill: the descriptors are computed once here and reused by every decode step
        descriptors = region_descriptors(key[:, :, : state.layout.length], state.layout)
        state.descriptors[layer] = (
            descriptors.detach() if not torch.is_grad_enabled() else descriptors
        )
    elif tq == tk:
        descriptors = None
    out, stats = gaze_attention(
        query,
        key,
        value,
        state.layout,
        config,
        scale=scaling,
        descriptors=descriptors,
        top_k=state.top_k,
        return_selection=state.report and state.keep_selection,
    )
    state.record(layer, stats)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register the gaze attention and its mask function with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, gaze_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class GazeContextEmbedding(nn.Module):
    """The learnable context tokens, substituted for the processor's placeholders."""

    def __init__(self, num_tokens: int, hidden: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.weight = nn.Parameter(torch.zeros(max(num_tokens, 0), hidden))

    def forward(self, embeds: torch.Tensor, is_context: torch.Tensor) -> torch.Tensor:
        if self.num_tokens == 0 or not bool(is_context.any()):
            # every rank touches the parameter, so ZeRO-3 sees the same calls on all ranks
            return embeds + 0.0 * self.weight.sum() if self.num_tokens else embeds
        # the slot of a context token is its index within its run of consecutive placeholders
        pos = torch.arange(is_context.shape[1], device=is_context.device).expand_as(is_context)
        last_other = torch.where(is_context, -1, pos).cummax(dim=1).values
        slot = (pos - last_other - 1).clamp(min=0, max=self.num_tokens - 1)
        ctx = self.weight.to(embeds.dtype)[slot]
        return torch.where(is_context[..., None], ctx, embeds)


class GazeLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with gaze attention in the decoder and learnable context tokens."""

    def __init__(self, config):
        super().__init__(config)
        gaze = getattr(config, "gaze_config", None)
        if gaze is None:
            raise ValueError("a gaze model's config needs gaze_config (use convert_to_gaze)")
        self.gaze_config = GazeConfig.from_dict(gaze)
        self.gaze_layers = (
            frozenset(config.gaze_layers) if getattr(config, "gaze_layers", None) else None
        )
        self.context_token_id = config.context_token_id
        self.gaze_top_k: int | None = None
        self.gaze_context = GazeContextEmbedding(
            self.gaze_config.num_context_tokens, config.text_config.hidden_size
        )
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, GazeContextEmbedding):
            nn.init.normal_(
                module.weight, std=getattr(self.config.text_config, "initializer_range", 0.02)
            )
            return
        super()._init_weights(module)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        gaze_layout: GazeLayout | None = None,
        gaze_report: bool = False,
        gaze_selection: bool = False,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        """LLaVA forward plus ``gaze_layout`` (required) and, when asked, a routing report.

        The report (``gaze_report=True``) is set on the output as ``output.gaze_report``:
        a dict layer -> LayerReport; ``gaze_selection=True`` keeps the selected region ids.
        """
        if input_ids is None:
            raise ValueError(
                "the gaze model needs input_ids (context and image placeholders are found there)"
            )
        if gaze_layout is None:
            raise ValueError(
                "a gaze model needs gaze_layout= (GazeProcessor returns it with the batch)"
            )
        embeds = self._embed(input_ids, pixel_values)
        state = self._state(gaze_layout, cache, gaze_report, gaze_selection)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[
                :, past : past + input_ids.shape[1]
            ]
        outputs = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            gaze_state=state,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size
            )
        out = LlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        if gaze_report:
            out.gaze_report = dict(sorted(state.reports.items()))
        return out

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        if pixel_values is not None and pixel_values.shape[0] > 0:
            features = self._vision_features(pixel_values).to(embeds.device, embeds.dtype)
            if int(is_image.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(is_image.sum())} image tokens in input_ids but {features.shape[0]} visual features"
                )
            embeds = embeds.masked_scatter(is_image[..., None], features)
        elif bool(is_image.any()):
            raise ValueError("image tokens in input_ids but no pixel_values")
        elif self.training:
            # a text-only batch still runs the vision tower once: under ZeRO-3 every rank must
            # gather the same parameters, or ranks with and without images wait on each other
            embeds = embeds + 0.0 * self._vision_features(self._blank_image()).sum()
        return self.gaze_context(embeds, input_ids == self.context_token_id)

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N * h * w, hidden] projected visual embeddings."""
        features = self.model.get_image_features(
            pixel_values=pixel_values.to(self.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        return torch.cat(list(features), dim=0)

    def _blank_image(self) -> torch.Tensor:
        size = self.config.vision_config.image_size
        return torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)

    def _state(self, layout: GazeLayout, cache, report: bool, selection: bool) -> GazeState:
        layout = layout.to(self.device)
        state = getattr(cache, "gaze_state", None) if cache is not None else None
        if state is None or state.layout is not layout and cache.get_seq_length() == 0:
            state = GazeState(layout=layout, config=self.gaze_config, layers=self.gaze_layers)
            if cache is not None:
                cache.gaze_state = state
        state.config = self.gaze_config
        state.top_k = self.gaze_top_k
        state.report = report
        state.keep_selection = selection
        state.reports = {}
        state.stats = {}
        return state

    def prepare_inputs_for_generation(self, *args, gaze_layout=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs["gaze_layout"] = gaze_layout
        return inputs


def set_gaze_top_k(model: nn.Module, top_k: int | None) -> None:
    """Override the budget with ``top_k`` regions (the progressive schedule); None restores it."""
    _unwrap(model).gaze_top_k = top_k


def set_gaze_budget(
    model: nn.Module, *, top_k: int | str | None = None, keep_ratio: float | None = None
) -> None:
    """Replace the configured budget (exactly one of top_k / keep_ratio)."""
    inner = _unwrap(model)
    inner.gaze_config = dataclasses.replace(inner.gaze_config, top_k=top_k, keep_ratio=keep_ratio)


def _unwrap(model: nn.Module) -> GazeLlavaForConditionalGeneration:
    inner = getattr(model, "module", model)
    if not isinstance(inner, GazeLlavaForConditionalGeneration):
        raise TypeError(f"not a gaze model: {type(inner).__name__}")
    return inner


def _visual_mean_init(model: LlavaForConditionalGeneration, num: int) -> torch.Tensor:
    """Context-token init: the mean projected visual embedding of a mid-gray image, plus small noise."""
    vision = model.config.vision_config
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, dtype=model.dtype)
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        mean = torch.cat(list(features)).float().mean(0)
    noise = (
        torch.randn(num, mean.shape[0], generator=torch.Generator().manual_seed(0))
        * 0.02
        * mean.std()
    )
    return mean[None] + noise


def convert_to_gaze(
    model: LlavaForConditionalGeneration,
    gaze: GazeConfig,
    *,
    context_token_id: int | None = None,
    layers: list[int] | None = None,
    context_init: str = "visual_mean",
) -> GazeLlavaForConditionalGeneration:
    """A gaze model with ``model``'s weights; context tokens initialised as configured."""
    register_attention()
    config = model.config
    config.gaze_config = gaze.to_dict()
    config.gaze_layers = list(layers) if layers else None
    if context_token_id is None:
        context_token_id = getattr(config, "context_token_id", None)
    if context_token_id is None:
        raise ValueError("context_token_id is needed (the tokenizer's context placeholder id)")
    config.context_token_id = context_token_id
    _set_attn(config)
    gaze_model = GazeLlavaForConditionalGeneration(config)
    missing, unexpected = gaze_model.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) - {"gaze_context.weight"}:
        raise RuntimeError(
            f"weights do not fit the gaze model: missing {missing}, unexpected {unexpected}"
        )
    if gaze.num_context_tokens:
        with torch.no_grad():
            if context_init == "visual_mean":
                gaze_model.gaze_context.weight.copy_(
                    _visual_mean_init(model, gaze.num_context_tokens)
                )
            elif context_init != "normal":
                raise ValueError(
                    f"context_init must be 'visual_mean' or 'normal', got {context_init!r}"
                )
    # in the mode of the model it replaces (from_pretrained gives eval mode): a converted
    # model must not start in training mode, where a text-only step also runs the vision tower
    gaze_model.train(model.training)
    return gaze_model.to(model.dtype)


def _set_attn(config) -> None:
    config.text_config._attn_implementation = ATTN_NAME
    config.vision_config._attn_implementation = "sdpa"


def load_model(
    name_or_path: str | Path,
    gaze: GazeConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs,
):
    """Load a gaze checkpoint, or convert a stock LLaVA-architecture checkpoint.

    - A gaze checkpoint loads as saved; ``gaze`` (when given) replaces its routing settings
      (the number of context tokens must match the checkpoint's).
    - A stock checkpoint loads as the stock model when ``gaze`` is None, and is converted
      into a gaze model (context tokens initialised from visual features) otherwise.
    Returns (model, processor).
    """
    from gazeattn.processing import GazeProcessor

    register_attention()
    config = AutoConfig.from_pretrained(name_or_path)
    saved = getattr(config, "gaze_config", None)
    processor = GazeProcessor.from_pretrained(name_or_path, gaze_config=gaze)
    attn = {"text_config": ATTN_NAME, "vision_config": "sdpa"}
    if saved is not None:
        if (
            gaze is not None
            and gaze.num_context_tokens != GazeConfig.from_dict(saved).num_context_tokens
        ):
            raise ValueError(
                "a gaze checkpoint's number of context tokens cannot change at load time"
            )
        model = GazeLlavaForConditionalGeneration.from_pretrained(
            name_or_path, attn_implementation=attn, dtype=dtype, **kwargs
        )
        if gaze is not None:
            model.gaze_config = gaze
            model.config.gaze_config = gaze.to_dict()
    else:
        model = LlavaForConditionalGeneration.from_pretrained(
            name_or_path, attn_implementation="sdpa", dtype=dtype, **kwargs
        )
        if gaze is not None:
            ctx_id = processor.context_token_id
            model = convert_to_gaze(model, gaze, context_token_id=ctx_id)
        else:
            processor.gaze_config = None
            processor.settings.num_context_tokens = 0
    if device is not None:
        model = model.to(device)
    return model, processor
