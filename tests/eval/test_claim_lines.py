"""The demo's claim lines: each target against the table's rows, at its boundary too."""

from __future__ import annotations

from evaluation.compare import SweepRow
from jobs.demo import CLAIM, claim_lines


def _row(model, label, accuracy, *, pct=20.0, hit=None, random=None):
    return SweepRow(model=model, label=label, run_id=None, samples=500, entries=8.0,
                    dense_entries=40.0, entries_pct=pct, accuracy=accuracy,
                    accuracy_low=accuracy, accuracy_high=accuracy, hit_rate=hit,
                    hit_rate_random=random, flops_ratio=0.6)  # fmt: skip


def test_the_claim_is_read_target_by_target():
    rows = [
        _row("dense twin", "dense", 0.998, pct=100.0),
        _row("gaze model", "gaze-keep0.1", 0.988, hit=0.9, random=0.2),  # exactly 1 point below
        _row("gaze model", "gaze-keep0.1-random", 0.406, hit=0.2, random=0.2),
    ]
    lines = claim_lines(rows, gaze_label="gaze-keep0.1")
    assert len(lines) == len(CLAIM) == 5
    assert all(line.startswith("met ") for line in lines), lines
    rows[1] = _row("gaze model", "gaze-keep0.1", 0.986, pct=26.0, hit=0.3, random=0.2)
    missed = [line for line in claim_lines(rows, gaze_label="gaze-keep0.1") if "NOT" in line]
    assert len(missed) == 3, missed  # the entries, the gap and the lift
    assert claim_lines(rows[:2], gaze_label="gaze-keep0.1") == [
        "the claim needs the dense twin, the gaze model and its random-routing row"
    ]
