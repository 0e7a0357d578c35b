"""Fetching allow-listed image URLs safely, against a local HTTP server on 127.0.0.1 that
redirects, trickles, lies about sizes and streams too much."""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler

import pytest

from serving.errors import BadRequest, TooLarge
from serving.images import MAX_REDIRECTS, _resolve, fetch, load_image
from tests.serve.harness import http_server, image_bytes

PNG = image_bytes(3)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _redirect(self, where: str) -> None:
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        port = self.server.server_address[1]
        routes = {
            "/allowed/image.png": lambda: self._send(PNG),
            "/other/image.png": lambda: self._send(PNG),
            "/allowed/to-allowed": lambda: self._redirect("/allowed/image.png"),
            "/allowed/to-other": lambda: self._redirect("/other/image.png"),
            "/allowed/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/"),
            "/allowed/to-localhost": lambda: self._redirect(f"http://localhost:{port}/x.png"),
            "/allowed/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/allowed/loop": lambda: self._redirect("/allowed/loop"),
            "/allowed/declared-big": lambda: self._send(b"x" * 10, length=10**9),
            "/allowed/missing": lambda: self.send_error(404),
        }
        if self.path in routes:
            routes[self.path]()
        elif self.path == "/allowed/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                piece = b"z" * 4096
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/allowed/trickled-headers":
            # a status line and headers that never end, one byte at a time
            try:
                for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"z" * 400:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass
        elif self.path == "/allowed/trickled-chunk-size":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(400):  # a chunk-size line of leading zeros, never ending
                    self.wfile.write(b"0")
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass
        elif self.path == "/allowed/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"t" * 16)
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def origin():
    with http_server(_Handler) as url:
        yield url


def _fetch(origin, path, **kw):
    options = dict(
        max_bytes=64 * 1024,
        timeout_s=5.0,
        allowed_prefixes=[f"{origin}/allowed/"],
        allow_private=True,
        param="image_url",
    )
    return fetch(origin + path, **{**options, **kw})


def test_a_redirect_to_an_allow_listed_url_is_followed(origin):
    assert _fetch(origin, "/allowed/to-allowed") == PNG


@pytest.mark.parametrize(
    "path",
    ["/allowed/to-other", "/allowed/to-metadata", "/allowed/to-localhost", "/allowed/to-file"],
)
def test_a_redirect_outside_the_allow_list_is_not_followed(origin, path):
    with pytest.raises(BadRequest, match="outside the allow-list"):
        _fetch(origin, path)


def test_redirect_loops_end(origin):
    with pytest.raises(BadRequest, match=f"more than {MAX_REDIRECTS}"):
        _fetch(origin, "/allowed/loop")


def test_sizes_are_enforced_from_the_header_and_while_streaming(origin):
    start = time.monotonic()
    with pytest.raises(TooLarge, match="10+ bytes exceeds"):
        _fetch(origin, "/allowed/declared-big")
    assert time.monotonic() - start < 3
    with pytest.raises(TooLarge, match="larger than the limit"):
        _fetch(origin, "/allowed/chunked-big")
    assert len(_fetch(origin, "/allowed/chunked-big", max_bytes=10**6)) == 64 * 4096


def test_the_timeout_is_one_deadline_for_a_trickling_server(origin):
    start = time.monotonic()
    with pytest.raises(BadRequest, match="timed out"):
        _fetch(origin, "/allowed/trickle", timeout_s=0.6, max_bytes=10**6)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("path", ["/allowed/trickled-headers", "/allowed/trickled-chunk-size"])
def test_the_deadline_holds_while_headers_or_chunk_sizes_trickle(origin, path):
    start = time.monotonic()
    with pytest.raises(BadRequest, match="timed out"):
        _fetch(origin, path, timeout_s=0.6, max_bytes=10**6)
    assert time.monotonic() - start < 2.5


def test_http_errors_are_client_errors(origin):
    with pytest.raises(BadRequest, match="HTTP 404"):
        _fetch(origin, "/allowed/missing")


def test_loopback_is_refused_after_resolution_unless_allowed(origin):
    port = origin.rsplit(":", 1)[1]
    for base in (origin, f"http://localhost:{port}"):
        with pytest.raises(BadRequest, match="non-public address"):
            load_image(
                f"{base}/allowed/image.png",
                max_bytes=64 * 1024,
                max_pixels=10**6,
                allowed_prefixes=[f"{base}/allowed/"],
            )
    image = load_image(
        f"{origin}/allowed/image.png",
        max_bytes=64 * 1024,
        max_pixels=10**6,
        allowed_prefixes=[f"{origin}/allowed/"],
        allow_private=True,
    )
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.7",
        "172.16.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "::ffff:127.0.0.1",
        "fe80::1",
        "100.64.0.1",
        "224.0.0.1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::808:808",  # NAT64 of a public address: still a translator's
        "64:ff9b:1::a00:1",
        "2002:a00:1::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "::a00:1",  # IPv4-compatible
    ],
)
def test_private_loopback_link_local_and_reserved_addresses_are_refused(host):
    with pytest.raises(BadRequest, match="non-public"):
        _resolve(host, 80, allow_private=False, param="image_url")
    assert _resolve(host, 80, allow_private=True, param="image_url")


def test_a_public_address_passes():
    assert _resolve("93.184.215.14", 80, allow_private=False, param="image_url") == "93.184.215.14"
