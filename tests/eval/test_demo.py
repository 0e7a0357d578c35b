"""`make demo` end to end (jobs/demo.py): the fine-tuning learns its task.

The demo fine-tunes the tiny model on generated shards, prints the dense-vs-gaze table of
the held-out split, then answers its own training questions. Here the fine-tuned export is
scored again on those questions: its accuracy must be high and far above what the most
frequent answer alone scores (a model that ignores the image), with many different correct
answers (not one memorised constant).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from evaluation.data import load_json
from evaluation.metrics import majority_share, normalise_answer
from evaluation.runner import EvalConfig, evaluate_samples
from gazeattn import load_model

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_the_demo_model_answers_its_training_questions(mlflow_server, tmp_path):
    sets = {
        "run.storage_path": tmp_path / "ray",
        "data.synthetic_dir": tmp_path / "data",
        "data.progress_bars": False,
        "mlflow.tracking_uri": mlflow_server.uri,
        "mlflow.experiment": "demo-test",
        "mlflow.registered_model_name": "gazeattn-demo-test",
        "mlflow.system_metrics": False,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(
        [sys.executable, "jobs/demo.py", *args], cwd=REPO, capture_output=True, text=True,
        timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the demo ends with the comparison table and its own training-answers line
    assert "| dense |" in done.stdout and "| gaze-keep0.25 |" in done.stdout, done.stdout[-3000:]
    assert "training questions: accuracy" in done.stdout

    model, processor = load_model(tmp_path / "ray" / "gaze-demo" / "export")
    samples = load_json(tmp_path / "data" / "train.json")
    report = evaluate_samples(model.eval(), processor, samples, EvalConfig(max_new_tokens=8))
    accuracy = report.metrics["eval/accuracy"]
    baseline = majority_share([s.answer for s in samples])
    right = Counter(normalise_answer(r.answer) for r in report.samples if r.correct)
    assert accuracy >= 0.7, (accuracy, [(r.answer, r.prediction) for r in report.samples])
    assert accuracy >= baseline + 0.4, (accuracy, baseline)
    assert len(right) >= 6, right
    # at the demo's own budget: a quarter of the regions, so most visual entries are skipped
    assert report.metrics["eval/kv_savings_pct"] > 50
