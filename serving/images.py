"""Image URLs -> RGB PIL images, within limits.

``data:image/...;base64,...`` URLs are decoded here. Remote ``http(s)`` URLs are
refused unless an entry of the operator's allow-list admits them (no server-side
fetching by default): the same scheme, host and port, and a path under the entry's
(``allowed``: parsed, never a string prefix, so ``https://img.example.com`` does not
admit ``https://img.example.com@evil.test/`` or ``https://img.example.com.evil.test/``);
every other scheme is refused. An allow-listed URL is fetched safely (``fetch``):

- the host is resolved once, and private, loopback, link-local, multicast and reserved
  addresses are refused (unless ``allow_private``), and so are the IPv6 forms that carry an
  IPv4 address to wherever it points (NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4
  ``2002::/16``, Teredo, IPv4-compatible ``::a.b.c.d``); the connection goes to the address
  that was checked, so a second DNS answer cannot point it elsewhere;
- a redirect is followed only to a URL that is itself allow-listed (and passes the same
  address check), at most ``MAX_REDIRECTS`` times;
- the size limit is enforced on ``Content-Length`` and while the body streams, and the
  timeout is one deadline for the whole fetch, redirects included: a watchdog closes the
  connection at the deadline, however slowly the server sends its headers or chunk sizes.

``PixelBudget`` bounds the pixels of all the images of one request together (each image's
size is read from its header, before its pixels are decoded).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
import warnings

from PIL import Image, UnidentifiedImageError

from serving.errors import BadRequest, TooLarge

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# IPv6 ranges whose addresses reach an IPv4 host (or a translator) that ``is_global`` does
# not judge by the embedded address
TUNNELS = tuple(
    ipaddress.ip_network(n)
    for n in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96")
)
MAX_REDIRECTS = 3
CHUNK = 64 * 1024
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def data_url(data: bytes, mime: str = "image/png") -> str:
    """The ``data:`` URL of an image file's bytes (what a client sends inline)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class PixelBudget:
    """The pixels the images of one request may still take (``max_request_pixels``)."""

    def __init__(self, total: int):
        self.total = self.left = total

    def take(self, width: int, height: int, param: str) -> None:
        if width * height > self.left:
            raise TooLarge(
                f"the images and frames of this request total more than {self.total} pixels "
                f"(this one is {width}x{height})",
                param=param,
                code="too_many_pixels",
            )
        self.left -= width * height


def load_image(
    url: str,
    *,
    max_bytes: int,
    max_pixels: int,
    allowed_prefixes: list[str] = (),
    timeout_s: float = 10.0,
    allow_private: bool = False,
    param: str = "image_url",
    budget: PixelBudget | None = None,
) -> Image.Image:
    """Decode a data URL (or fetch an allow-listed remote URL) into an RGB image; its pixels
    are taken from ``budget`` (the request's) before they are decoded."""
    if url[:5].lower() == "data:":
        data = decode_data_url(url, max_bytes=max_bytes, param=param)
    elif url.split(":", 1)[0].lower() in ("http", "https"):
        if not allowed(url, allowed_prefixes):
            raise BadRequest(
                "remote image URLs are not fetched by this server; send the image inline as a "
                "data:image/...;base64 URL",
                param=param,
                code="remote_url_refused",
            )
        data = fetch(
            url,
            max_bytes=max_bytes,
            timeout_s=timeout_s,
            allowed_prefixes=allowed_prefixes,
            allow_private=allow_private,
            param=param,
        )
    else:
        raise BadRequest(
            f"unsupported image URL scheme {url.split(':', 1)[0][:16]!r}; use a data: URL",
            param=param,
        )
    return open_image(data, max_pixels=max_pixels, param=param, budget=budget)


def url_parts(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of an http(s) URL, None if it is not one (or malformed)."""
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower().rstrip(".")
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return None
    if scheme not in ("http", "https") or not host or port is None:
        return None
    return scheme, host, port, parts.path or "/"


def allowed(url: str, prefixes) -> bool:
    """Whether an allow-list entry admits ``url``: the same scheme, host and port, and a path
    equal to the entry's or under it (a path ending without "/" is a directory too)."""
    target = url_parts(url)
    if target is None or parsed_url_has_credentials(url):
        return False
    # a dot segment (plain or percent-encoded) could climb out of the entry's path
    segments = urllib.parse.unquote(target[3]).split("/")
    if "." in segments or ".." in segments:
        return False
    for prefix in prefixes:
        entry = url_parts(prefix)
        if entry is None or entry[:3] != target[:3]:
            continue
        base, path = entry[3], target[3]
        if path == base or path.startswith(base if base.endswith("/") else base + "/"):
            return True
    return False


def parsed_url_has_credentials(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.username is not None or parts.password is not None


def decode_data_url(url: str, *, max_bytes: int, param: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise BadRequest("an inline image must be a data:image/...;base64,... URL", param=param)
    mime = (match["mime"] or "").lower()
    if not mime.startswith("image/"):
        raise BadRequest(f"data URL media type {mime or 'missing'!r} is not an image", param=param)
    payload = url[match.end() :]
    # base64 is 4 characters per 3 bytes: refuse before decoding anything large
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise TooLarge(f"image larger than the limit of {max_bytes} bytes", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"invalid base64 in image data URL: {err}", param=param) from None
    if not data:
        raise BadRequest("empty image data", param=param)
    if len(data) > max_bytes:
        raise TooLarge(f"image of {len(data)} bytes exceeds the limit of {max_bytes}", param=param)
    return data


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_prefixes=(),
    allow_private: bool = False,
    param: str = "image_url",
) -> bytes:
    """GET an allow-listed URL safely (see the module doc); at most ``max_bytes`` of body."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        status, headers, body = _get(url, max_bytes, deadline, allow_private, param)
        if status in (301, 302, 303, 307, 308):
            target = urllib.parse.urljoin(url, headers.get("location") or "")
            if not target.lower().startswith(("http://", "https://")) or not allowed(
                target, allowed_prefixes
            ):
                raise BadRequest(
                    "the image URL redirects to a URL outside the allow-list; not followed",
                    param=param,
                    code="remote_url_refused",
                )
            url = target
            continue
        if status != 200:
            raise BadRequest(f"could not fetch the image URL: HTTP {status}", param=param)
        return body
    raise BadRequest(f"the image URL redirects more than {MAX_REDIRECTS} times", param=param)


def _get(url: str, max_bytes: int, deadline: float, allow_private: bool, param: str):
    parts = urllib.parse.urlsplit(url)
    host, scheme = parts.hostname, parts.scheme.lower()
    if not host:
        raise BadRequest("the image URL has no host", param=param)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise BadRequest("the image URL has an invalid port", param=param) from None
    address = _resolve(host, port, allow_private, param)
    conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    conn = conn_cls(host, port, address, timeout=_left(deadline, param))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # socket timeouts bound each read, not their sum: at the deadline the watchdog shuts
    # the connection, which ends any read in progress (headers, chunk sizes, body)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(_left(deadline, param), expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "gazeattn"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.headers, b""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise TooLarge(
                f"image of {declared} bytes exceeds the limit of {max_bytes}", param=param
            )
        chunks, size = [], 0
        while not resp.isclosed():
            _left(deadline, param)
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(f"image larger than the limit of {max_bytes} bytes", param=param)
            chunks.append(chunk)
        if expired.is_set():
            raise TimeoutError
        return 200, resp.headers, b"".join(chunks)
    except (OSError, http.client.HTTPException, ValueError) as err:
        if expired.is_set() or isinstance(err, TimeoutError | socket.timeout):
            raise BadRequest("fetching the image URL timed out", param=param) from None
        raise BadRequest(f"could not fetch the image URL: {err}", param=param) from None
    finally:
        watchdog.cancel()
        conn.close()


def _left(deadline: float, param: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BadRequest("fetching the image URL timed out", param=param)
    return left


def _resolve(host: str, port: int, allow_private: bool, param: str) -> str:
    """The address to connect to; every address the name resolves to must be public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise BadRequest(f"could not resolve the image URL's host: {err}", param=param) from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            tunnel = isinstance(ip, ipaddress.IPv6Address) and any(ip in n for n in TUNNELS)
            if tunnel or not ip.is_global or ip.is_multicast:
                raise BadRequest(
                    f"the image URL's host resolves to a non-public address ({ip}); refused",
                    param=param,
                    code="remote_url_refused",
                )
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def open_image(
    data: bytes, *, max_pixels: int, param: str, budget: PixelBudget | None = None
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            # the header gives the size: refuse huge images before decoding their pixels
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels",
                    param=param,
                )
            if budget is not None:
                budget.take(width, height, param)
            image.load()
            return image.convert("RGB")
    except TooLarge:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise BadRequest(
            f"not a decodable image ({', '.join(FORMATS)}): {err}", param=param
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadRequest(f"corrupt image data: {err}", param=param) from None
