"""Metrics: answer matching, entries and FLOPs, routing hit rate on hand-built cases."""

import math

import pytest

from evaluation import metrics
from evaluation.runner import EvalConfig, SampleResult, evaluate_samples, summarise


@pytest.mark.parametrize(
    "prediction, answer, correct",
    [
        ("Red.", "red", True),
        ("the red", "red", True),
        ("top centre", "top center", True),
        ("red square", "red", False),
        ("", "red", False),
    ],
)
def test_exact_match(prediction, answer, correct):
    assert metrics.exact_match(prediction, answer) is correct


@pytest.mark.parametrize(
    "prediction, correct",
    [("B", True), ("(B)", True), ("B. blue", True), ("blue", True), ("A", False), ("C)", False),
     ("Blue is it", False)],
)  # fmt: skip
def test_choice_letter(prediction, correct):
    options = ["red", "blue", "green"]
    assert metrics.is_correct(prediction, "B", options) is correct
    assert metrics.is_correct(prediction, "blue", options) is correct


def test_flops_ratio():
    # 100 prompt keys of which 60 visual, 1 token: gaze reads 40 text + 10 visual + 4 descriptors
    ratio = metrics.attention_flops_ratio(
        prompt_tokens=100, completion_tokens=1, attended_mean=10, dense_mean=60, regions=4
    )
    assert ratio == pytest.approx(54 / 100)
    dense = metrics.attention_flops_ratio(
        prompt_tokens=100, completion_tokens=3, attended_mean=60, dense_mean=60, regions=4
    )
    assert dense == 1.0


def test_target_in_grid_maps_each_axis():
    # a 192 x 96 image on a 12 x 12 grid: x scales by 12/192, y by 12/96
    target = metrics.target_in_grid([100, 10, 150, 40], (192, 96), (1, 12, 12))
    assert (target.h0, target.h1, target.w0, target.w1) == (1, 5, 6, 10)
    with pytest.raises(ValueError, match="not inside"):
        metrics.target_in_grid([100, 10, 200, 40], (192, 96), (1, 12, 12))


def _result(routing, hits, baseline, tokens):
    return SampleResult(
        id="x", prediction="", answer="", correct=False, prompt_tokens=10,
        completion_tokens=tokens, attended_mean=1, dense_mean=2, flops_ratio=0.5,
        hits={0: hits}, random_hit={0: baseline}, routing={0: routing},
    )  # fmt: skip


def test_routing_hit_rate_hand_built_image():
    """Known answer: the target lies in the top-right region only; 1 of 3 tokens routes there."""
    target = metrics.target_in_grid([100, 10, 150, 40], (192, 96), (1, 12, 12))
    top_left, top_right = [0, 0, 1, 0, 6, 0, 6], [0, 0, 1, 0, 6, 6, 12]
    bottom_right = [0, 0, 1, 6, 12, 6, 12]
    routing = [
        [{"box": top_right, "heads": 2}],
        [{"box": top_left, "heads": 2}],
        [{"box": bottom_right, "heads": 1}, {"box": top_left, "heads": 1}],
    ]
    hits = metrics.token_hits(routing, target)
    assert hits == [True, False, False]
    grids = [[1, 12, 12]]
    assert metrics.region_count(grids, (1, 6, 6)) == 4
    assert metrics.target_regions(grids, (1, 6, 6), target) == 1
    # two routing heads each pick 1 of 4 regions: P(hit) = 1 - (3/4)^2
    baseline = metrics.random_hit_probability(4, 1, 1, 2)
    assert baseline == pytest.approx(1 - 0.75**2)
    summary = summarise([_result(routing, hits, baseline, 3)], [0])
    assert summary["eval/routing_hit_rate/layer_0"] == pytest.approx(1 / 3)
    assert summary["eval/routing_hit_rate_random/layer_0"] == pytest.approx(0.4375)


def test_routing_hit_rate_video_needs_the_target_frame():
    target = metrics.target_in_grid([10, 10, 40, 40], (96, 96), (2, 12, 12), frame=1)
    same_place_wrong_frame = {"box": [0, 0, 1, 0, 6, 0, 6], "heads": 1}
    same_place_right_frame = {"box": [0, 1, 2, 0, 6, 0, 6], "heads": 1}
    other_span = {"box": [1, 1, 2, 0, 6, 0, 6], "heads": 1}
    routing = [[same_place_wrong_frame], [same_place_right_frame], [other_span]]
    assert metrics.token_hits(routing, target) == [False, True, False]
    assert metrics.target_regions([[2, 12, 12]], (1, 6, 6), target) == 1


def test_random_baseline_edges():
    assert metrics.random_hit_probability(8, 2, 8, 1) == 1.0
    assert metrics.random_hit_probability(8, 0, 3, 2) == 0.0
    assert metrics.random_hit_probability(8, 2, 1, 1) == pytest.approx(2 / 8)
    assert metrics.random_hit_probability(8, 2, 2, 1) == pytest.approx(
        1 - math.comb(6, 2) / math.comb(8, 2)
    )


def test_all_regions_routed_hit_every_target(tiny, samples):
    """With every region routed, every answer token overlaps its target (a real model run)."""
    model, processor = tiny
    report = evaluate_samples(model, processor, samples, EvalConfig(top_k=10**6, max_new_tokens=2))
    m = report.metrics
    assert report.routing_layers == [0, 1]
    for layer in (0, 1):
        assert m[f"eval/routing_hit_rate/layer_{layer}"] == 1.0
        assert m[f"eval/routing_hit_rate_random/layer_{layer}"] == 1.0
    assert m["eval/routing_samples"] == len(samples)


def test_budget_changes_entries_and_dense_reads_everything(tiny, samples):
    model, processor = tiny
    small = evaluate_samples(model, processor, samples, EvalConfig(top_k=1, max_new_tokens=2))
    dense = evaluate_samples(model, processor, samples, EvalConfig(attn="dense", max_new_tokens=2))
    s, d = small.metrics, dense.metrics
    assert s["eval/dense_entries_per_token"] == d["eval/dense_entries_per_token"]
    assert s["eval/visual_entries_per_token"] < 0.5 * s["eval/dense_entries_per_token"]
    assert s["eval/kv_savings_pct"] > 50
    assert s["eval/attention_flops_ratio"] < 1.0
    assert d["eval/entries_ratio"] == 1.0 and d["eval/attention_flops_ratio"] == 1.0
    assert "eval/routing_hit_rate" not in d
    # one routed region per routing head: every token's regions number at most the heads
    for r in small.samples:
        assert all(len(step) <= 2 for step in r.routing[0])


def test_eval_config_rejects_two_budgets():
    with pytest.raises(ValueError, match="at most one"):
        EvalConfig(top_k=2, keep_ratio=0.5)
    with pytest.raises(ValueError, match="no gaze budget"):
        EvalConfig(attn="dense", top_k=2)


def test_a_dense_twin_model_evaluates_with_its_own_config(tiny_dir, samples):
    """The export of a `model.attn: dense` run routes nothing; evaluating it must still work."""
    from gazeattn.model import load_model
    from gazeattn.ops import GazeConfig

    model, processor = load_model(tiny_dir, gaze=GazeConfig(top_k="all", backend="dense"))
    report = evaluate_samples(model.eval(), processor, samples, EvalConfig(max_new_tokens=2))
    assert report.metrics["eval/entries_ratio"] == 1.0
    assert "eval/routing_hit_rate" not in report.metrics
    assert all(step == [] for r in report.samples for steps in r.routing.values() for step in steps)
    # asked for routing anyway (the serving API's "gaze": true), generation reports none
    from gazeattn.generation import GenerationRequest, generate_batch

    request = GenerationRequest(messages=samples[0].messages, images=samples[0].images,
                                max_new_tokens=2)  # fmt: skip
    (out,) = generate_batch(model, processor, [request], return_routing=True)
    assert out.routing and all(step == [] for step in out.routing)


def test_majority_share():
    assert metrics.majority_share(["Red", "red.", "blue", "top left"]) == 0.5
    assert metrics.majority_share([]) == 0.0


def test_every_budget_gaze_config_takes_is_an_evaluation_budget():
    """`--gaze-top-k all` and integers parse; "all" routes every region (exactly dense);
    the random-routing ablation is labelled and refused for dense attention."""
    from evaluation.cli import evaluate_parser

    parse = evaluate_parser().parse_args
    assert parse(["--model", "m", "--data", "d", "--gaze-top-k", "all"]).gaze_top_k == "all"
    assert parse(["--model", "m", "--data", "d", "--gaze-top-k", "3"]).gaze_top_k == 3
    for bad in ("0", "some"):
        with pytest.raises(SystemExit):
            parse(["--model", "m", "--data", "d", "--gaze-top-k", bad])
    assert EvalConfig(top_k="all").label == "gaze-topall"
    assert EvalConfig(keep_ratio=0.1, random_routing_seed=0).label == "gaze-keep0.1-random"
    with pytest.raises(ValueError, match="random_routing_seed"):
        EvalConfig(attn="dense", random_routing_seed=0)
    with pytest.raises(ValueError, match="top_k"):
        EvalConfig(top_k=0)


def test_all_regions_by_name_equal_dense(tiny, samples):
    model, processor = tiny
    every = evaluate_samples(model, processor, samples, EvalConfig(top_k="all", max_new_tokens=2))
    dense = evaluate_samples(model, processor, samples, EvalConfig(attn="dense", max_new_tokens=2))
    assert [r.prediction for r in every.samples] == [r.prediction for r in dense.samples]
    assert every.metrics["eval/entries_ratio"] == 1.0


def test_random_routing_routes_elsewhere_at_the_same_budget(tiny, samples):
    """The ablation keeps the budget (the same entries) but not the model's picks; seeded."""
    model, processor = tiny
    config = dict(top_k=1, max_new_tokens=3)
    own = evaluate_samples(model, processor, samples, EvalConfig(**config))
    runs = [
        evaluate_samples(model, processor, samples, EvalConfig(**config, random_routing_seed=s))
        for s in (0, 0, 1)
    ]
    assert runs[0].metrics["eval/visual_entries_per_token"] == pytest.approx(
        own.metrics["eval/visual_entries_per_token"]
    )

    def picks(report):
        return [[r["box"] for step in s.routing[0] for r in step] for s in report.samples]

    assert picks(runs[0]) == picks(runs[1])  # seeded: the same picks again
    assert picks(runs[0]) != picks(own) and picks(runs[0]) != picks(runs[2])
    # the model's own routing is restored after the ablation
    again = evaluate_samples(model, processor, samples, EvalConfig(**config))
    assert picks(again) == picks(own)


def test_routing_lift_and_the_last_layer():
    from evaluation.compare import last_layer_hits, routing_lift

    assert routing_lift(0.9, 0.2) == pytest.approx(0.875)
    assert routing_lift(0.2, 0.2) == 0.0
    assert routing_lift(None, 0.2) is None and routing_lift(1.0, 1.0) is None
    m = {"eval/routing_hit_rate/layer_0": 0.3, "eval/routing_hit_rate_random/layer_0": 0.2,
         "eval/routing_hit_rate/layer_1": 0.9, "eval/routing_hit_rate_random/layer_1": 0.25}  # fmt: skip
    assert last_layer_hits(m) == (0.9, 0.25)
    assert last_layer_hits({"eval/accuracy": 1.0}) == (None, None)


def test_prompt_word_hits_follow_the_word_and_the_budget(tiny):
    """Every region routed: the colour word reaches the target at every layer; a question
    without a word is skipped; the model's own settings are back afterwards."""
    from evaluation.runner import colour_words, prompt_word_hits, question_sample
    from gazeattn.model import gaze_module
    from tests.eval.conftest import square_image

    model, processor = tiny
    box = [60, 10, 90, 40]
    samples = [
        question_sample("a", "What shape is the red one?", "square",
                        images=[square_image(box)], target_box=box),
        question_sample("b", "What colour is the square?", "red",
                        images=[square_image(box)], target_box=box),
    ]  # fmt: skip
    words = colour_words(samples)
    assert words == ["red", None]
    own = gaze_module(model).gaze_config
    every = prompt_word_hits(model, processor, samples, words, EvalConfig(top_k="all"))
    assert every == {0: 1.0, 1: 1.0}
    one = prompt_word_hits(model, processor, samples, words, EvalConfig(top_k=1))
    assert set(one) == {0, 1} and all(v in (0.0, 1.0) for v in one.values())
    assert gaze_module(model).gaze_config == own


def test_the_chart_draws_rows_at_every_accuracy(tmp_path):
    """A row at 100% has an interval end rounded just under it (0.9999999999999999)."""
    from evaluation.compare import SweepRow, draw_chart
    from evaluation.metrics import wilson_interval

    rows = []
    for correct, hit in ((24, None), (0, 0.5), (12, 1.0)):
        low, high = wilson_interval(correct, 24)
        rows.append(SweepRow(model="m", label=f"row{correct}", run_id=None, samples=24,
                             entries=8.0, dense_entries=40.0, entries_pct=20.0,
                             accuracy=correct / 24, accuracy_low=low, accuracy_high=high,
                             hit_rate=hit, hit_rate_random=None if hit is None else 0.2,
                             flops_ratio=0.5))  # fmt: skip
    path = draw_chart(rows, tmp_path / "chart.png")
    assert path.stat().st_size > 0
