"""A tracking server that does not answer does not stall training: ``Tracker.log_metrics``
buffers and returns, a background thread sends, the buffer is bounded and what it drops is
counted, and ``close`` gives up after its timeout."""

from __future__ import annotations

import socket
import time

import pytest

from training.tracking import Tracker

# each request to the silent server waits this long before it fails (before the fix, every
# log_metrics call waited for it)
REQUEST_TIMEOUT_S = 3


@pytest.fixture
def silent_server(monkeypatch):
    """A TCP port on 127.0.0.1 that completes connections and never answers (a hung MLflow)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_logging_to_a_silent_server_does_not_block(silent_server):
    tracker = Tracker(silent_server, "0" * 32)
    start = time.monotonic()
    for step in range(3):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step)
    logged = time.monotonic() - start
    # far below one request's timeout: nothing waited for the server
    assert logged < 1.0, f"3 log steps took {logged:.1f} s"
    start = time.monotonic()
    tracker.close(timeout_s=0.5)
    closed = time.monotonic() - start
    assert closed < REQUEST_TIMEOUT_S, f"close took {closed:.1f} s"
    # none arrived: all six are counted as dropped at close
    assert tracker.dropped == 6


def test_the_buffer_is_bounded_and_counts_what_it_drops(silent_server, caplog):
    tracker = Tracker(silent_server, "0" * 32, max_buffer=5)
    with caplog.at_level("WARNING", logger="training.tracking"):
        for step in range(20):
            tracker.log_metrics({"loss": float(step)}, step)
    try:
        with tracker._cond:
            # the sender holds at most one buffer's worth in flight, the rest waits in the
            # bounded buffer, and every other metric was dropped and counted
            held = len(tracker._buffer) + tracker._in_flight
            assert len(tracker._buffer) <= 5 and tracker._in_flight <= 5
            assert tracker.dropped == 20 - held >= 10
        assert sum("dropping" in r.message for r in caplog.records) == 1
    finally:
        tracker.close(timeout_s=0.1)


class FlakyClient:
    """Stands in for MlflowClient: fails while ``down``, else records what it is sent."""

    def __init__(self):
        self.down = True
        self.sent = []

    def log_batch(self, run_id, metrics=()):
        if self.down:
            raise OSError("connection refused")
        self.sent += metrics


def test_after_a_recovery_the_buffer_and_the_drop_count_arrive(monkeypatch):
    tracker = Tracker("http://127.0.0.1:9", "0" * 32, max_buffer=3, retry_s=0.05)
    client = tracker.client = FlakyClient()
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step)
    assert not tracker.flush(timeout_s=0.2)
    client.down = False
    assert tracker.flush(timeout_s=10)
    tracker.close(timeout_s=1)
    losses = [m.step for m in client.sent if m.key == "loss"]
    # the newest three waited in the buffer; the oldest seven were dropped and counted
    assert losses == [7, 8, 9] and tracker.dropped == 7
    (count,) = [m for m in client.sent if m.key == "tracking_dropped_metrics"]
    assert count.value == 7 and count.step == 9


def test_a_dead_server_is_asked_once_per_retry_interval_not_at_every_step():
    tracker = Tracker("http://127.0.0.1:9", "0" * 32, retry_s=60)
    client = tracker.client = FlakyClient()
    calls = []
    real = client.log_batch
    client.log_batch = lambda run_id, metrics=(): (
        calls.append(len(metrics)),
        real(run_id, metrics),
    )
    tracker.log_metrics({"loss": 1.0}, 0)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    for step in range(1, 20):
        tracker.log_metrics({"loss": 1.0}, step)
    time.sleep(0.2)
    assert len(calls) == 1
    tracker.close(timeout_s=0.5)
    assert tracker.dropped == 20
