"""Prefix caching for visual prompts: requests that share their images or video (and the text
before them) reuse the prefilled prefix instead of prefilling it again.

The prefix of a prompt ends after its last image or video (its context tokens included):
what several questions about one picture, a chat about one video or an agent's repeated
screenshot share. Its key is the content, not a URL: the token ids up to there, every pixel
input's bytes, and the model's gaze settings (they change the prefix's hidden states). An
entry is the decode cache after prefilling the prefix alone: every layer's keys and values
(and a hybrid decoder's recurrent states), the region descriptors and the rotary deltas (a
stock model's entry is a transformers ``DynamicCache``; its suffix takes the whole prompt's
positions, ``gazeattn.runner``).

A prompt whose prefix is cached prefills only its suffix on a copy of the entry (whose keys
and values are the entry's own tensors: ``_private_copy``); one whose
prefix is not prefills the prefix, stores it, and prefills the suffix the same way, so a
sequence's output is the same with and without a hit (bitwise: the same computation).

The cache holds at most ``budget_bytes`` (least recently used entries go first). A running
sequence never holds an entry: its prefill copies the entry into the batch, so eviction
cannot reach it. A prefix larger than the whole budget is not stored (served uncached).

A server leaves a prompt's pixel inputs out when its prefix is cached (a prefill on the
prefix never reads them; a long video's are tens of MB to move between processes). Such a
sequence holds its entry (``hold``) from then until its prefill, which takes the held entry
when an eviction has removed it from the cache meanwhile: for that while an evicted entry
may outlive the budget. Stored and evicted on the engine's scheduler thread; ``hold``,
``keys`` and ``stats`` may be called from any thread.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from gazeattn.ops.layout import GazeLayout, TokenKind
from gazeattn.sample import EncodedSample


@dataclass(kw_only=True)
class PrefixStats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0  # prompt tokens served from the cache (summed over hits)
    bytes: int = 0  # held now
    entries: int = 0
    evictions: int = 0


@dataclass(kw_only=True)
class _Entry:
    cache: object  # the decode cache after the prefix (never handed out: copies are)
    length: int
    bytes: int


@dataclass(frozen=True)
class CachedPrefixes:
    """The keys an engine's prefix cache holds at one moment and the model settings they
    hash (``prefix_key``): whether a prompt's prefix is among them, where it was encoded."""

    settings: str
    keys: frozenset[str]

    def __contains__(self, digest: str) -> bool:
        """Whether the prefix of content ``digest`` (``visual_prefix``) is among them."""
        return bool(digest) and prefix_key(digest, self.settings) in self.keys


@dataclass(frozen=True)
class PrefixHold:
    """An entry held by a sequence until its prefill (``PrefixCache.hold``)."""

    key: str
    entry: _Entry


class PrefixCache:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._stats = PrefixStats()
        self._lock = threading.Lock()

    @property
    def stats(self) -> PrefixStats:
        with self._lock:
            return copy.copy(self._stats)

    def get(self, key: str, held: PrefixHold | None = None):
        """A private copy of the cache stored under ``key`` (None on a miss), counted; from
        ``held`` (``hold``'s) when the entry was evicted since."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None and held is not None and held.key == key:
                entry = held.entry
            if entry is None:
                self._stats.misses += 1
                return None
            if key in self._entries:
                self._entries.move_to_end(key)
            self._stats.hits += 1
            self._stats.cached_tokens += entry.length
        return _private_copy(entry.cache)

    def hold(self, key: str) -> PrefixHold | None:
        """A reference to the entry under ``key`` that an eviction cannot take (None when
        there is none): for ``get`` at the prefill of a sequence without its pixel inputs.
        Not counted as a lookup; the entry becomes the most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        return PrefixHold(key=key, entry=entry)

    def keys(self) -> frozenset[str]:
        """The keys stored now."""
        with self._lock:
            return frozenset(self._entries)

    def holds(self, key: str) -> bool:
        """Whether ``key`` is stored now (not counted as a lookup)."""
        with self._lock:
            return key in self._entries

    def put(self, key: str, cache, length: int) -> bool:
        """Store a copy of ``cache`` (the state after ``length`` prefix tokens); False when it
        is larger than the whole budget (then nothing is evicted for it)."""
        size = cache_bytes(cache)
        if size > self.budget_bytes:
            return False
        entry = _Entry(cache=copy.deepcopy(cache), length=length, bytes=size)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._stats.bytes -= old.bytes
            while self._entries and self._stats.bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._stats.bytes -= evicted.bytes
                self._stats.evictions += 1
            self._entries[key] = entry
            self._stats.bytes += size
            self._stats.entries = len(self._entries)
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._stats.bytes, self._stats.entries = 0, 0


def _private_copy(cache):
    """A copy of an entry's ``cache`` that a prefill may extend without changing the entry.

    Its attention layers' keys and values are the entry's tensors, not copies: transformers'
    ``DynamicLayer`` (exactly that class) extends them by concatenation into new tensors and
    never writes the old ones, and a copy of a long video's keys is tens of MB per hit.
    Everything else is copied: a hybrid decoder's recurrent states (updated in place), the
    gaze state."""
    shared = {}
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer and layer.is_initialized:
            shared[id(layer.keys)], shared[id(layer.values)] = layer.keys, layer.values
    return copy.deepcopy(cache, shared)


def prefix_length(layout: GazeLayout) -> int:
    """Tokens of the layout's (one) sequence up to the end of its last image or video, its
    context tokens included (0 without media)."""
    media = (layout.kinds[0] != TokenKind.TEXT).nonzero()
    return int(media[-1]) + 1 if len(media) else 0


def visual_prefix(sample: EncodedSample, processor) -> tuple[int, str]:
    """(length, content digest) of the sample's cacheable prefix: its tokens up to the end of
    its last image or video (``prefix_length``) and every pixel input it has (they belong to
    media in the prefix); the digest is "" when the prompt has no media or no text after it.

    Hashing every frame's pixels is tens of milliseconds for a long video: it is computed
    once and kept on the sample (``sample.prefix``), so a server computes it where it encodes
    the request, not on the engine's scheduler thread. A processor with a media cache
    (``gazeattn.media_cache``, a server's preparing process) computes it once per prefix ids
    and media content: the same pixel inputs (its media's keys say so), the same digest."""
    if sample.prefix is None:
        if sample.pixels_dropped:
            raise ValueError("a sample without its pixel inputs has no prefix digest of its own")
        length = prefix_length(processor.layout_of([sample.parts]))
        digest = ""
        if 0 < length < len(sample):
            ids = np.ascontiguousarray(sample.input_ids[:length], np.int64).tobytes()

            def compute() -> str:
                content = hashlib.blake2b(digest_size=20)
                content.update(ids)
                for name in sorted(sample.vision):
                    array = np.ascontiguousarray(sample.vision[name])
                    content.update(f"{name}:{array.dtype}:{array.shape}".encode())
                    content.update(array)  # its buffer, as tobytes() would give it, uncopied
                return content.hexdigest()

            media = getattr(processor, "media_cache", None)
            if media is not None and sample.media_keys is not None:
                # the same ids and media (by content): the same pixel inputs, hashed once
                key = (hashlib.blake2b(ids, digest_size=20).hexdigest(), sample.media_keys)
                digest = media.prefix_digest(key, compute)
            else:
                digest = compute()
        sample.prefix = (length, digest)
    return sample.prefix


def prefix_key(digest: str, settings: str) -> str:
    """The cache key of a prefix of content ``digest`` (``visual_prefix``) under the model's
    ``settings`` (they change its hidden states)."""
    return hashlib.blake2b(f"{settings}\n{digest}".encode(), digest_size=20).hexdigest()


def cache_bytes(cache) -> int:
    """Bytes of the tensors a decode cache holds (its layers' and its gaze state's)."""
    seen: set[int] = set()
    total = 0

    def add(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)

    for layer in getattr(cache, "layers", ()):
        add(list(vars(layer).values()))
    state = getattr(cache, "gaze_state", None)
    if state is not None:
        add(state.descriptors)
        add(state.rope_deltas)
    return total
