"""The benchmark modules import and their tables are what their results say."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import load_config

REPO = Path(__file__).resolve().parent.parent
BENCH = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCH)
def test_bench_modules_import(name):
    importlib.import_module(f"bench.{name}")


def test_every_claim_run_is_a_valid_config():
    """Every run over its recipe, its own settings last; a run that equals its recipe is left
    out, and the earlier recipe keeps the settings its recorded rows were measured with."""
    from bench.claim import BASES, RUNS, plan

    names = [name for name, _, _ in RUNS]
    assert len(set(names)) == len(names)
    for base in BASES:
        configs = {
            name: load_config(REPO / "configs" / "demo.yaml", sets) for name, _, sets in plan(base)
        }
        assert configs["scratch-step"].model.name_or_path == "tiny"
        assert configs["dense-twin"].model.attn == "dense"
        recipe = configs["recipe"]
        assert sum(config == recipe for config in configs.values()) == 1
    old = {name: sets for name, _, sets in plan("colour-after")}
    earlier = load_config(REPO / "configs" / "demo.yaml", old["recipe"])
    assert earlier.model.gaze.keep_ratio == 0.1 and earlier.model.gaze.num_context_tokens == 4
    assert not earlier.data.synthetic.question_first and "context-4" not in old
    demo = {name: sets for name, _, sets in plan("demo")}
    grid4 = load_config(REPO / "configs" / "demo.yaml", demo["grid-4x4"])
    twin4 = load_config(REPO / "configs" / "demo.yaml", demo["grid-4x4-twin"])
    assert grid4.data.synthetic.grid == 4 and grid4.model.gaze.keep_ratio == 0.25
    assert grid4.model.name_or_path == twin4.model.name_or_path == "checkpoints/tiny-grid4q"
    assert twin4.model.attn == "dense" and grid4.model.attn == "gaze"
    assert demo["recipe"] == [] and "context-0" not in demo and "warmup-0" not in demo
    assert (
        load_config(REPO / "configs" / "demo.yaml", demo["context-4"]).model.gaze.num_context_tokens
        == 4
    )


def test_a_claim_seed_changes_the_training_and_the_data_not_the_checkpoint():
    from bench.claim import plan, seeded

    sets = {name: sets for name, _, sets in plan("demo")}["recipe"]
    base = load_config(REPO / "configs" / "demo.yaml", sets)
    other = load_config(REPO / "configs" / "demo.yaml", seeded(sets, 2))
    assert (other.train.seed, other.data.seed, other.data.synthetic.seed) == (2, 2, 2)
    assert other.model == base.model
    assert load_config(REPO / "configs" / "demo.yaml", seeded(sets, 0)) == base


def test_a_claim_summary_pools_the_seeds():
    """A run's summary row: each seed's accuracy, the pooled count's interval, the means of
    the routing columns (the lift is each seed's, averaged)."""
    from bench.claim import SUMMARY_HEADER, summary_row

    def result(seed: int, correct: int, hit: float) -> dict:
        return {
            "name": f"demo/seed{seed}", "train_s": 60.0 + seed,
            "own": {"samples": 500.0, "correct": float(correct), "accuracy": correct / 500,
                    "entries_ratio": 0.2, "last_hit": hit, "last_random": 0.2},
            "random": {"accuracy": 0.4 + 0.1 * seed},
        }  # fmt: skip

    line = summary_row([result(0, 450, 0.84), result(1, 500, 1.0)], "the demo")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == SUMMARY_HEADER.splitlines()[0].count("|") - 1
    assert cells[0] == "demo" and cells[2] == "20.0%" and cells[3] == "90.0 / 100.0"
    assert cells[4].startswith("95.0% (93.")  # 950 of 1000
    assert cells[5] == "92.0%" and cells[6] == "20.0%" and cells[7] == "0.90"
    assert cells[8] == "45.0%" and cells[9] == "60"


def test_a_claim_row_has_the_interval_and_the_lift():
    from bench.claim import HEADER, row

    result = {
        "name": "demo", "train_s": 61.2,
        "own": {"samples": 500.0, "correct": 450.0, "accuracy": 0.9, "entries_ratio": 0.2,
                "last_hit": 0.85, "last_random": 0.2},
        "random": {"accuracy": 0.5},
    }  # fmt: skip
    line = row(result, "the demo")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == HEADER.splitlines()[0].count("|") - 1
    assert cells[2] == "20.0%" and cells[3].startswith("90.0% (87.") and cells[6] == "0.81"
    assert cells[7] == "50.0%"


def test_the_gpu_checks_model_step_rehearses_on_the_cpu(tmp_path):
    """``bench/gpu_check.py --rehearse``'s model step: the shipped path (a stock Qwen2.5-VL
    checkpoint converted by load_model, its dense twin, the stock model) through the
    serving engine in regime (a), and training steps, at toy sizes; its table is written."""
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--rehearse", "--out", str(tmp_path),
         "--skip", "precompile", "tests", "attention"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"][1:]
    model = step["model"]
    assert [r["batch"] for r in model["regime_a"]] == [1, 2]
    for row in model["regime_a"]:
        for mode in ("gaze", "dense twin", "stock"):
            assert row[mode]["decode_tokens_per_s"] > 0, row
            # the video processed once, for the first question: the second and the batch's
            # reuse it, as in a server's preparing process
            assert row[mode]["media_cache_hits"] == row["batch"] + 1, row
    assert {"gaze", "stock"} == set(model["train"])
    assert "gaze vs twin" in (tmp_path / "gpu_check.md").read_text()
