"""The progressive Top-K's clock: started at step 0, or once the loss says the model attends."""

from __future__ import annotations

import pytest

from gazeattn.typed_config import ConfigError
from training.config import TopKSchedule, load_config
from training.schedules import TopKClock, apply_top_k


def test_a_step_started_schedule_shrinks_from_step_zero():
    clock = TopKClock.start(TopKSchedule(warmup_steps=4, kind="linear"))
    assert clock.started_at == 0
    assert [clock.progress(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert clock.observe(1, 9.0) is False  # nothing to wait for


def test_a_loss_started_schedule_waits_for_the_windowed_loss():
    settings = TopKSchedule(warmup_steps=2, start="loss", start_loss=0.5, loss_window=3)
    clock = TopKClock.start(settings)
    losses = [2.0, 1.0, 0.4, 0.4, 0.4, 0.3]
    started = [clock.observe(step, loss) for step, loss in enumerate(losses, start=1)]
    # the mean of the last three is first <= 0.5 after step 4 (1.0, 0.4, 0.4 -> 0.6: not yet)
    assert started == [False, False, False, False, True, False]
    assert clock.started_at == 5
    assert [clock.progress(s) for s in (4, 5, 6, 7, 8)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    # a resumed run goes on from where its checkpoint says the warm-up began
    resumed = TopKClock.start(settings, started_at=5)
    assert resumed.progress(6) == 0.5


def test_a_waiting_clock_keeps_the_model_dense(monkeypatch):
    """Before the start every query keeps every region it sees (keep ratio 1.0)."""
    import gazeattn.model

    cfg = load_config("configs/demo.yaml", ["top_k_schedule.start=loss",
                                            "top_k_schedule.start_loss=0.1"])  # fmt: skip
    calls = []
    monkeypatch.setattr(gazeattn.model, "set_gaze_budget", lambda m, **kw: calls.append(kw))
    clock = TopKClock.start(cfg.top_k_schedule)
    assert apply_top_k(cfg, object(), clock.progress(50)) == 1.0
    clock.started_at = 50
    target = cfg.model.gaze.keep_ratio
    done = clock.progress(50 + cfg.top_k_schedule.warmup_steps)
    assert apply_top_k(cfg, object(), done) == pytest.approx(target)
    assert calls == [{"keep_ratio": 1.0}, {"keep_ratio": pytest.approx(target)}]


def test_a_loss_start_needs_its_threshold():
    with pytest.raises(ConfigError, match="start_loss"):
        load_config("configs/demo.yaml", ["top_k_schedule.start=loss"])
