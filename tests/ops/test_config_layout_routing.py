"""GazeConfig validation, layout construction and errors, routing helpers, the Top-K schedule."""

from __future__ import annotations

import pytest
import torch

from gazeattn.ops import (
    GazeConfig,
    GazeLayout,
    Image,
    TokenKind,
    Video,
    VisualSpan,
    budgets,
    build_layout,
    select_regions,
    top_k_schedule,
)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "exactly one"),
        (dict(top_k=3, keep_ratio=0.5), "exactly one"),
        (dict(top_k=0), "top_k"),
        (dict(top_k="some"), "top_k"),
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(top_k=1, region_size=(1, 0, 6)), "region_size"),
        (dict(top_k=1, region_size=(6, 6)), "region_size"),
        (dict(top_k=1, num_context_tokens=-1), "num_context_tokens"),
        (dict(top_k=1, routing="token"), "routing"),
        (dict(top_k=1, backend="cuda"), "backend"),
        (dict(top_k=1, random_routing_seed=-1), "random_routing_seed"),
        (dict(top_k=1, random_routing_seed=1.5), "random_routing_seed"),
    ],
    ids=lambda x: str(x) if isinstance(x, str) else None,
)
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GazeConfig(**kwargs)


def test_config_round_trip_and_budget():
    config = GazeConfig(keep_ratio=0.07, region_size=[2, 6, 6], routing="query_head")
    assert config.region_size == (2, 6, 6) and config.region_tokens == 72
    assert GazeConfig.from_dict(config.to_dict()) == config
    # 0.07 * 100 is 7.000000000000001 in floating point: still 7 regions
    assert config.budget(100) == 7
    assert config.budget(0) == 0 and config.budget(3) == 1
    assert GazeConfig(top_k=20).budget(5) == 5
    assert GazeConfig(top_k="all").budget(17) == 17


@pytest.mark.parametrize(
    "config", [GazeConfig(keep_ratio=0.07), GazeConfig(keep_ratio=0.33), GazeConfig(top_k=4)]
)
def test_vector_budgets_equal_scalar(config):
    counts = torch.arange(0, 300)
    assert budgets(config, counts).tolist() == [config.budget(n) for n in counts.tolist()]


def test_layout_regions_of_ragged_grid():
    layout = build_layout([[3, Image(7, 9), 2]], num_context_tokens=2)
    table = layout.regions
    # 7 x 9 in regions of 6 x 6: 2 x 2 regions, of 36, 18, 6 and 3 tokens
    assert table.count.tolist() == [4]
    assert table.size[0].tolist() == [36, 18, 6, 3]
    assert table.box[0, 3].tolist() == [0, 0, 1, 6, 7, 6, 9]
    assert (layout.kinds[0, 3 : 3 + 63] == TokenKind.VISUAL).all()
    assert (layout.kinds[0, 66:68] == TokenKind.CONTEXT).all()
    # every visual token is in exactly the region the table lists it in
    for r in range(4):
        tok = table.tokens[0, r]
        tok = tok[tok >= 0]
        assert (layout.region[0, tok] == r).all()
    assert int((layout.region[0] >= 0).sum()) == 63


def test_layout_video_time_grouping():
    layout = build_layout([[1, Video(3, 6, 6), 1]], region_size=(2, 6, 6), num_context_tokens=1)
    # frames {0,1} form one region of 72 tokens, frame 2 one of 36
    assert layout.regions.size[0].tolist() == [72, 36]
    assert layout.segment[0].max() == 2
    span = layout.spans[0][0]
    assert span.is_video and span.frame_offsets == (1, 38, 75)
    assert layout.regions.last[0].tolist() == [38 + 35, 75 + 35]


@pytest.mark.parametrize("side", ["left", "right"])
def test_layout_padding(side):
    layout = build_layout(
        [[2, Image(2, 2), 1], [1]], region_size=(1, 2, 2), num_context_tokens=1, padding_side=side
    )
    assert layout.length == 8
    pads = (layout.kinds[1] == TokenKind.PAD).nonzero().flatten().tolist()
    assert pads == ([0, 1, 2, 3, 4, 5, 6] if side == "left" else [1, 2, 3, 4, 5, 6, 7])
    assert layout.regions.count.tolist() == [1, 0]


def test_layout_errors():
    with pytest.raises(ValueError, match="frames in the grid"):
        VisualSpan(grid=(2, 2, 2), frame_offsets=(0,), context_offsets=((), ()))
    with pytest.raises(ValueError, match="inside frame"):
        VisualSpan(grid=(2, 2, 2), frame_offsets=(0, 2), context_offsets=((), ()))
    with pytest.raises(ValueError, match="precedes"):
        VisualSpan(grid=(1, 2, 2), frame_offsets=(3,), context_offsets=((4,),))
    span = VisualSpan(grid=(1, 2, 2), frame_offsets=(2,), context_offsets=((6,),))
    with pytest.raises(ValueError, match="outside"):
        GazeLayout.from_spans(5, [[span]], region_size=(1, 2, 2))
    with pytest.raises(ValueError, match="overlaps"):
        GazeLayout.from_spans(12, [[span, span]], region_size=(1, 2, 2))
    with pytest.raises(ValueError, match="padding position"):
        GazeLayout.from_spans(
            8, [[span]], region_size=(1, 2, 2), pad_mask=torch.ones(1, 8, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="shorter"):
        build_layout([[3, Image(2, 2)]], length=4)
    with pytest.raises(ValueError, match="padding_side"):
        build_layout([[3]], padding_side="middle")
    with pytest.raises(TypeError, match="part"):
        build_layout([[3, "image"]])


def test_select_regions_breaks_ties_to_lower_id():
    scores = torch.tensor([[[[1.0, 2.0, 2.0, 2.0, 0.5]]]])  # [B=1, H=1, Tq=1, R=5]
    visible = torch.tensor([[[True, True, False, True, True]]])
    ids, chosen = select_regions(scores, visible, torch.tensor([[2]]))
    assert ids.flatten().tolist() == [1, 3]
    assert chosen.flatten().tolist() == [False, True, False, True, False]
    ids, chosen = select_regions(scores, visible, torch.tensor([[0]]))
    assert ids.numel() == 0 and not chosen.any()


@pytest.mark.parametrize("k_value", [1, 2, 3])
def test_what_a_plan_knows_selects_the_same_regions(k_value):
    """A decode plan's shortcuts (every region visible: no mask; K's extremes given) select
    what the general path selects, ties included."""
    gen = torch.Generator().manual_seed(k_value)
    scores = torch.randint(0, 3, (3, 2, 1, 6), generator=gen).float()  # many ties
    visible = torch.ones(3, 1, 6, dtype=torch.bool)
    k = torch.full((3, 1), k_value)
    want = select_regions(scores, visible, k)
    for got in (select_regions(scores, None, k, k_value, k_value), select_regions(scores, None, k)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_top_k_schedule(kind):
    ks = [
        top_k_schedule(s, total_regions=128, target=20, warmup_steps=10, kind=kind)
        for s in range(15)
    ]
    assert ks[0] == 128
    assert ks[10:] == [20] * 5
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    assert 20 < ks[5] < 128
    if kind == "linear":
        assert ks[5] == 74
    assert top_k_schedule(0, total_regions=128, target=20, warmup_steps=0) == 20
    with pytest.raises(ValueError, match="kind"):
        top_k_schedule(0, total_regions=8, target=2, warmup_steps=4, kind="step")


def test_keep_ratio_schedule():
    from gazeattn.ops import keep_ratio_schedule

    ratios = [keep_ratio_schedule(s, target=0.2, warmup_steps=4) for s in range(6)]
    assert ratios == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    assert keep_ratio_schedule(2, target=0.2, warmup_steps=4, kind="cosine") == pytest.approx(0.6)


def _random_route(seed: int, q: torch.Tensor, layout, top_k: int = 1):
    from gazeattn.ops.routing import route

    config = GazeConfig(region_size=(1, 2, 2), top_k=top_k, num_context_tokens=1,
                        random_routing_seed=seed)  # fmt: skip
    k = torch.randn(
        layout.batch_size, 2, layout.length, 8, generator=torch.Generator().manual_seed(1)
    )
    return route(q, k, layout, config)


def test_random_routing_ignores_the_queries_and_the_batch_but_not_the_seed():
    """The ablation's picks are a function of (seed, head, query position, region): the same
    for any query values and any batch companions, different for another seed, and spread
    over the regions (every one picked by some query)."""
    layout = build_layout([[2, Image(6, 6), 40]], region_size=(1, 2, 2), num_context_tokens=1)
    gen = torch.Generator().manual_seed(0)
    q1, q2 = (torch.randn(1, 4, layout.length, 8, generator=gen) for _ in range(2))
    a, b = _random_route(7, q1, layout), _random_route(7, q2, layout)
    assert torch.equal(a.ids, b.ids)
    other = _random_route(8, q1, layout)
    assert not torch.equal(a.ids, other.ids)
    text = (a.q_kind[0] == TokenKind.TEXT) & a.visible[0].any(-1)
    picked = a.ids[0][:, text].flatten()
    assert set(picked.tolist()) == set(range(9))
    # in a batch with another sequence the first row routes as it did alone
    pair = build_layout([[2, Image(6, 6), 40], [5, Image(6, 6), 37]], region_size=(1, 2, 2),
                        num_context_tokens=1)  # fmt: skip
    batched = _random_route(7, torch.randn(2, 4, pair.length, 8, generator=gen), pair)
    assert torch.equal(batched.ids[:1], a.ids)
