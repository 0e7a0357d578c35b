"""Gaze attention: one entry point, several backends (reference, dense, triton)."""

from __future__ import annotations

import torch

from gazeattn.ops.config import GazeConfig
from gazeattn.ops.gaze.decode import after_layout, can_decode, gaze_after_layout, gaze_decode
from gazeattn.ops.gaze.dense import dense_attention, dense_decode
from gazeattn.ops.gaze.launch import interpreted
from gazeattn.ops.gaze.naive import gaze_attention_reference
from gazeattn.ops.gaze.prefill import gaze_prefill, prefill_spans
from gazeattn.ops.gaze.stats import GazeStats, kv_savings
from gazeattn.ops.layout import GazeLayout

__all__ = ["GazeStats", "gaze_attention", "kv_savings", "resolve_backend"]


def resolve_backend(config: GazeConfig, device: torch.device) -> str:
    """The backend a call runs: ``auto`` is triton on CUDA and the reference elsewhere."""
    if config.backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if config.backend == "triton" and device.type != "cuda":
        if not interpreted():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests); "
                f"got tensors on {device}. Use backend='auto' or 'reference' on CPU."
            )
    return config.backend


def gaze_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GazeLayout,
    config: GazeConfig,
    *,
    scale: float | None = None,
    descriptors: torch.Tensor | None = None,
    top_k: int | None = None,
    return_selection: bool = False,
) -> tuple[torch.Tensor, GazeStats]:
    """Gaze attention over a batch laid out by ``layout`` (DESIGN.md section 2).

    Args:
        q: [B, Hq, Tq, D] queries; they are the last Tq of the Tk key positions
            (prefill/training: Tq = Tk; decode: Tq = 1 against a cache).
        k, v: [B, Hkv, Tk, D] keys and values, Hq a multiple of Hkv (GQA, not repeated).
        layout: the batch's token kinds, segments and regions; positions at or beyond
            ``layout.length`` are text.
        config: budget, routing mode and backend.
        scale: softmax scale, default D ** -0.5.
        descriptors: [B, Hkv, R, D] fp32 mean keys per region, e.g. from a gaze KV cache;
            computed from ``k`` when not given.
        top_k: overrides the config's budget (the progressive Top-K schedule).
        return_selection: also return the selected region ids in the stats.

    Returns:
        out [B, Hq, Tq, D] in q's dtype, and GazeStats.
    """
    _check_shapes(q, k, v, layout)
    backend = resolve_backend(config, q.device)
    if backend == "dense":
        return dense_attention(q, k, v, layout, config, scale=scale)
    kwargs = dict(
        scale=scale, descriptors=descriptors, top_k=top_k, return_selection=return_selection
    )
    if backend == "triton":
        return _triton_attention(q, k, v, layout, config, **kwargs)
    if not torch.is_grad_enabled():
        if can_decode(q, k, layout):
            if layout.max_regions == 0:
                # no row has an image: nothing to route, every key is attended
                return dense_decode(q, k, v, layout, scale=scale)
            return gaze_decode(q, k, v, layout, config, **kwargs)
        if after_layout(q, k, layout) and layout.max_regions:
            # the text after a cached visual prefix: every query routes as a decode step
            return gaze_after_layout(q, k, v, layout, config, **kwargs)
        spans = prefill_spans(layout, k.shape[2]) if q.shape[2] == k.shape[2] else None
        if spans is not None:
            return gaze_prefill(q, k, v, layout, config, spans, **kwargs)
    return gaze_attention_reference(q, k, v, layout, config, **kwargs)


def _triton_attention(q, k, v, layout, config, **kwargs):
    # imported on first use: importing gazeattn stays free of Triton's start-up cost
    from gazeattn.ops.gaze.decode_triton import gaze_decode_triton
    from gazeattn.ops.gaze.fused import gaze_attention_triton

    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if can_decode(q, k, layout) and not needs_grad:
        return gaze_decode_triton(q, k, v, layout, config, **kwargs)
    return gaze_attention_triton(q, k, v, layout, config, **kwargs)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GazeLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be 4-D: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]")
    if k.shape != v.shape:
        raise ValueError(f"k and v differ in shape: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} KV heads")
    if layout.batch_size != q.shape[0]:
        raise ValueError(f"the layout has {layout.batch_size} sequences, the batch {q.shape[0]}")
    if layout.length > k.shape[2]:
        raise ValueError(f"the layout has {layout.length} positions but only {k.shape[2]} keys")
