"""`make demo` shortened (jobs/demo.py): what must hold however short the training.

The demo converts the pretrained tiny checkpoint into the gaze model and its dense twin,
fine-tunes both on the grid task and prints one held-out table. Here with a few steps and
image-only data, so that every count is plain budget arithmetic: a 48 px image is 6 x 6
tokens in nine 2 x 2 regions, without context tokens (the demo's); two KV heads route.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
N_TEST = 24
REGION, REGIONS, CONTEXT, HEADS = 4, 9, 0, 2

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _random_hit(k: int) -> float:
    """P(one of HEADS uniform picks of k of the 9 regions is the asked one)."""
    return 1 - ((REGIONS - k) / REGIONS) ** HEADS


# (model, attention) -> (visual entries per generated token, random routing hit rate)
EXPECTED = {
    ("dense twin", "dense"): (REGIONS * REGION + CONTEXT, None),
    # a budget asked of the dense twin is applied (routed), not silently dense
    ("dense twin", "gaze-keep0.2"): (2 * REGION + CONTEXT, _random_hit(2)),
    ("gaze model", "gaze-keep0.2"): (2 * REGION + CONTEXT, _random_hit(2)),
    # the ablation: the same budget routed to random regions
    ("gaze model", "gaze-keep0.2-random"): (2 * REGION + CONTEXT, _random_hit(2)),
    ("gaze model", "gaze-keep0.5"): (5 * REGION + CONTEXT, _random_hit(5)),
    ("gaze model", "gaze-top1"): (REGION + CONTEXT, _random_hit(1)),
}


def _table(stdout: str) -> dict[tuple[str, str], list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in row] for row in rows]
    return {(row[0], row[1]): row for row in cells[1:]}  # below the header


def test_a_shortened_demo_prints_the_held_out_table(mlflow_server, tmp_path):
    sets = {
        "run.storage_path": tmp_path / "ray",
        "data.synthetic_dir": tmp_path / "data",
        "data.synthetic.n_train": 48,
        "data.synthetic.n_test": N_TEST,
        "data.synthetic.video_fraction": 0.0,
        "train.max_steps": 6,
        "train.checkpoint_every": 6,
        "train.log_every": 5,
        "train.heldout_every": 3,
        "train.heldout_samples": 4,
        "top_k_schedule.warmup_steps": 3,
        "mlflow.tracking_uri": mlflow_server.uri,
        "mlflow.experiment": "demo-test",
        "mlflow.registered_model_name": "gazeattn-demo-test",
        "mlflow.system_metrics": False,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(
        [sys.executable, "jobs/demo.py", *args, "--budgets", "0.5", "1", "--pictures", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    assert f"{N_TEST} held-out samples" in done.stdout, log
    table = _table(done.stdout)
    assert set(table) == set(EXPECTED), table
    # every training-worker line once (Ray Train's print patch printed each twice)
    output = (done.stdout + done.stderr).splitlines()
    steps = [line for line in output if "[train] step 5/6" in line]
    assert len(steps) == 2, steps  # the gaze model's and the twin's
    # a newcomer's console: a checkpoint is one line of ours, none of the libraries' noise
    saved = [line for line in output if "[train] step 6: checkpoint saved and exported" in line]
    assert len(saved) == 2, saved
    noise = ("Checkpoint successfully created", "Reporting training result", "shm_comm_op",
             "Setting accelerator to", "exclude_resources")  # fmt: skip
    assert not [line for line in output if any(n in line for n in noise)], log
    # routing seen while it is learned: held-out checks at steps 3 and 6 of each training
    checks = [line for line in output if "held-out: accuracy" in line]
    assert len(checks) == 4, checks
    assert sum("routing hit" in line for line in checks) == 2, checks  # the gaze model's
    # the claim, target by target, under the table
    claim = [line for line in output if line.startswith(("[demo] met", "[demo] NOT met"))]
    assert len(claim) == 5, claim

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("demo-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    sweep = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`gazeattn.sweep` = 'held-out'"
    )
    parent = next(r for r in sweep if "mlflow.parentRunId" not in r.data.tags)
    path = client.download_artifacts(parent.info.run_id, "comparison/table.json", str(tmp_path))
    data = json.loads(Path(path).read_text())
    rows = [dict(zip(data["columns"], values, strict=True)) for values in data["data"]]
    assert len(rows) == len(EXPECTED)
    for row in rows:
        entries, random_hit = EXPECTED[(row["model"], row["label"])]
        assert row["samples"] == N_TEST
        assert row["entries"] == pytest.approx(entries), row
        # both sides count the same entries: the dense count has the context tokens too
        assert row["dense_entries"] == pytest.approx(REGIONS * REGION + CONTEXT), row
        assert 0.0 <= row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"] <= 1.0
        if random_hit is None:
            assert row["hit_rate"] is None and row["entries_pct"] == 100.0
        else:
            assert 0.0 <= row["hit_rate"] <= 1.0
            assert row["hit_rate_random"] == pytest.approx(random_hit), row
    # the training runs log the same count on both sides: the twin saves nothing
    twin = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`gazeattn.run_name` = 'gaze-demo-dense-twin'",
    )
    assert twin and twin[0].data.metrics["kv_savings_pct"] == pytest.approx(0.0)
    gaze = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`gazeattn.run_name` = 'gaze-demo'"
    )
    history = client.get_metric_history(gaze[0].info.run_id, "heldout/routing_hit_rate")
    assert [m.step for m in history] == [3, 6]
    assert (tmp_path / "ray" / "gaze-demo" / "held-out" / "comparison" / "table.md").exists()
