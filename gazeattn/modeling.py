"""What every gaze model shares, whatever its family: attention function, routing state, context tokens.

- Decoder attention goes through transformers' ``AttentionInterface`` under the
  name ``"gaze"`` (with ``sdpa_mask`` registered for it in ``AttentionMaskInterface``);
  the vision tower keeps SDPA.
- The batch layout (``gaze_layout``, from ``GazeProcessor``) and the per-call
  routing state reach the attention function as forward kwargs (``gaze_state``),
  which transformers passes down to every attention call.
- Learnable context tokens replace the processor's context placeholders inside
  ``forward`` (a submodule, so ZeRO-3 gathers its parameter there).
- ``GazeModelMixin`` is the forward of a gaze model; a family (``gazeattn.families``)
  adds how its vision inputs become embeddings and how its positions are numbered.
- DeepStack (Qwen3-VL): features a family returns per injected decoder layer are added
  at the visual positions only (never at context tokens; ``gazeattn.families.qwen3_vl``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

from gazeattn.ops import (
    GazeConfig,
    GazeLayout,
    GazeStats,
    gaze_attention,
    kv_savings,
    region_descriptors,
)
from gazeattn.ops.config import at_budget, dense_twin

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
        return kv_savings(self.attended_mean, self.dense_mean)


@dataclass(kw_only=True)
class GazeState:
    """Per-call (or per-generation, when kept on the cache) routing state of a gaze model.

    ``descriptors`` [B, Hkv, R, D] per layer are computed at prefill and reused by every
    decode step; ``rope_deltas`` [B, 1] (M-RoPE families) turn a decode step's text position
    into its rotary position.
    """

    layout: GazeLayout
    config: GazeConfig
    top_k: int | None = None
    layers: frozenset[int] | None = None
    report: bool = False
    keep_selection: bool = False
    descriptors: dict[int, torch.Tensor] = field(default_factory=dict)
    rope_deltas: torch.Tensor | None = None
    reports: dict[int, LayerReport] = field(default_factory=dict)
    stats: dict[int, GazeStats] = field(default_factory=dict)
    # False: keep the raw stats only, without the per-layer summary (a batch decoding at
    # every step reads the stats; the summary's host syncs would cost it time)
    summarize: bool = True

    def record(self, layer: int, stats: GazeStats) -> None:
        if not self.report:
            return
        self.stats[layer] = stats
        if not self.summarize:
            return
        self.reports[layer] = LayerReport(
            layer=layer,
            attended_mean=stats.attended_mean(),
            dense_mean=stats.dense_mean(),
            selected=stats.selected if self.keep_selection else None,
        )

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, repeat) the batch rows ``index``: beam search, expanded inputs."""
        self.layout = self.layout.select_rows(index)
        self.descriptors = {
            k: v.index_select(0, index.to(v.device)) for k, v in self.descriptors.items()
        }
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas.index_select(0, index.to(self.rope_deltas.device))


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
        config = dense_twin(config)
    tq, tk = query.shape[2], key.shape[2]
    descriptors = state.descriptors.get(layer)
    prefill = tq == tk or tq > 1  # a whole prompt, or a chunk of one (never a decode step)
    if descriptors is None and prefill and tk >= state.layout.length and config.backend != "dense":
        # the prefill (or its chunk) whose keys cover the layout: the descriptors are computed
        # once here and reused by every decode step
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
        self.num_tokens = max(num_tokens, 0)
        # none: no parameter at all (ZeRO-3 cannot gather a tensor of no elements)
        weight = nn.Parameter(torch.zeros(num_tokens, hidden)) if num_tokens > 0 else None
        self.register_parameter("weight", weight)

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


class GazeModelMixin:
    """The forward of a gaze model: the family's visual embeddings, context tokens, gaze decoder.

    A family class gives ``forward`` its stock signature (transformers' ``generate`` checks
    the argument names) and implements ``_visual_embeds(vision) -> [(placeholder id,
    [N, hidden] features), ...]`` (a DeepStack family adds a third item: the features per
    injected decoder layer, each ``[N, hidden]``), ``_blank_vision()`` (one mid-gray
    image's inputs), ``_placeholder_ids()`` and ``_positions(...)``.
    """

    def _init_gaze(self, config) -> None:
        # however the model was built or loaded, its decoder attends through gaze attention
        register_attention()
        self.set_attn_implementation({"text_config": ATTN_NAME, "vision_config": "sdpa"})
        if config.gaze_config is None:
            raise ValueError("a gaze model's config needs gaze_config (use convert_to_gaze)")
        self.gaze_config = GazeConfig.from_dict(config.gaze_config)
        self.gaze_layers = frozenset(config.gaze_layers) if config.gaze_layers else None
        self.context_token_id = config.context_token_id
        self.gaze_top_k: int | None = None
        self.gaze_context = GazeContextEmbedding(
            self.gaze_config.num_context_tokens, config.text_config.hidden_size
        )

    def _init_weights(self, module):
        if isinstance(module, GazeContextEmbedding):
            if module.weight is None:
                return
            nn.init.normal_(
                module.weight, std=getattr(self.config.text_config, "initializer_range", 0.02)
            )
            return
        super()._init_weights(module)

    def _gaze_forward(
        self,
        input_ids: torch.LongTensor | None,
        vision: dict,
        *,
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
    ) -> MultimodalCausalLMOutputWithPast:
        """The stock forward plus ``gaze_layout`` (required) and, when asked, a routing report.

        ``vision`` holds the family's pixel inputs. Positions are numbered from the layout
        and the attention mask. The report (``gaze_report=True``) is set on the output as
        ``output.gaze_report``: a dict layer -> LayerReport; ``gaze_selection=True`` keeps
        the selected region ids.
        """
        if inputs_embeds is not None:
            raise ValueError("the gaze model takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError(
                "the gaze model needs input_ids (context and image placeholders are found there)"
            )
        if gaze_layout is None:
            raise ValueError(
                "a gaze model needs gaze_layout= (GazeProcessor returns it with the batch)"
            )
        embeds, deepstack = self._embed(input_ids, vision)
        cache = self._gaze_cache(cache)
        state = self._state(gaze_layout, cache, gaze_report, gaze_selection)
        position_ids = self._positions(
            input_ids, attention_mask, position_ids, cache, state, vision
        )
        outputs = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            gaze_state=state,
            **deepstack,
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
        out = MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        if gaze_report:
            out.gaze_report = dict(sorted(state.reports.items()))
        return out

    def start_prefill(
        self,
        input_ids: torch.LongTensor,
        vision: dict,
        *,
        attention_mask: torch.Tensor,
        cache,
        gaze_layout: GazeLayout,
        gaze_report: bool = False,
        gaze_selection: bool = False,
    ) -> ChunkedPrefill:
        """A one-sequence prompt's prefill into ``cache``, to be run in chunks
        (``ChunkedPrefill.run``): the vision tower, the context tokens and the positions of
        the whole prompt are computed here, once; the decoder then runs a chunk at a time.
        The cache ends as one ``forward`` over the whole prompt leaves it."""
        if input_ids.shape[0] != 1:
            raise ValueError("a chunked prefill takes one sequence")
        embeds, deepstack = self._embed(input_ids, vision)
        cache = self._gaze_cache(cache)
        state = self._state(gaze_layout, cache, gaze_report, gaze_selection)
        positions = self._positions(input_ids, attention_mask, None, cache, state, vision)
        return ChunkedPrefill(
            model=self,
            embeds=embeds,
            positions=positions,
            mask=attention_mask,
            deepstack=deepstack,
            state=state,
            cache=cache,
        )

    def _gaze_cache(self, cache):
        """The cache the decoder runs on (a hybrid decoder fills in its layer kinds)."""
        return cache

    def _embed(self, input_ids: torch.Tensor, vision: dict) -> tuple[torch.Tensor, dict]:
        """Token embeddings with the visual features and context tokens in place, and the
        decoder's DeepStack inputs (empty for a family without DeepStack)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        pieces = self._visual_embeds(vision)
        for token_id, features, *_ in pieces:
            where = input_ids == token_id
            features = features.to(embeds.device, embeds.dtype)
            if int(where.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(where.sum())} visual tokens (id {token_id}) in input_ids but "
                    f"{features.shape[0]} visual features"
                )
            embeds = embeds.masked_scatter(where[..., None], features)
        placed = {piece[0] for piece in pieces}
        missing = [
            i for i in self._placeholder_ids() if i not in placed and bool((input_ids == i).any())
        ]
        if missing:
            raise ValueError(f"visual placeholders {missing} in input_ids but no pixel inputs")
        if not pieces and self.training:
            # a text-only batch still runs the vision tower once: under ZeRO-3 every rank must
            # gather the same parameters, or ranks with and without images wait on each other
            # (DeepStack mergers included: their gradients are reduced on every rank too)
            blank = sum(_total(piece) for piece in self._visual_embeds(self._blank_vision()))
            embeds = embeds + 0.0 * blank
        context = self.gaze_context(embeds, input_ids == self.context_token_id)
        return context, _deepstack_inputs(input_ids, pieces)

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

    def _expand_inputs_for_generation(
        self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs
    ):
        # beams and num_return_sequences repeat every row; the layout is not a tensor, so
        # transformers would leave it at the original batch size
        layout = model_kwargs.pop("gaze_layout", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if layout is not None:
            index = torch.arange(layout.batch_size).repeat_interleave(expand_size)
            model_kwargs["gaze_layout"] = layout.select_rows(index)
        return input_ids, model_kwargs


@dataclass(kw_only=True)
class ChunkedPrefill:
    """A prompt's prefill run a chunk at a time (``GazeModelMixin.start_prefill``), so that a
    long visual prompt does not hold a batch's decode steps back.

    Chunk boundaries may fall anywhere, inside an image or a frame too: a visual query
    attends causally and a context query to its own segment, whose tokens come before it;
    a text query routes among the segments that ended before it, whose keys are all in the
    cache by then. A chunk that ends before the layout does runs on ``layout.head`` (the
    regions not yet complete are not visible to it) with a state of its own; the chunk that
    completes the layout computes the region descriptors on the whole layout and keeps
    them, as a whole prefill does.
    """

    model: GazeModelMixin
    embeds: torch.Tensor  # [1, T, hidden] with visual features and context tokens in place
    positions: torch.Tensor  # [..., 1, T]
    mask: torch.Tensor  # [1, T]
    deepstack: dict
    state: GazeState  # the cache's state: the whole layout, rotary deltas
    cache: object
    done: int = 0  # positions prefilled so far

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def remaining(self) -> int:
        return self.length - self.done

    def run(self, tokens: int) -> torch.Tensor | None:
        """Prefill the next ``tokens`` positions (at least 1); the last position's logits
        [1, 1, V] once the whole prompt is in the cache, else None."""
        start, end = self.done, min(self.length, self.done + max(1, tokens))
        final = end == self.length
        state = self.state
        if end < state.layout.length:
            state = GazeState(
                layout=state.layout.head(end),
                config=state.config,
                top_k=state.top_k,
                layers=state.layers,
            )
        else:
            # a text chunk before may have reported: the last chunk's report is the call's
            state.reports, state.stats = {}, {}
        outputs = self.model.model.language_model(
            inputs_embeds=self.embeds[:, start:end],
            attention_mask=self.mask[:, :end],
            position_ids=self.positions[..., start:end],
            cache=self.cache,
            use_cache=True,
            gaze_state=state,
            **deepstack_chunk(self.deepstack, start, end),
        )
        self.done = end
        if not final:
            return None
        return self.model.lm_head(outputs.last_hidden_state[:, -1:, :])


def deepstack_chunk(deepstack: dict, start: int, end: int) -> dict:
    """The DeepStack inputs of positions [start, end) of a one-sequence prompt."""
    if not deepstack:
        return {}
    visual = deepstack["visual_pos_masks"]
    first, last = int(visual[:, :start].sum()), int(visual[:, :end].sum())
    return {
        "visual_pos_masks": visual[:, start:end],
        "deepstack_visual_embeds": [e[first:last] for e in deepstack["deepstack_visual_embeds"]],
    }


def _total(piece: tuple) -> torch.Tensor:
    """The sum of every feature of a piece (features, and DeepStack features when present)."""
    total = piece[1].sum()
    for layer in piece[2] if len(piece) > 2 and piece[2] else ():
        total = total + layer.sum()
    return total


def _deepstack_inputs(input_ids: torch.Tensor, pieces: list[tuple]) -> dict:
    """The stock decoder's DeepStack inputs: ``visual_pos_masks`` [B, T] (the image and video
    placeholders; context tokens are not among them) and ``deepstack_visual_embeds``, per
    injected layer the features of those positions in sequence order [N, hidden]."""
    deep = [(piece[0], piece[2]) for piece in pieces if len(piece) > 2 and piece[2]]
    if not deep:
        return {}
    where = {token_id: input_ids == token_id for token_id, _ in deep}
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for mask in where.values():
        visual |= mask
    layers = {len(stack) for _, stack in deep}
    if len(layers) != 1:
        raise ValueError(f"DeepStack features for different numbers of layers: {sorted(layers)}")
    embeds = []
    for layer in range(layers.pop()):
        first = deep[0][1][layer]
        joint = first.new_zeros(int(visual.sum()), first.shape[-1])
        for token_id, stack in deep:
            joint[where[token_id][visual]] = stack[layer].to(joint.dtype)
        embeds.append(joint)
    return {"visual_pos_masks": visual, "deepstack_visual_embeds": embeds}


def set_gaze_top_k(model: nn.Module, top_k: int | None) -> None:
    """Override the budget with ``top_k`` regions (the progressive schedule); None restores it."""
    gaze_module(model).gaze_top_k = top_k


def set_gaze_budget(
    model: nn.Module, *, top_k: int | str | None = None, keep_ratio: float | None = None
) -> None:
    """Replace the configured budget (exactly one of top_k / keep_ratio)."""
    inner = gaze_module(model)
    inner.gaze_config = at_budget(inner.gaze_config, top_k=top_k, keep_ratio=keep_ratio)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DeepSpeed's engine and peft's wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def is_gaze_model(model: nn.Module) -> bool:
    return isinstance(unwrap(model), GazeModelMixin)


def routed_layer_ids(config, gaze_layers=None) -> list[int]:
    """The decoder layers where a gaze model of ``config`` routes (and reports): those of
    ``gaze_layers`` (all when None) that attend; a hybrid decoder's linear-attention layers
    do not."""
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    attending = [i for i, kind in enumerate(types) if kind != "linear_attention"]
    return [i for i in attending if gaze_layers is None or i in gaze_layers]


def routed_layers(model: nn.Module) -> list[int]:
    """``routed_layer_ids`` of a loaded gaze model."""
    inner = gaze_module(model)
    return routed_layer_ids(inner.config, inner.gaze_layers)


def routing_layer_of(model: nn.Module, layer: int) -> int:
    """A requested routing layer (a decoder layer id, negative from the last decoder layer)
    as the id its reports are keyed by; ``InvalidRequest`` when that layer does not route."""
    from gazeattn.generation import InvalidRequest

    total = gaze_module(model).config.get_text_config(decoder=True).num_hidden_layers
    routed = routed_layers(model)
    if not -total <= layer < total or layer % total not in routed:
        raise InvalidRequest(
            f"layer {layer} does not route in this model; its routing layers are {routed}",
            param="gaze_layer",
        )
    return layer % total


def gaze_module(model: nn.Module) -> GazeModelMixin:
    """The gaze model inside any wrappers; TypeError for a model that is not one."""
    inner = unwrap(model)
    if not isinstance(inner, GazeModelMixin):
        raise TypeError(f"not a gaze model: {type(inner).__name__}")
    return inner
