"""A local Ray + Serve bound to loopback, for trying the app, benchmarks and tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# seconds Serve waits for a new HTTP proxy before it kills it (its default: 5)
PROXY_READY = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"


@contextmanager
def local_serve(num_cpus: int = 4, metrics_port: int | None = None) -> Iterator[str]:
    """Local Ray + Serve on 127.0.0.1; yields the HTTP base URL, stops both after.

    The replicas import this checkout's packages (its root goes on their PYTHONPATH).
    ``metrics_port``: Ray's Prometheus endpoint on that port, reported every half second."""
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "PYTHONPATH", PROXY_READY)}
    # workers inherit this: the checkout's packages, not another install's
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    # a local, loopback-only Ray: token authentication is for shared clusters
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Serve kills a proxy that is not ready in 5 s; on a loaded 2-core machine its start can
    # take longer (CI, 2026-12-03: every test of a module failed in serve.start with the
    # proxy "killed by ray.kill" before it ran). The controller reads this at its start.
    os.environ.setdefault(PROXY_READY, "60")
    port = free_port()
    metrics = {}
    if metrics_port is not None:
        metrics = dict(
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 500},
        )
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **metrics)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
