"""A real Ray Serve on 127.0.0.1 for the serving tests, and request helpers."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from serving.images import data_url
from serving.local import ROOT, local_serve

__all__ = [
    "ROOT",
    "data_url",
    "http_server",
    "image_bytes",
    "image_part",
    "local_serve",
    "static_files",
    "user",
]


@contextmanager
def http_server(handler):
    """A threading HTTP server of ``handler`` on loopback; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def static_files(root: Path):
    """A plain HTTP file server on loopback (the target of allow-listed image URLs)."""
    with http_server(partial(_QuietHandler, directory=str(root))) as url:
        yield url


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def image_bytes(seed: int = 0, size=(40, 56), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts, text: str = "what color is the circle?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
