"""MLflow tracking that never stops training: buffered, sent in the background, warn-once,
resumable runs.

The driver resolves (or creates) the run once per training run name, so a
resumed or restarted run logs into the same MLflow run. Rank 0 logs through a
``Tracker``, which only buffers; a background thread sends. When the server is
unreachable or hangs the metrics stay buffered (bounded: the oldest are dropped
and counted) and are sent when it answers again, and training goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking.experiments import experiment_id

log = logging.getLogger(__name__)

RUN_NAME_TAG = "gazeattn.run_name"
# what an unreachable or failing server raises (requests' errors are OSErrors)
TRACKING_ERRORS = (MlflowException, OSError)
# A dead server must not stall a training step for minutes of retries.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _fail_fast() -> None:
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def resolve_run(
    uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None
) -> str:
    """The id of the MLflow run for ``run_name`` in ``experiment``, created on first use."""
    _fail_fast()
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})}
    )
    return run.info.run_id


class Tracker:
    """Logs to one MLflow run without ever making training wait on the server.

    ``log_metrics`` only appends to a buffer; a background thread sends it in batches. While
    the server fails or hangs the metrics wait in the buffer (at most ``max_buffer``; beyond
    that the oldest are dropped and counted in ``dropped``, with one warning) and the sender
    retries every ``retry_s``. After a recovery the count of dropped metrics is logged as
    ``tracking_dropped_metrics``. ``close`` waits at most ``timeout_s`` for the rest.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        system_metrics: bool = False,
        max_buffer: int = 10_000,
        retry_s: float = 10.0,
    ):
        _fail_fast()
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(uri)
        self.max_buffer = max_buffer
        self.retry_s = retry_s
        self.dropped = 0
        self._buffer: deque[Metric] = deque()
        # guards _buffer, _in_flight, dropped and _closing; the sender waits on it
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closing = False
        self._retry_now = False
        self._failing = False
        self._dropping = False
        self._reported_dropped = 0
        self._active = None
        if system_metrics:
            self._start_system_metrics()
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
        self._sender.start()

    def _start_system_metrics(self) -> None:
        try:
            mlflow.set_tracking_uri(self.uri)
            self._active = mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
        except TRACKING_ERRORS as err:  # tracking must not stop training
            self._warn(err)

    def _warn(self, err: Exception) -> None:
        if not self._failing:
            log.warning(
                "MLflow at %s is unreachable (%s); buffering metrics, training goes on",
                self.uri,
                err,
            )
        self._failing = True

    def _ok(self) -> None:
        if self._failing:
            log.warning(
                "MLflow at %s answers again; sending %d buffered metrics",
                self.uri,
                len(self._buffer),
            )
        self._failing = False

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None
    ) -> None:
        """Buffer one step's metrics for the sender; never waits for the server."""
        ts = timestamp_ms or int(time.time() * 1000)
        with self._cond:
            self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
            self._bound()
            self._cond.notify_all()

    def _bound(self) -> None:
        """Drop the oldest buffered metrics beyond ``max_buffer`` (with ``_cond`` held)."""
        over = len(self._buffer) - self.max_buffer
        if over <= 0:
            return
        for _ in range(over):
            self._buffer.popleft()
        self.dropped += over
        if not self._dropping:
            log.warning(
                "MLflow at %s: the buffer of %d metrics is full; dropping the oldest "
                "(counted, logged as tracking_dropped_metrics once it answers)",
                self.uri,
                self.max_buffer,
            )
        self._dropping = True

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    return
                # MLflow takes at most 1000 metrics per batch
                batch = [self._buffer.popleft() for _ in range(min(1000, len(self._buffer)))]
                self._in_flight = len(batch)
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except TRACKING_ERRORS as err:  # tracking must not stop training
                self._warn(err)
                with self._cond:
                    self._buffer.extendleft(reversed(batch))
                    self._in_flight = 0
                    self._bound()
                    self._cond.notify_all()
                    if self._closing:
                        return
                    self._wait_to_retry()
                continue
            with self._cond:
                self._in_flight = 0
                self._ok()
                self._report_dropped(batch[-1].step)
                self._cond.notify_all()

    def _wait_to_retry(self) -> None:
        """Wait ``retry_s`` (with ``_cond`` held): new metrics do not cut it short, so a dead
        server is asked once per ``retry_s``, not at every log step; flush() and close() do."""
        self._retry_now = False
        deadline = time.monotonic() + self.retry_s
        while not (self._retry_now or self._closing):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _report_dropped(self, step: int) -> None:
        if self.dropped == self._reported_dropped:
            return
        self._reported_dropped = self.dropped
        self._dropping = False
        metric = Metric(
            "tracking_dropped_metrics", float(self.dropped), int(time.time() * 1000), step
        )
        self._buffer.append(metric)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (at most ``timeout_s``) until the sender has sent every buffered metric, retrying
        now if it was waiting; True when nothing is left to send."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._retry_now = True
            self._cond.notify_all()
            while self._buffer or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sender.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def log_params(self, params: dict[str, object]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        try:
            existing = self.client.get_run(self.run_id).data.params
            items = [p for p in items if p.key not in existing]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        except TRACKING_ERRORS as err:  # tracking must not stop training
            self._warn(err)

    def set_tags(self, tags: dict[str, str]) -> None:
        try:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
        except TRACKING_ERRORS as err:
            self._warn(err)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except TRACKING_ERRORS as err:
            self._warn(err)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is buffered, waiting at most ``timeout_s``; what is left is dropped and
        counted (the sender may still be waiting on the server: it is a daemon thread)."""
        sent = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            left = len(self._buffer) + self._in_flight
            self._buffer.clear()
            self._cond.notify_all()
        if not sent:
            self.dropped += left
            log.warning(
                "MLflow at %s: %d metrics could not be sent before closing (%d dropped in all)",
                self.uri,
                left,
                self.dropped,
            )
        if self._active is not None:
            try:
                mlflow.end_run()
            except TRACKING_ERRORS as err:
                self._warn(err)
            self._active = None
