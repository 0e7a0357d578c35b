"""MLflow tracking that never stops training: buffered, warn-once, resumable runs.

The driver resolves (or creates) the run once per training run name, so a
resumed or restarted run logs into the same MLflow run. Rank 0 logs through a
``Tracker``; when the server is unreachable the metrics are buffered (bounded)
and sent when it answers again, and training goes on.
"""

from __future__ import annotations

import logging
import os
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
    """Logs to one MLflow run; failures warn once and buffer up to ``max_buffer`` metrics."""

    def __init__(
        self, uri: str, run_id: str, *, system_metrics: bool = False, max_buffer: int = 10_000
    ):
        _fail_fast()
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(uri)
        self._buffer: deque[Metric] = deque(maxlen=max_buffer)
        self._failing = False
        self._active = None
        if system_metrics:
            self._start_system_metrics()

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
                "MLflow at %s answers again; sent %d buffered metrics", self.uri, len(self._buffer)
            )
        self._failing = False

    def log_metrics(
        self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None
    ) -> None:
        ts = timestamp_ms or int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self.flush()

    def flush(self) -> None:
        while self._buffer:
            # MLflow takes at most 1000 metrics per batch
            batch = [self._buffer[i] for i in range(min(1000, len(self._buffer)))]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except TRACKING_ERRORS as err:  # tracking must not stop training
                self._warn(err)
                return
            for _ in batch:
                self._buffer.popleft()
            self._ok()

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

    def close(self) -> None:
        self.flush()
        if self._active is not None:
            try:
                mlflow.end_run()
            except TRACKING_ERRORS as err:
                self._warn(err)
            self._active = None
