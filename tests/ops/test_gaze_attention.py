"""The vectorised backends against the per-query loop, against SDPA, and against each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gazeattn.ops import GazeConfig, Image, Video, build_layout, gaze_attention
from gazeattn.ops.gaze.decode import gaze_decode
from gazeattn.ops.gaze.naive import gaze_attention_reference
from tests.ops.kernel_paths import use_cpu_kernel
from tests.ops.loop_reference import ctx_count, dense_visual, lay_tokens, loop_attention

FP32 = dict(atol=2e-5, rtol=2e-5)

# (id, sequences, region_size, n_ctx)
CASES = [
    ("two-images", [[3, Image(6, 6), 2, Image(6, 12), 4]], (1, 6, 6), 2),
    ("ragged-7x9", [[2, Image(7, 9), 5]], (1, 6, 6), 1),
    ("video-frames", [[4, Video(3, 4, 4), 3]], (1, 2, 2), 2),
    ("video-rt2", [[1, Video(3, 4, 5), 4]], (2, 2, 2), 1),
    ("batch-left-pad", [[2, Image(4, 4), 6], [5, Image(4, 4), 1, Image(3, 5), 2]], (1, 2, 2), 1),
]
GQA = [(4, 4), (4, 2), (4, 1), (7, 1)]


def _inputs(layout, hq, hkv, dim=8, seed=0, dtype=torch.float32, tq=None):
    gen = torch.Generator().manual_seed(seed)
    b, t = layout.batch_size, layout.length
    tq = t if tq is None else tq
    q = torch.randn(b, hq, tq, dim, generator=gen).to(dtype)
    k = torch.randn(b, hkv, t, dim, generator=gen).to(dtype)
    v = torch.randn(b, hkv, t, dim, generator=gen).to(dtype)
    return q, k, v


def _sides(case_id):
    return "left" if "left" in case_id else "right"


@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
@pytest.mark.parametrize("hq,hkv", GQA, ids=[f"gqa{a}/{b}" for a, b in GQA])
@pytest.mark.parametrize("case_id,seqs,region,n_ctx", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_loop(case_id, seqs, region, n_ctx, hq, hkv, routing):
    side = _sides(case_id)
    layout = build_layout(seqs, region_size=region, num_context_tokens=n_ctx, padding_side=side)
    config = GazeConfig(
        region_size=region, keep_ratio=0.4, num_context_tokens=n_ctx, routing=routing
    )
    q, k, v = _inputs(layout, hq, hkv, seed=hq * 10 + hkv)
    out, stats = gaze_attention_reference(q, k, v, layout, config, return_selection=True)
    for b, parts in enumerate(seqs):
        toks = lay_tokens(parts, n_ctx=n_ctx, region_size=region, total=layout.length, side=side)
        expect, chosen, keys = loop_attention(q[b], k[b], v[b], toks, config)
        torch.testing.assert_close(out[b].double(), expect, **FP32)
        for (hr, i), regions in chosen.items():
            ids = stats.selected[b, hr, i]
            got = {keys[r] for r in ids[ids >= 0].tolist()}
            assert got == regions, f"query {i} head {hr}"
            if toks[i].kind == "text":
                assert stats.dense[b, i] == dense_visual(toks, i) + ctx_count(toks, i)
                routed = sum(len([t for t in toks if t.region == r]) for r in regions)
                assert stats.attended[b, hr, i] == routed + ctx_count(toks, i)


@pytest.mark.parametrize("hq,hkv", [(2, 1), (7, 7)], ids=["gqa2", "gqa1"])
def test_gradients_match_loop(hq, hkv):
    seqs = [[2, Image(4, 4), 3, Video(2, 2, 4), 3]]
    region, n_ctx = (1, 2, 2), 1
    layout = build_layout(seqs, region_size=region, num_context_tokens=n_ctx)
    config = GazeConfig(region_size=region, top_k=3, num_context_tokens=n_ctx)
    q, k, v = (t.requires_grad_() for t in _inputs(layout, hq, hkv, seed=3))
    out, _ = gaze_attention(q, k, v, layout, config)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    toks = lay_tokens(seqs[0], n_ctx=n_ctx, region_size=region)
    expect_out, _, _ = loop_attention(q[0], k[0], v[0], toks, config)
    expect = torch.autograd.grad(expect_out, (q, k, v), grad_out[0].double())
    for name, g, e in zip("qkv", got, expect, strict=True):
        torch.testing.assert_close(
            g.double(), e.double(), **FP32, msg=lambda m, n=name: f"d{n}: {m}"
        )


@pytest.mark.parametrize("n_ctx", [0, 3])
@pytest.mark.parametrize("routing", ["kv_head", "query_head"])
def test_all_regions_equals_dense(n_ctx, routing):
    layout = build_layout([[5, Image(7, 9), 3, Video(2, 6, 6), 4]], num_context_tokens=n_ctx)
    q, k, v = _inputs(layout, 4, 2, dim=16)
    base = dict(top_k="all", num_context_tokens=n_ctx, routing=routing)
    gaze, _ = gaze_attention(q, k, v, layout, GazeConfig(**base, backend="reference"))
    dense, _ = gaze_attention(q, k, v, layout, GazeConfig(**base, backend="dense"))
    torch.testing.assert_close(gaze, dense, **FP32)
    if n_ctx == 0:
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(gaze, sdpa, **FP32)


def test_keep_ratio_one_equals_dense():
    layout = build_layout([[2, Image(12, 12), 6]], num_context_tokens=0)
    q, k, v = _inputs(layout, 2, 2, dim=16)
    gaze, _ = gaze_attention(q, k, v, layout, GazeConfig(keep_ratio=1.0, num_context_tokens=0))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(gaze, sdpa, **FP32)


# "random": the evaluation ablation (pseudo-random regions, seeded) through the same paths
ROUTINGS = {"kv_head": {"routing": "kv_head"}, "query_head": {"routing": "query_head"},
            "random": {"routing": "kv_head", "random_routing_seed": 5}}  # fmt: skip


@pytest.fixture(params=["masked", "cpu-kernel", "gathered-torch"])
def decode_path(request, monkeypatch):
    """Every way the lean decode runs: in the CPU kernel (a step's selection and attention in
    one call), or in torch ops with every key masked (few keys) or the attended ones
    gathered (many keys)."""
    from gazeattn.ops.gaze import decode

    masked = request.param == "masked"
    monkeypatch.setattr(decode, "MASKED_DECODE_KEYS", 10**9 if masked else 0)
    use_cpu_kernel(monkeypatch, request.param == "cpu-kernel")
    return request.param


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_decode_equals_last_prefill_row(routing, side, decode_path):
    seqs = [[3, Image(12, 12), 2, Video(2, 6, 7), 5], [1, Image(6, 6), 4]]
    layout = build_layout(seqs, padding_side=side, num_context_tokens=2)
    config = GazeConfig(top_k=3, num_context_tokens=2, **ROUTINGS[routing])
    q, k, v = _inputs(layout, 4, 2, dim=16, seed=7)
    full, full_stats = gaze_attention_reference(q, k, v, layout, config, return_selection=True)
    if side == "right":
        # the second sequence ends in padding: decode only the first
        layout1 = build_layout(seqs[:1], num_context_tokens=2)
        t1 = layout1.length
        q, k, v, full = q[:1, :, :t1], k[:1, :, :t1], v[:1, :, :t1], full[:1, :, :t1]
        full_stats = gaze_attention_reference(q, k, v, layout1, config, return_selection=True)[1]
        layout = layout1
    step, stats = gaze_decode(q[:, :, -1:], k, v, layout, config, return_selection=True)
    torch.testing.assert_close(step, full[:, :, -1:], **FP32)
    torch.testing.assert_close(stats.attended[..., 0], full_stats.attended[..., -1])
    assert torch.equal(
        stats.selected[:, :, 0], full_stats.selected[:, :, -1, : stats.selected.shape[-1]]
    )


def test_decode_beyond_layout_uses_cached_descriptors(decode_path):
    """Generated tokens lie past the layout; cached descriptors give the same result."""
    layout = build_layout([[4, Video(3, 6, 6), 3]])
    config = GazeConfig(keep_ratio=0.25)
    extra = 5
    gen = torch.Generator().manual_seed(1)
    t = layout.length + extra
    q = torch.randn(1, 4, t, 16, generator=gen)
    k = torch.randn(1, 2, t, 16, generator=gen)
    v = torch.randn(1, 2, t, 16, generator=gen)
    full, _ = gaze_attention_reference(q, k, v, layout, config)
    from gazeattn.ops import region_descriptors

    desc = region_descriptors(k[:, :, : layout.length], layout)
    with torch.no_grad():
        step, _ = gaze_attention(q[:, :, -1:], k, v, layout, config, descriptors=desc)
    torch.testing.assert_close(step, full[:, :, -1:], **FP32)


def test_many_decode_steps_on_one_layout(decode_path):
    """The engine decodes step after step on one layout, whose per-step tables (the decode
    plan, the key tables and their growing capacity) are kept on it: every step equals the
    same step on a fresh layout, past the tables' first capacity."""
    seqs = [[3, Image(12, 12), 2, Video(2, 6, 6), 4], [1, Image(6, 6), 5]]
    kept = build_layout(seqs, padding_side="left", num_context_tokens=2)
    config = GazeConfig(top_k=2, num_context_tokens=2)
    steps = 2 * max(kept.length, 64) + 3 - kept.length  # at least one regrowth
    total = kept.length + steps
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, total, 16, generator=gen)
    k = torch.randn(2, 2, total, 16, generator=gen)
    v = torch.randn(2, 2, total, 16, generator=gen)
    for tk in range(kept.length + 1, total + 1, 7):
        fresh = build_layout(seqs, padding_side="left", num_context_tokens=2)
        args = (q[:, :, tk - 1 : tk], k[:, :, :tk], v[:, :, :tk])
        out, stats = gaze_decode(*args, kept, config, return_selection=True)
        want, want_stats = gaze_decode(*args, fresh, config, return_selection=True)
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        assert torch.equal(stats.attended, want_stats.attended)
        assert torch.equal(stats.selected, want_stats.selected)


def test_routing_only_sees_earlier_segments():
    layout = build_layout(
        [[2, Image(6, 6), 3, Image(6, 6), 2, Video(2, 6, 6), 2]], num_context_tokens=1
    )
    config = GazeConfig(top_k="all", num_context_tokens=1)
    q, k, v = _inputs(layout, 2, 1, dim=8)
    _, stats = gaze_attention_reference(q, k, v, layout, config, return_selection=True)
    last = layout.regions.last[0]
    pos = torch.arange(layout.length)
    ids = stats.selected[0, 0]  # [Tq, K]
    for i in range(layout.length):
        chosen = ids[i][ids[i] >= 0]
        assert (last[chosen] < pos[i]).all()
    # a text token between the images sees exactly the first image's regions
    between = layout.spans[0][1].frame_offsets[0] - 1
    assert (ids[between] >= 0).sum() == 1


def test_context_tokens_see_only_their_segment():
    layout = build_layout(
        [[3, Image(4, 4), 2, Image(4, 4), 2]], num_context_tokens=2, region_size=(1, 2, 2)
    )
    config = GazeConfig(top_k=1, num_context_tokens=2, region_size=(1, 2, 2))
    q, k, v = _inputs(layout, 2, 2, dim=8)
    out, _ = gaze_attention_reference(q, k, v, layout, config)
    span = layout.spans[0][1]
    own = set(range(span.frame_offsets[0], span.frame_offsets[0] + 16)) | set(
        span.context_offsets[0]
    )
    others = [j for j in range(layout.length) if j not in own]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, others] += 3.0
    v2[:, :, others] -= 5.0
    out2, _ = gaze_attention_reference(q, k2, v2, layout, config)
    ctx = list(span.context_offsets[0])
    torch.testing.assert_close(out2[:, :, ctx], out[:, :, ctx])
    assert not torch.allclose(out2[:, :, -1], out[:, :, -1])


def test_padding_queries_are_zero_and_padding_keys_ignored():
    layout = build_layout(
        [[2, Image(4, 4), 2], [1, Image(4, 4), 9]], region_size=(1, 2, 2), padding_side="left"
    )
    config = GazeConfig(top_k=2, region_size=(1, 2, 2))
    q, k, v = _inputs(layout, 2, 1, dim=8)
    out, _ = gaze_attention(q, k, v, layout, config)
    pads = int((layout.kinds[0] == 3).sum())
    assert pads > 0 and torch.equal(out[0, :, :pads], torch.zeros_like(out[0, :, :pads]))
    k2 = k.clone()
    k2[0, :, :pads] = 1e4
    out2, _ = gaze_attention(q, k2, v, layout, config)
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_follow_fp32(dtype):
    layout = build_layout([[3, Image(6, 6), 4]])
    config = GazeConfig(top_k="all")
    q, k, v = _inputs(layout, 4, 2, dim=16)
    ref, _ = gaze_attention(q, k, v, layout, config)
    out, _ = gaze_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, config)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_decode_follows_fp32(dtype, decode_path):
    """A decode step over a bf16 / fp16 cache (scores and softmax in fp32) on every path."""
    layout = build_layout([[3, Image(12, 12), 4]], num_context_tokens=2)
    config = GazeConfig(top_k=2, num_context_tokens=2)
    q, k, v = (x.to(dtype) for x in _inputs(layout, 4, 2, dim=16, seed=3))
    q = q[:, :, -1:]
    with torch.no_grad():
        ref, ref_stats = gaze_attention_reference(
            q.float(), k.float(), v.float(), layout, config, return_selection=True
        )
        out, stats = gaze_attention(q, k, v, layout, config, return_selection=True)
    assert out.dtype == dtype
    torch.testing.assert_close(stats.selected, ref_stats.selected)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_stats_match_the_worked_example():
    """DESIGN.md: 8 frames x 576, 20 regions of 36, 4 context tokens per frame -> 752 entries.

    The dense count has the same context tokens (a dense twin attends them too): 4608 + 32,
    so 16.2% of dense (DESIGN.md's 16.3% divides by the stock model's 4608, which has none)."""
    layout = build_layout([[10, Video(8, 24, 24), 5]], num_context_tokens=4)
    config = GazeConfig(top_k=20)
    q, k, v = _inputs(layout, 2, 1, dim=8, tq=1)
    with torch.no_grad():
        _, stats = gaze_attention(q, k, v, layout, config)
    assert stats.attended_mean() == 20 * 36 + 4 * 8
    assert stats.dense_mean() == 8 * 576 + 4 * 8
    assert abs(stats.savings() - (1 - 752 / 4640)) < 1e-9


def test_shape_errors():
    layout = build_layout([[3, Image(6, 6), 4]])
    q, k, v = _inputs(layout, 4, 2, dim=16)
    config = GazeConfig(top_k=1)
    with pytest.raises(ValueError, match="multiple"):
        gaze_attention(q[:, :3], k, v, layout, config)
    with pytest.raises(ValueError, match="sequences"):
        gaze_attention(
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v.expand(2, -1, -1, -1),
            layout,
            config,
        )
    with pytest.raises(ValueError, match="keys"):
        gaze_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], layout, config)
    with pytest.raises(ValueError, match="differ"):
        gaze_attention(q, k, v[..., :8], layout, config)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layout = build_layout([[3, Image(6, 6), 4]])
    q, k, v = _inputs(layout, 2, 2, dim=16)
    with pytest.raises(RuntimeError, match="CUDA"):
        gaze_attention(q, k, v, layout, GazeConfig(top_k=1, backend="triton"))


def test_a_prefill_in_chunks_equals_one_prefill():
    """Chunk boundaries anywhere (inside a region, a frame, a run of context tokens, the text
    between media): each chunk's queries on the keys so far and ``layout.head`` of them give
    the rows of one prefill, routing included (a region not yet complete is never seen)."""
    seqs = [[3, Image(12, 12), 2, Video(2, 6, 6), 4]]
    layout = build_layout(seqs, num_context_tokens=2)
    config = GazeConfig(top_k=2, num_context_tokens=2)
    q, k, v = _inputs(layout, 4, 2, dim=16)
    want, want_stats = gaze_attention_reference(q, k, v, layout, config, return_selection=True)
    for size in (1, 5, 13):
        for start in range(0, layout.length, size):
            end = min(layout.length, start + size)
            part = layout.head(end)
            args = (q[:, :, start:end], k[:, :, :end], v[:, :, :end])
            out, stats = gaze_attention(*args, part, config, return_selection=True)
            torch.testing.assert_close(out, want[:, :, start:end], atol=1e-5, rtol=1e-5)
            assert torch.equal(stats.attended, want_stats.attended[:, :, start:end])
            picked = want_stats.selected[:, :, start:end, : stats.selected.shape[-1]]
            assert torch.equal(stats.selected, picked)
    with pytest.raises(ValueError, match="head"):
        layout.head(layout.length + 1)
