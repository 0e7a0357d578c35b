"""Processed images and videos by content: what a server's processor has already computed.

Many requests send the same picture or video (users asking about one video, an agent's
repeated screenshot). Their image processing (resize, normalise: about 60 ms for a
16-frame video on our CPUs) and the hash of their pixel inputs for the prefix cache (about
40 ms) are the same every time. A ``MediaCache`` on a ``GazeProcessor``
(``processor.media_cache``) keeps both, as vLLM's multimodal processor cache does:

- ``media``: a processed item (``families.media.Media``) under the digest of what the
  processing reads: its RGB frames' pixels, their timing, and the visual budget. The
  processor (one per cache) and those decide the result, so a hit is the same arrays.
- ``prefix_digest``: ``prefix_cache.visual_prefix``'s digest under the sample's prefix ids
  and its media's digests, which decide the pixel inputs it hashes: computed once.

Bounded by ``max_bytes`` (the arrays held; least recently used out first; an item larger
than the whole budget is processed and not kept). Hits hand out the same arrays: nothing
downstream writes them (``encode_sample`` concatenates them into the sample's own). Not
thread-safe: a preparing process uses its processor from one thread.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(kw_only=True)
class MediaCacheStats:
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    entries: int = 0


class MediaCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.stats = MediaCacheStats()
        self._media: OrderedDict[str, tuple[object, int]] = OrderedDict()  # (item, bytes)
        self._digests: OrderedDict[tuple, str] = OrderedDict()

    def media(self, key: str, process: Callable[[], object]):
        """The processed item under ``key`` (``media_key``), or ``process()`` kept under it."""
        found = self._media.get(key)
        if found is not None:
            self._media.move_to_end(key)
            self.stats.hits += 1
            return found[0]
        self.stats.misses += 1
        media = process()
        size = sum(a.nbytes for a in media.arrays.values())
        if size <= self.max_bytes:
            while self.stats.bytes + size > self.max_bytes:
                _, (_, evicted) = self._media.popitem(last=False)
                self.stats.bytes -= evicted
            self._media[key] = (media, size)
            self.stats.bytes += size
        self.stats.entries = len(self._media)
        return media

    def prefix_digest(self, key: tuple, compute: Callable[[], str]) -> str:
        """``compute()`` once per ``key`` (the prefix's ids and media digests); the last
        thousand are kept (a digest is 40 characters)."""
        found = self._digests.get(key)
        if found is None:
            found = self._digests[key] = compute()
            if len(self._digests) > 1000:
                self._digests.popitem(last=False)
        self._digests.move_to_end(key)
        return found


def media_key(kind: str, frames: list, budget, timing: tuple = ()) -> str:
    """The digest of what processing an image or a video reads: its RGB frames (PIL images)
    with their sizes, its timing (a clip's fps and frame indices) and the visual budget."""
    content = hashlib.blake2b(digest_size=20)
    content.update(f"{kind}|{budget!r}|{timing!r}|{len(frames)}".encode())
    for frame in frames:
        content.update(f"|{frame.mode}:{frame.size}".encode())
        content.update(frame.tobytes())
    return content.hexdigest()
