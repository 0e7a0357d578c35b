"""A real Ray Serve on 127.0.0.1 for the serving tests, and request helpers."""

from __future__ import annotations

import base64
import io
import os
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def local_serve(num_cpus: int = 4, metrics_port: int | None = None):
    """Local Ray + Serve bound to loopback; yields the HTTP base URL, stops both after.

    ``metrics_port``: Ray's Prometheus endpoint on that port, reported every half second.
    """
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "PYTHONPATH")}
    # workers inherit this: the checkout's packages, not another install's
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["RAY_AUTH_MODE"] = "disabled"
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


@contextmanager
def static_files(root: Path):
    """A plain HTTP file server on loopback (the target of allow-listed image URLs)."""
    handler = partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def image_bytes(seed: int = 0, size=(40, 56), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts, text: str = "what color is the circle?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
