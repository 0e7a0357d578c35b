"""The inference paths against the exact-mask reference: prefill without a [T, T] mask, the
maskless dense decode, the strided decode gather, and the layout of a changing batch."""

from __future__ import annotations

import pytest
import torch

from gazeattn.ops import GazeConfig, Image, TokenKind, Video, build_layout, gaze_attention
from gazeattn.ops.gaze.dense import dense_decode
from gazeattn.ops.gaze.naive import gaze_attention_reference
from gazeattn.ops.gaze.prefill import gaze_prefill, prefill_spans
from gazeattn.ops.layout import compact, stack_rows
from tests.ops.kernel_paths import use_cpu_kernel

FP32 = dict(atol=2e-5, rtol=2e-5)

# (id, sequences, padding side, region_size, n_ctx)
CASES = [
    ("image-then-text", [[3, Image(6, 6), 5]], "right", (1, 3, 3), 2),
    ("two-images", [[3, Image(6, 6), 2, Image(5, 7), 4]], "right", (1, 3, 3), 2),
    ("video", [[4, Video(3, 4, 4), 6]], "right", (1, 2, 2), 2),
    ("text-only", [[9]], "right", (1, 2, 2), 2),
    ("left-pad", [[2, Image(4, 4), 6], [5, Image(4, 4), 1, Image(3, 5), 2]], "left", (1, 2, 2), 1),
    ("right-pad", [[2, Image(4, 4), 6], [5, Video(2, 3, 3), 2], [7]], "right", (1, 2, 2), 1),
]
GQA = [(4, 4), (4, 1), (6, 2)]


def _inputs(b, hq, hkv, t, dim=8, seed=0, tq=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t if tq is None else tq, dim, generator=gen)
    k = torch.randn(b, hkv, t, dim, generator=gen)
    v = torch.randn(b, hkv, t, dim, generator=gen)
    return q, k, v


def _layout(seqs, side, region, n_ctx):
    return build_layout(seqs, region_size=region, num_context_tokens=n_ctx, padding_side=side)


def _valid_queries(layout):
    return (layout.kinds != TokenKind.PAD)[:, None, :, None]


@pytest.mark.parametrize("dense", [False, True], ids=["gaze", "dense-twin"])
@pytest.mark.parametrize("routing", ["kv_head", "query_head", "random"])
@pytest.mark.parametrize("hq,hkv", GQA, ids=[f"gqa{a}/{b}" for a, b in GQA])
@pytest.mark.parametrize("case_id,seqs,side,region,n_ctx", CASES, ids=[c[0] for c in CASES])
def test_prefill_matches_reference(case_id, seqs, side, region, n_ctx, hq, hkv, routing, dense):
    layout = _layout(seqs, side, region, n_ctx)
    # "random": the evaluation ablation's pseudo-random scores, through the same paths
    how = {"routing": "kv_head", "random_routing_seed": 3} if routing == "random" else {}
    config = GazeConfig(
        region_size=region, keep_ratio=0.4, num_context_tokens=n_ctx, **{"routing": routing, **how}
    )
    q, k, v = _inputs(layout.batch_size, hq, hkv, layout.length, seed=hq + hkv)
    spans = prefill_spans(layout, layout.length)
    assert spans is not None
    out, stats = gaze_prefill(q, k, v, layout, config, spans, dense=dense, return_selection=True)
    ref, ref_stats = gaze_attention_reference(
        q, k, v, layout, config, dense=dense, return_selection=True
    )
    valid = _valid_queries(layout)
    torch.testing.assert_close(out * valid, ref * valid, **FP32)
    torch.testing.assert_close(stats.attended, ref_stats.attended.float())
    torch.testing.assert_close(stats.dense, ref_stats.dense.float())
    assert torch.equal(stats.routed, ref_stats.routed)
    if not dense:
        k_ref = ref_stats.selected.shape[-1]
        routed = stats.routed[:, None, :, None]
        assert torch.equal(
            torch.where(routed, stats.selected[..., :k_ref], -1),
            torch.where(routed, ref_stats.selected, -1),
        )


def test_gaze_attention_takes_the_prefill_path_without_grad(monkeypatch):
    """No [B, H, T, T] mask under no_grad: gaze_mask only ever sees the recomputed queries."""
    import gazeattn.ops.gaze.naive as naive
    import gazeattn.ops.gaze.prefill as prefill

    layout = _layout([[4, Video(3, 4, 4), 6]], "right", (1, 2, 2), 2)
    config = GazeConfig(region_size=(1, 2, 2), keep_ratio=0.3, num_context_tokens=2)
    q, k, v = _inputs(1, 4, 2, layout.length)
    shapes = []
    original = naive.gaze_mask

    def spy(layout, q_pos, chosen, tk):
        if not torch.is_grad_enabled():
            shapes.append(q_pos.numel())
        return original(layout, q_pos, chosen, tk)

    monkeypatch.setattr(prefill, "gaze_mask", spy)
    monkeypatch.setattr(naive, "gaze_mask", spy)
    for backend in ("reference", "dense"):
        with torch.no_grad():
            out, _ = gaze_attention(
                q, k, v, layout, GazeConfig(**{**config.to_dict(), "backend": backend})
            )
        ref, _ = gaze_attention_reference(q, k, v, layout, config, dense=backend == "dense")
        torch.testing.assert_close(out, ref, **FP32)
    # 3 frames x 2 context tokens + 6 text tokens after the video, twice
    assert shapes == [12, 12]


@pytest.mark.parametrize("hq,hkv", GQA, ids=[f"gqa{a}/{b}" for a, b in GQA])
@pytest.mark.parametrize("case_id,seqs,side,region,n_ctx", CASES, ids=[c[0] for c in CASES])
def test_dense_decode_matches_reference(case_id, seqs, side, region, n_ctx, hq, hkv):
    layout = _layout(seqs, side, region, n_ctx)
    config = GazeConfig(region_size=region, top_k="all", num_context_tokens=n_ctx, backend="dense")
    extra = 3
    q, k, v = _inputs(layout.batch_size, hq, hkv, layout.length + extra, seed=5, tq=1)
    out, stats = dense_decode(q, k, v, layout)
    ref, ref_stats = gaze_attention_reference(q, k, v, layout, config, dense=True)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(stats.attended, ref_stats.attended.float())
    torch.testing.assert_close(stats.dense, ref_stats.dense.float())
    with torch.no_grad():
        routed, _ = gaze_attention(q, k, v, layout, config)
    torch.testing.assert_close(routed, ref, **FP32)


@pytest.mark.parametrize("chunk", [16, 2], ids=["together", "in-chunks"])
@pytest.mark.parametrize("routing", ["kv_head", "query_head", "random"])
@pytest.mark.parametrize("hq,hkv", GQA, ids=[f"gqa{a}/{b}" for a, b in GQA])
@pytest.mark.parametrize("case_id,seqs,side,region,n_ctx", CASES, ids=[c[0] for c in CASES])
def test_text_after_the_layout_matches_reference(
    case_id, seqs, side, region, n_ctx, hq, hkv, routing, chunk, gather_path
):
    """Several text queries past the layout (a prompt's text after its cached visual prefix)
    take the decode path together, or a few at a time (``AFTER_LAYOUT_QUERIES``): the
    reference's output, counts and selection."""
    layout = _layout(seqs, side, region, n_ctx)
    how = {"routing": "kv_head", "random_routing_seed": 3} if routing == "random" else {}
    config = GazeConfig(
        region_size=region, keep_ratio=0.4, num_context_tokens=n_ctx, **{"routing": routing, **how}
    )
    tq = 5
    q, k, v = _inputs(layout.batch_size, hq, hkv, layout.length + tq, seed=7, tq=tq)
    from gazeattn.ops.gaze import decode

    calls = []
    original = decode.gaze_decode

    def spy(q, *args, **kwargs):
        calls.append(q.shape[2])
        return original(q, *args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "gaze_decode", spy)
        patch.setattr(decode, "AFTER_LAYOUT_QUERIES", chunk)
        out, stats = gaze_attention(q, k, v, layout, config, return_selection=True)
    ref, ref_stats = gaze_attention_reference(q, k, v, layout, config, return_selection=True)
    chunks = [tq] if chunk >= tq else [2, 2, 1]
    assert calls == (chunks if layout.max_regions else [])
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(stats.attended, ref_stats.attended.float())
    torch.testing.assert_close(stats.dense.float(), ref_stats.dense.float())
    assert torch.equal(stats.routed, ref_stats.routed)
    if layout.max_regions:
        k_ref = ref_stats.selected.shape[-1]
        assert torch.equal(stats.selected[..., :k_ref], ref_stats.selected)


@pytest.mark.parametrize(
    "seqs,region,width",
    [
        ([[2, Image(4, 4), 6]], (1, 2, 2), 2),  # 2 x 2 regions of a 4-wide grid: 2 runs of 2
        ([[3, Image(6, 6), 5]], (1, 3, 3), 3),
        ([[4, Video(3, 4, 4), 6]], (2, 2, 2), 2),  # a run never crosses a frame
        ([[3, Image(5, 7), 4]], (1, 3, 3), 1),  # the last column's regions are 1 token wide
        ([[2, Image(4, 4), 6]], (1, 1, 4), 4),  # one row of 4: one run
    ],
)
def test_region_runs_rebuild_every_region(seqs, region, width):
    from gazeattn.ops.gaze.decode import region_runs

    layout = _layout(seqs, "right", region, 1)
    starts, got = region_runs(layout, "cpu")
    assert got == width
    tokens = layout.regions.tokens
    rebuilt = (starts[..., None] + torch.arange(width)).flatten(-2)
    padded = starts.repeat_interleave(width, dim=-1) < 0
    assert torch.equal(torch.where(padded, -1, rebuilt), tokens)


@pytest.mark.parametrize("keys", ["masked", "gathered"])
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_decode_reads_a_strided_cache_view(backend, keys, gather_path, monkeypatch):
    """k/v as a view into a larger buffer (rows and positions beyond them) decode as contiguous."""
    layout = _layout(
        [[2, Image(4, 4), 6], [5, Image(4, 4), 1, Image(3, 5), 2]], "left", (1, 2, 2), 1
    )
    config = GazeConfig(
        region_size=(1, 2, 2), keep_ratio=0.4, num_context_tokens=1, backend=backend
    )
    t = layout.length + 4
    q, k, v = _inputs(2, 4, 2, t, seed=2, tq=1)
    big_k = torch.randn(5, 2, t + 9, 8)
    big_v = torch.randn(5, 2, t + 9, 8)
    big_k[1:3, :, 3 : 3 + t] = k
    big_v[1:3, :, 3 : 3 + t] = v
    view_k, view_v = big_k[1:3, :, 3 : 3 + t], big_v[1:3, :, 3 : 3 + t]
    assert not view_k.is_contiguous()
    from gazeattn.ops.gaze import decode

    monkeypatch.setattr(decode, "MASKED_DECODE_KEYS", 10**9 if keys == "masked" else 0)
    with torch.no_grad():
        out, _ = gaze_attention(q, view_k, view_v, layout, config)
        expect, _ = gaze_attention(q, k, v, layout, config)
    torch.testing.assert_close(out, expect, **FP32)


@pytest.mark.parametrize("total_extra", [0, 1, 7])
def test_dense_index_past_the_layout_equals_compaction(total_extra):
    layout = _layout(
        [[2, Image(4, 4), 6], [5, Image(4, 4), 1, Image(3, 5), 2], [3]], "left", (1, 2, 2), 1
    )
    total = layout.length + total_extra
    kinds, _, _ = layout.padded(total)
    index, count = compact((kinds == TokenKind.TEXT) | (kinds == TokenKind.CONTEXT))
    valid = torch.arange(index.shape[-1]) < count[:, None]
    got = layout.dense_index(total)
    assert torch.equal(got[1], valid) and torch.equal(got[0], index)


def test_derived_entries_do_not_grow_with_decode_steps():
    layout = _layout([[2, Image(4, 4), 6]], "right", (1, 2, 2), 1)
    for extra in range(1, 50):
        layout.padded(layout.length + extra)
        layout.dense_index(layout.length + extra)
    assert len(layout._derived) <= 4


def test_stack_rows_equals_a_left_padded_batch():
    """Single-sequence layouts moved right by their left padding = the batch build_layout lays out."""
    seqs = [[2, Image(4, 4), 6], [5, Image(4, 4), 1, Video(2, 3, 3), 2], [3]]
    kw = dict(region_size=(1, 2, 2), num_context_tokens=1)
    batch = build_layout(seqs, padding_side="left", **kw)
    rows = [build_layout([s], **kw) for s in seqs]
    offsets = [batch.length - r.length for r in rows]
    stacked = stack_rows(rows, offsets, batch.length)
    for name in ("kinds", "segment", "region"):
        assert torch.equal(getattr(stacked, name), getattr(batch, name)), name
    for name in ("tokens", "size", "last", "box", "count"):
        assert torch.equal(getattr(stacked.regions, name), getattr(batch.regions, name)), name
    assert stacked.spans == batch.spans
    # longer than the prompts: the positions after each row are text (decoded tokens)
    longer = stack_rows(rows, [o + 1 for o in offsets], batch.length + 4)
    assert (longer.kinds[:, -3:] == TokenKind.TEXT).all()
    assert torch.equal(longer.kinds[:, 1 : batch.length + 1], batch.kinds)
    with pytest.raises(ValueError, match="exceeds"):
        stack_rows(rows, offsets, batch.length - 1)


KERNEL_STEPS = {
    # every region scores the same (equal keys): the ranks are the region ids
    "ties": dict(seqs=[[2, Image(4, 4), 6]], config=dict(top_k=3), equal_keys=True),
    # a text-only row (no region, budget 0), rows with other region counts (padding regions
    # are invisible) and other budgets
    "mixed-batch": dict(
        seqs=[[2, Image(4, 4), 6], [5, Image(4, 4), 1, Image(3, 5), 2], [7]],
        config=dict(keep_ratio=0.4),
    ),
    "query-head": dict(seqs=[[3, Video(2, 4, 4), 2]], config=dict(top_k=2, routing="query_head")),
    "random": dict(seqs=[[3, Video(2, 4, 4), 2]], config=dict(top_k=2, random_routing_seed=9)),
    "bf16-cache": dict(seqs=[[3, Video(2, 4, 4), 2]], config=dict(top_k=2), dtype=torch.bfloat16),
}


@pytest.mark.parametrize("past", [0, 5], ids=["last-prompt-token", "past-the-layout"])
@pytest.mark.parametrize("case", list(KERNEL_STEPS))
def test_the_kernel_decode_step_equals_the_torch_path(case, past, monkeypatch):
    """The kernel's Top-K ranks as ``select_regions`` (ties to the lower id), attends the same
    keys and counts the same entries as the torch ops' gathered path."""
    from gazeattn.ops.gaze import decode

    spec = KERNEL_STEPS[case]
    layout = _layout(spec["seqs"], "left", (1, 2, 2), 1)
    config = GazeConfig(region_size=(1, 2, 2), num_context_tokens=1, **spec["config"])
    dtype = spec.get("dtype", torch.float32)
    q, k, v = _inputs(layout.batch_size, 4, 2, layout.length + past, seed=11, tq=1)
    if spec.get("equal_keys"):
        k = torch.ones_like(k)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    monkeypatch.setattr(decode, "MASKED_DECODE_KEYS", 0)
    runs = {}
    for path in ("torch", "kernel"):
        use_cpu_kernel(monkeypatch, path == "kernel")
        calls = []
        monkeypatch.setattr(decode, "_kernel_decode", _counted(decode._kernel_decode, calls))
        with torch.no_grad():
            runs[path] = decode.gaze_decode(q, k, v, layout, config, return_selection=True)
        assert len(calls) == (path == "kernel")
        monkeypatch.undo()
    (want, want_stats), (got, got_stats) = runs["torch"], runs["kernel"]
    assert torch.equal(got_stats.selected, want_stats.selected)
    assert torch.equal(got_stats.attended, want_stats.attended)
    assert got.dtype == dtype
    tolerance = FP32 if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tolerance)
    if spec.get("equal_keys"):
        assert (got_stats.selected == torch.arange(3)).all()


def _counted(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


def test_a_cpu_kernel_that_cannot_be_built_leaves_the_torch_path(monkeypatch, caplog):
    """No compiler (the builder raises): one warning, then the torch ops decode, as exactly."""
    import torch.utils.cpp_extension

    from gazeattn.ops.gaze import cpu_kernel as kernel_module
    from gazeattn.ops.gaze import decode

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no g++ here")

    layout = _layout([[2, Image(4, 4), 6]], "right", (1, 2, 2), 1)
    config = GazeConfig(region_size=(1, 2, 2), keep_ratio=0.5, num_context_tokens=1)
    q, k, v = _inputs(1, 4, 2, layout.length + 2, seed=4, tq=1)
    monkeypatch.setattr(decode, "MASKED_DECODE_KEYS", 0)
    monkeypatch.setattr(kernel_module, "_built", [])
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv(kernel_module.SWITCH, "1")
    with caplog.at_level("WARNING", logger=kernel_module.__name__), torch.no_grad():
        assert kernel_module.cpu_kernel() is None
        out, _ = gaze_attention(q, k, v, layout, config)
        kernel_module.cpu_kernel()
    assert [r.message for r in caplog.records if "no g++ here" in r.message] != []
    assert len(caplog.records) == 1  # warned once, not at every call
    ref, _ = gaze_attention_reference(q, k, v, layout, config)
    torch.testing.assert_close(out, ref, **FP32)


def test_a_gathered_decode_that_records_gradients_takes_the_torch_path(gather_path, monkeypatch):
    """The CPU kernel has no backward: with gradients on, the gathered decode still has them."""
    from gazeattn.ops.gaze import decode

    layout = _layout([[2, Image(4, 4), 6]], "right", (1, 2, 2), 1)
    config = GazeConfig(region_size=(1, 2, 2), keep_ratio=0.5, num_context_tokens=1)
    q, k, v = _inputs(1, 4, 2, layout.length + 2, seed=5, tq=1)
    monkeypatch.setattr(decode, "MASKED_DECODE_KEYS", 0)
    q.requires_grad_(True)
    out, _ = decode.gaze_decode(q, k, v, layout, config)
    out.sum().backward()
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


def _long_gathered_attention(kernel):
    """A call of the kernel's loop for several queries that runs a while (4M key reads)."""
    rows, dim, tq, keys = 8192, 64, 1024, 4096
    table = torch.randn(rows, dim)
    q = torch.randn(1, 1, tq, 4, dim)
    dense = torch.arange(keys).view(1, 1, keys)
    dense_ok = torch.ones(1, 1, keys, dtype=torch.bool)
    runs = torch.zeros(1, 1, tq, 1, dtype=torch.int64)
    runs_ok = torch.zeros(1, 1, tq, 1, dtype=torch.bool)
    return lambda: kernel.gathered_attention(
        q, table, table, dense, dense_ok, runs, runs_ok, 1, 0.125
    )


def _long_decode_step(kernel):
    """A decode step that runs a while: 64 rows, each attending one key 65536 times."""
    batch, dim, keys = 64, 64, 65536
    q = torch.randn(batch, 4, dim)
    k = torch.randn(batch, 1, 8, dim)
    scores = torch.zeros(batch, 1, 1)
    budget = torch.zeros(batch, dtype=torch.int64)
    dense = torch.zeros(batch, keys, dtype=torch.int64)
    dense_ok = torch.ones(batch, keys, dtype=torch.bool)
    starts = torch.full((batch, 1, 1), -1, dtype=torch.int64)
    sizes, context = torch.zeros(batch, 1), torch.zeros(batch)
    return lambda: kernel.decode_step(
        q, k, k, scores, budget, 0, dense, dense_ok, 8, 8, starts, 1, sizes, context, 0.125
    )


@pytest.mark.parametrize("entry", [_long_gathered_attention, _long_decode_step])
def test_the_cpu_kernel_runs_without_the_gil(entry, monkeypatch):
    """While one thread is in the kernel, another runs Python (a serving replica's event loop
    relays tokens while its scheduler thread decodes): the main thread's timestamps have no
    gap as long as the call, for each of the kernel's entry points."""
    import threading
    import time

    use_cpu_kernel(monkeypatch, True)
    from gazeattn.ops.gaze.cpu_kernel import cpu_kernel

    run = entry(cpu_kernel())
    window = {}

    def call():
        window["start"] = time.perf_counter()
        run()
        window["end"] = time.perf_counter()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel's OpenMP team leaves a core to this thread
    try:
        worker = threading.Thread(target=call)
        stamps = []
        worker.start()
        while worker.is_alive():
            stamps.append(time.perf_counter())
        worker.join()
    finally:
        torch.set_num_threads(threads)
    start, end = window["start"], window["end"]
    inside = [start, *(t for t in stamps if start < t < end), end]
    longest = max(b - a for a, b in zip(inside, inside[1:], strict=False))
    # holding the GIL, the call would leave one gap as long as itself
    assert longest < 0.5 * (end - start), (longest, end - start)
