"""One encoded sample: what ``GazeProcessor.encode_sample`` makes of a conversation and what
everything downstream takes (collation, the engine, generation, the data pipeline).

Its ``parts`` are the region layout's own sequence spec (``gazeattn.ops``): an int is that
many text tokens, ``Image`` / ``Video`` a media item's token grid, in sequence order, summing
to the token count. ``arrow_fields`` / ``arrow_row`` / ``from_arrow`` are the one
serialisation of samples into Arrow blocks (Ray Data's batches): token ids and labels as
int64 lists, the pixel inputs as one ``.npz`` blob (no pickling), the parts as JSON.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from gazeattn.ops import Image, Video
from gazeattn.ops.layout import Part

IGNORE = -100  # labels of tokens that are not learned (transformers' ignore index)


@dataclass(kw_only=True)
class EncodedSample:
    """Token ids, labels, the family's pixel inputs and the layout parts of one sequence.

    ``sample_id`` names where a sample of the data pipeline came from (its tar and key);
    ``truncated`` says that the length policy cut its trailing text."""

    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T]: the token where it is learned, else IGNORE
    vision: dict[str, np.ndarray]  # model input name -> array (pixel_values, grids, ...)
    parts: list[Part]  # the layout's parts (text runs, media grids; context tokens implied)
    sample_id: str | None = None
    truncated: bool = False
    # (length, content digest) of its cacheable visual prefix, once computed
    # (``gazeattn.prefix_cache.visual_prefix``; a server computes it where it encodes)
    prefix: tuple[int, str] | None = None
    # each media item's content digest (``gazeattn.media_cache.media_key``), where the
    # processor that encoded it had a media cache
    media_keys: tuple[str, ...] | None = None
    # its pixel inputs were left out (``without_pixels``): it prefills only on its cached
    # visual prefix, which never reads them
    pixels_dropped: bool = False

    def __post_init__(self):
        if len(self.labels) != len(self.input_ids):
            raise ValueError(f"{len(self.input_ids)} token ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def grids(self) -> list[list[int]]:
        """[t, h, w] of each media item in order (t = 1 for an image)."""
        return [[p.t, p.h, p.w] if isinstance(p, Video) else [1, p.h, p.w] for p in self.media]

    @property
    def media(self) -> list[Image | Video]:
        return [p for p in self.parts if not isinstance(p, int)]

    def without_pixels(self, names: tuple[str, ...]) -> EncodedSample:
        """This sample without its pixel inputs ``names`` (``MediaRules.pixel_names``; their
        grids stay): what a server sends to its engine when the prompt's visual prefix is
        cached, as a prefill on that prefix reads none of them."""
        vision = {k: v for k, v in self.vision.items() if k not in names}
        return replace(self, vision=vision, pixels_dropped=True)

    def followed_by(self, tokens: list[int]) -> EncodedSample:
        """This sample with ``tokens`` of text after it (e.g. generated ones), not learned."""
        tail = self.parts[-1] if self.parts and isinstance(self.parts[-1], int) else 0
        parts = self.parts[:-1] if tail else self.parts
        return replace(
            self,
            input_ids=np.concatenate([self.input_ids, np.asarray(tokens, np.int64)]),
            labels=np.concatenate([self.labels, np.full(len(tokens), IGNORE, np.int64)]),
            parts=[*parts, tail + len(tokens)],
            prefix=None,
        )

    def truncated_to(self, length: int) -> EncodedSample:
        """The first ``length`` tokens, cut in the trailing text run (ValueError where that
        run is shorter than the cut: a media item is never cut)."""
        cut = len(self) - length
        if cut <= 0:
            return self
        tail = self.parts[-1] if self.parts and isinstance(self.parts[-1], int) else 0
        if cut >= tail:
            raise ValueError(f"{len(self)} tokens cannot be cut to {length} in the trailing text")
        return replace(
            self,
            input_ids=self.input_ids[:length],
            labels=self.labels[:length],
            parts=[*self.parts[:-1], tail - cut],
            truncated=True,
            prefix=None,
        )

    # ---- Arrow blocks

    @staticmethod
    def arrow_fields() -> list:
        import pyarrow as pa

        return [
            ("input_ids", pa.list_(pa.int64())),
            ("labels", pa.list_(pa.int64())),
            ("vision", pa.binary()),  # the pixel inputs (name -> array) as .npz
            ("parts", pa.string()),  # the parts as JSON
        ]

    def arrow_row(self) -> dict:
        """This sample's values of ``arrow_fields``."""
        return {
            "input_ids": self.input_ids.tolist(),
            "labels": self.labels.tolist(),
            "vision": pack_arrays(self.vision),
            "parts": json.dumps([part_json(p) for p in self.parts]),
        }

    @classmethod
    def from_arrow(cls, table, ids: list[str] | None = None) -> Iterator[EncodedSample]:
        """The samples of a table with ``arrow_fields`` (read from its buffers, without a
        Python list of every token); ``ids`` their sample ids."""
        tokens = table.column("input_ids").combine_chunks()
        labels = table.column("labels").combine_chunks()
        vision = table.column("vision").to_pylist()
        parts = table.column("parts").to_pylist()
        offsets = tokens.offsets.to_numpy()
        flat_ids, flat_labels = tokens.values.to_numpy(), labels.values.to_numpy()
        for i in range(len(table)):
            start, end = offsets[i], offsets[i + 1]
            yield cls(
                # copies: Arrow buffers are read-only and torch wants writable arrays
                input_ids=flat_ids[start:end].copy(),
                labels=flat_labels[start:end].copy(),
                vision=unpack_arrays(vision[i]),
                parts=[part_of_json(p) for p in json.loads(parts[i])],
                sample_id=ids[i] if ids is not None else None,
            )


def part_json(part: Part) -> list:
    """``["text", n]``, ``["image", h, w(, lead)]`` or ``["video", t, h, w(, lead)]``."""
    if isinstance(part, int):
        return ["text", part]
    base = (
        ["image", part.h, part.w] if isinstance(part, Image) else ["video", part.t, part.h, part.w]
    )
    return base + ([part.lead] if part.lead else [])


def part_of_json(value: list) -> Part:
    kind, *n = value
    if kind == "text" and len(n) == 1:
        return int(n[0])
    if kind == "image" and len(n) in (2, 3):
        return Image(int(n[0]), int(n[1]), lead=int(n[2]) if len(n) > 2 else 0)
    if kind == "video" and len(n) in (3, 4):
        return Video(int(n[0]), int(n[1]), int(n[2]), lead=int(n[3]) if len(n) > 3 else 0)
    raise ValueError(f"not a sample part: {value!r}")


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays -> .npz bytes (no pickling)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
