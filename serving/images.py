"""Image URLs -> RGB PIL images, within limits.

``data:image/...;base64,...`` URLs are decoded here. Remote ``http(s)`` URLs are
refused unless they start with a prefix of the operator's allow-list (no
server-side fetching by default); every other scheme is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
import warnings

from PIL import Image, UnidentifiedImageError

from serving.errors import BadRequest, TooLarge

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def data_url(data: bytes, mime: str = "image/png") -> str:
    """The ``data:`` URL of an image file's bytes (what a client sends inline)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def load_image(
    url: str,
    *,
    max_bytes: int,
    max_pixels: int,
    allowed_prefixes: list[str] = (),
    timeout_s: float = 10.0,
    param: str = "image_url",
) -> Image.Image:
    """Decode a data URL (or fetch an allow-listed remote URL) into an RGB image."""
    if url[:5].lower() == "data:":
        data = decode_data_url(url, max_bytes=max_bytes, param=param)
    elif url.split(":", 1)[0].lower() in ("http", "https"):
        if not any(url.startswith(prefix) for prefix in allowed_prefixes):
            raise BadRequest(
                "remote image URLs are not fetched by this server; send the image inline as a "
                "data:image/...;base64 URL",
                param=param,
                code="remote_url_refused",
            )
        data = fetch(url, max_bytes=max_bytes, timeout_s=timeout_s, param=param)
    else:
        raise BadRequest(
            f"unsupported image URL scheme {url.split(':', 1)[0][:16]!r}; use a data: URL",
            param=param,
        )
    return open_image(data, max_pixels=max_pixels, param=param)


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


def fetch(url: str, *, max_bytes: int, timeout_s: float, param: str) -> bytes:
    """GET an allow-listed URL, reading at most ``max_bytes`` (+1 to detect more)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - allow-listed
            data = resp.read(max_bytes + 1)
    except OSError as err:
        raise BadRequest(f"could not fetch the image URL: {err}", param=param) from None
    if len(data) > max_bytes:
        raise TooLarge(f"image larger than the limit of {max_bytes} bytes", param=param)
    return data


def open_image(data: bytes, *, max_pixels: int, param: str) -> Image.Image:
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
