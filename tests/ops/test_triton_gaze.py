"""The Triton backend against the reference (the oracle): outputs, every gradient, selection.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py); the interpreter's cost
grows with programs x loop iterations, so the default cases are small and the sweeps
are marked slow. Reference values are computed in fp32 from the same (rounded) inputs.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from gazeattn.ops import GazeConfig, Image, Video, build_layout, gaze_attention
from gazeattn.ops.gaze import fused, launch, resolve_backend
from gazeattn.ops.gaze.fused import gaze_attention_triton
from gazeattn.ops.gaze.launch import INTERPRETER, fused_launch
from gazeattn.ops.gaze.naive import gaze_attention_reference
from gazeattn.ops.gaze.plan import build_plan

# (atol, rtol) of the output and of the gradients against the fp32 reference. fp32 is
# summation order only; fp16/bf16 are the rounding of p (and of the inputs of each dot)
# to the storage type: a few units of its epsilon (fp16 9.8e-4, bf16 7.8e-3).
TOL = {
    torch.float32: {"out": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"out": (2e-3, 2e-3), "grad": (5e-3, 5e-3)},
    torch.bfloat16: {"out": (1.6e-2, 1.6e-2), "grad": (4e-2, 4e-2)},
}

# (id, sequences, region_size, n_ctx, padding side); lengths are odd where they can be
CASES = {
    "two-images-6x6": ([[3, Image(6, 6), 2, Image(6, 12), 4]], (1, 6, 6), 2, "right"),
    "ragged-7x9-4x4": ([[2, Image(7, 9), 5]], (1, 4, 4), 1, "right"),
    "video-6x6x2": ([[4, Video(3, 6, 6), 3]], (2, 6, 6), 2, "right"),
    "frames-ragged-4x4": ([[1, Video(2, 5, 7), 2, Image(4, 9), 3]], (1, 4, 4), 3, "right"),
    "batch-left-pad": (
        [[2, Image(4, 4), 6], [5, Image(4, 4), 1, Image(3, 5), 2]],
        (1, 2, 2),
        1,
        "left",
    ),
    "batch-right-pad": (
        [[3, Image(5, 5), 4], [1, Image(4, 6), 9, Image(2, 3), 6]],
        (1, 4, 4),
        2,
        "right",
    ),
    "text-only": ([[37], [21]], (1, 6, 6), 4, "right"),
    # long enough for blocks of visual rows that see whole unmasked tiles after left padding
    "left-pad-16x16": ([[2, Image(16, 16), 3], [41, Image(16, 16), 5]], (1, 6, 6), 4, "left"),
}
GQA = [(4, 4), (4, 2), (4, 1), (7, 1)]


def _layout(case_id):
    seqs, region, n_ctx, side = CASES[case_id]
    return build_layout(seqs, region_size=region, num_context_tokens=n_ctx, padding_side=side)


def _config(case_id, routing="kv_head", **budget):
    _, region, n_ctx, _ = CASES[case_id]
    budget = budget or {"keep_ratio": 0.3}
    return GazeConfig(region_size=region, num_context_tokens=n_ctx, routing=routing, **budget)


def _inputs(layout, hq, hkv, dim, dtype, seed, tq=None):
    gen = torch.Generator().manual_seed(seed)
    b, t = layout.batch_size, layout.length
    q = torch.randn(b, hq, t if tq is None else tq, dim, generator=gen).to(dtype)
    k = torch.randn(b, hkv, t, dim, generator=gen).to(dtype)
    v = torch.randn(b, hkv, t, dim, generator=gen).to(dtype)
    return q, k, v


def check_against_reference(
    layout, config, hq, hkv, *, dim=32, dtype=torch.float32, seed=0, tq=None, device="cpu"
):
    """Triton output, stats and gradients of q, k, v against the fp32 reference."""
    layout = layout.to(device)
    q, k, v = (x.to(device) for x in _inputs(layout, hq, hkv, dim, dtype, seed, tq))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out, stats = gaze_attention_triton(*leaves, layout, config, return_selection=True)
    ref, ref_stats = gaze_attention_reference(*ref_leaves, layout, config, return_selection=True)
    assert out.dtype == dtype
    assert torch.equal(stats.selected, ref_stats.selected)
    assert torch.equal(stats.attended, ref_stats.attended)
    atol, rtol = TOL[dtype]["out"]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(device=device, dtype=dtype)
    got = torch.autograd.grad(out, leaves, grad_out)
    expect = torch.autograd.grad(ref, ref_leaves, grad_out.float())
    atol, rtol = TOL[dtype]["grad"]
    for name, g, e in zip("qkv", got, expect, strict=True):
        assert g.dtype == dtype and not g.isnan().any(), f"d{name} has NaN or the wrong dtype"
        torch.testing.assert_close(
            g.float(), e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}"
        )
    return out


# each case runs with one GQA ratio in turn (all ratios: test_gqa_groups and the slow sweep)
CASE_GQA = [(case_id, *GQA[i % len(GQA)]) for i, case_id in enumerate(CASES)]


@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
@pytest.mark.parametrize(
    "case_id,hq,hkv", CASE_GQA, ids=[f"{c}-gqa{hq // hkv}" for c, hq, hkv in CASE_GQA]
)
def test_matches_reference(case_id, hq, hkv, routing):
    check_against_reference(_layout(case_id), _config(case_id, routing), hq, hkv, seed=hq + hkv)


@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
@pytest.mark.parametrize("hq,hkv", GQA, ids=[f"gqa{a // b}" for a, b in GQA])
def test_gqa_groups(hq, hkv, routing):
    case_id = "frames-ragged-4x4"
    check_against_reference(_layout(case_id), _config(case_id, routing, top_k=3), hq, hkv, seed=hq)


@pytest.mark.parametrize(
    "dtype,dim",
    [(torch.float16, 64), (torch.bfloat16, 80), (torch.float32, 128)],
    ids=["fp16-d64", "bf16-d80", "fp32-d128"],
)
def test_dtypes_and_head_dims(dtype, dim):
    case_id = "two-images-6x6"
    check_against_reference(_layout(case_id), _config(case_id), 4, 2, dim=dim, dtype=dtype, seed=5)


@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2)], ids=["gqa1", "gqa2"])
def test_unmasked_tiles_after_left_padding(hq, hkv):
    """Blocks of visual rows take the unmasked fast path over whole tiles; padding stays out."""
    case_id = "left-pad-16x16"
    layout = _layout(case_id)
    config = _config(case_id)
    lc = fused_launch(torch.float32, 32, hq // hkv, layout.max_region_tokens, INTERPRETER)
    q_pos = torch.arange(layout.length)
    chosen = torch.zeros(2, hkv, layout.length, layout.max_regions, dtype=torch.bool)
    plan = build_plan(layout, chosen, layout.length, layout.length, hkv, lc.block_q, lc.block_n)
    whole = plan.full_hi > plan.full_lo
    assert whole.any()
    # no whole tile reaches back into the left padding or past a block's first query
    first_pad_free = (layout.kinds == 3).sum(1)  # left padding only
    assert (plan.full_lo[whole] >= first_pad_free[:, None].expand_as(whole)[whole]).all()
    assert (plan.full_hi[whole] <= q_pos[:: lc.block_q][None].expand_as(whole)[whole] + 1).all()
    check_against_reference(layout, config, hq, hkv, seed=11)


def test_chunked_prefill_queries_are_the_last_keys():
    case_id = "video-6x6x2"
    layout = _layout(case_id)
    check_against_reference(layout, _config(case_id, "query_head"), 4, 2, tq=layout.length - 50)


def test_padding_queries_output_zero():
    case_id = "batch-right-pad"
    layout = _layout(case_id)
    q, k, v = _inputs(layout, 2, 1, 32, torch.float32, seed=2)
    out, _ = gaze_attention_triton(q, k, v, layout, _config(case_id))
    pad = layout.kinds == 3  # [B, T]
    assert pad.any()
    assert torch.equal(out.permute(0, 2, 1, 3)[pad], torch.zeros_like(out.permute(0, 2, 1, 3)[pad]))


@pytest.mark.parametrize("n_ctx", [0, 2])
def test_all_regions_equals_dense_backend(n_ctx):
    layout = build_layout([[5, Image(7, 9), 3, Video(2, 6, 6), 4]], num_context_tokens=n_ctx)
    q, k, v = _inputs(layout, 4, 2, 32, torch.float32, seed=3)
    base = dict(top_k="all", num_context_tokens=n_ctx)
    gaze, _ = gaze_attention(q, k, v, layout, GazeConfig(**base, backend="triton"))
    dense, _ = gaze_attention(q, k, v, layout, GazeConfig(**base, backend="dense"))
    torch.testing.assert_close(gaze, dense, atol=2e-5, rtol=2e-5)


def test_schedule_top_k_override():
    case_id = "two-images-6x6"
    layout = _layout(case_id)
    q, k, v = _inputs(layout, 2, 2, 32, torch.float32, seed=4)
    config = _config(case_id)
    out, stats = gaze_attention_triton(q, k, v, layout, config, top_k=1, return_selection=True)
    ref, ref_stats = gaze_attention_reference(
        q, k, v, layout, config, top_k=1, return_selection=True
    )
    assert torch.equal(stats.selected, ref_stats.selected)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_backend_dispatch_and_no_silent_fallback(monkeypatch):
    case_id = "ragged-7x9-4x4"
    layout = _layout(case_id)
    config = GazeConfig(
        region_size=(1, 4, 4), keep_ratio=0.3, num_context_tokens=1, backend="triton"
    )
    q, k, v = _inputs(layout, 2, 1, 32, torch.float32, seed=6)
    out, _ = gaze_attention(q, k, v, layout, config)
    ref, _ = gaze_attention_reference(q, k, v, layout, config)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert resolve_backend(GazeConfig(keep_ratio=0.3), torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        gaze_attention(q, k, v, layout, config)


def test_mixed_dtypes_are_rejected():
    layout = _layout("ragged-7x9-4x4")
    q, k, v = _inputs(layout, 2, 1, 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="share a dtype"):
        gaze_attention_triton(q.half(), k, v, layout, _config("ragged-7x9-4x4"))


@pytest.mark.parametrize(
    "capability,dtype",
    [((8, 0), torch.float16), ((8, 6), torch.bfloat16), ((9, 0), torch.float32)],
    ids=["sm80-fp16", "sm86-bf16", "sm90-fp32"],
)
def test_gpu_tiles_under_the_interpreter(monkeypatch, capability, dtype):
    """The tiles a GPU picks (128 or 64 rows, fp32's 16 x 16, head dim 32 padded to 64 or
    128, region tokens 32 or 16 at a time, so a region of 36 spans several tiles) give the
    reference's values; only the bf16 upcast is the interpreter's."""

    def gpu_launch(dtype, head_dim, group, region_tokens, device):
        lc = fused_launch(dtype, head_dim, group, region_tokens, launch.gpu_spec(capability))
        assert lc.block_s < region_tokens and lc.d_pad > head_dim
        return dataclasses.replace(lc, upcast=dtype == torch.bfloat16)

    monkeypatch.setattr(fused, "fused_launch", gpu_launch)
    case_id = "two-images-6x6"
    check_against_reference(_layout(case_id), _config(case_id), 8, 2, dtype=dtype, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case_id,gqa,routing,dtype",
    list(
        itertools.product(
            # fp32 and the long left-padded case are swept in the default tests already
            [c for c in CASES if c != "left-pad-16x16"],
            GQA,
            ["kv_head", "query_head"],
            [torch.float16, torch.bfloat16],
        )
    ),
    ids=lambda x: (
        str(x).removeprefix("torch.") if not isinstance(x, tuple) else f"gqa{x[0] // x[1]}"
    ),
)
def test_sweep(case_id, gqa, routing, dtype):
    hq, hkv = gqa
    check_against_reference(
        _layout(case_id), _config(case_id, routing), hq, hkv, dtype=dtype, seed=hq + hkv
    )


@pytest.mark.slow
def test_larger_layout_head_dim_128():
    seqs = [[17, Image(24, 24), 9, Video(2, 12, 12), 33], [3, Video(3, 13, 11), 51]]
    layout = build_layout(seqs, num_context_tokens=4, padding_side="left")
    config = GazeConfig(keep_ratio=0.16)
    check_against_reference(layout, config, 8, 2, dim=128, dtype=torch.float16, seed=9)
