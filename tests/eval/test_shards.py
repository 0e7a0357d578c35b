"""Evaluation over WebDataset shards through the Ray Data pipeline, with two model actors."""

import os

import pytest

from evaluation.data import load_json
from evaluation.runner import EvalConfig, evaluate_samples

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_shards_match_local_evaluation(tiny_dir, tiny, tmp_path, ray_local):
    """--shards (Ray Data, decoded in the actors) and --data (read here) score alike, target
    boxes included: the records carry no image_size and the images are not the processor's
    size, so a box framed by a resized image would route-hit differently."""
    from evaluation.shards import evaluate_shards, shard_samples
    from tests.eval.conftest import write_json_data

    json_data = write_json_data(tmp_path / "data", with_size=False)
    from pipelines.make_shards import make_shards

    manifest = make_shards(json_data, json_data.parent / "media", tmp_path / "shards",
                           shard_size="1KB", progress=False)  # fmt: skip
    shards = [str(tmp_path / "shards" / s["name"]) for s in manifest["shards"]]
    assert len(shards) >= 2
    config = EvalConfig(keep_ratio=0.25, max_new_tokens=3, batch_size=2)
    report = evaluate_shards(shards, tiny_dir, config, workers=2)
    model, processor = tiny
    local = evaluate_samples(model, processor, load_json(json_data), config)
    assert [r.id for r in report.samples] == [r.id for r in local.samples]
    assert [r.prediction for r in report.samples] == [r.prediction for r in local.samples]
    for name in ("eval/accuracy", "eval/visual_entries_per_token", "eval/routing_hit_rate"):
        assert report.metrics[name] == pytest.approx(local.metrics[name])
    assert report.metrics["eval/decode_tokens_per_s"] > 0
    firsts = shard_samples(
        shards, limit=2, frames_per_video=processor.visual_budget.frames_per_video
    )
    assert len(firsts) == 2 and firsts[0].target_box is not None
    # the original size, not the processor's, frames the target box
    assert [s.media_size() for s in firsts] == [(128, 96), (128, 96)]
    assert [s.media_size() for s in load_json(json_data)][:2] == [(128, 96), (128, 96)]
