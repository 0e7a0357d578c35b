"""The benchmark modules import and their tables are what their results say."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from training.config import load_config

REPO = Path(__file__).resolve().parent.parent
BENCH = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCH)
def test_bench_modules_import(name):
    importlib.import_module(f"bench.{name}")


def test_every_claim_run_is_a_valid_config():
    from bench.claim import RUNS

    names = [name for name, _, _ in RUNS]
    assert len(set(names)) == len(names)
    for _, _, sets in RUNS:
        load_config(REPO / "configs" / "demo.yaml", sets)


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
