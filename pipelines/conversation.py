"""LLaVA-style conversations -> the processor's chat messages.

``{"from": "human"|"gpt"|"system", "value": "<image>\\nWhat ..."}`` turns become
``{"role": "user"|"assistant"|"system", "content": [parts]}`` with an
``{"type": "image"}``/``{"type": "video"}`` part where each marker was. The newline
that LLaVA data puts after (or before) a marker goes with it: the model's chat
template writes its own separator around media.
"""

from __future__ import annotations

import re

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES["system"] = "system"
MARKER = re.compile(r"(<image>|<video>)")


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns -> messages; raises ValueError on an unknown speaker."""
    messages = []
    for turn in conversations:
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r}")
        parts = []
        pieces = MARKER.split(turn["value"])
        for i, piece in enumerate(pieces):
            if piece in ("<image>", "<video>"):
                parts.append({"type": piece[1:-1]})
                continue
            if i > 0 and piece.startswith("\n"):
                piece = piece[1:]
            if i + 1 < len(pieces) and piece.endswith("\n"):
                piece = piece[:-1]
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts or [{"type": "text", "text": ""}]})
    return messages


def add_dummy_image(messages: list[dict]) -> list[dict]:
    """An image part at the start of the first user turn (or a new first user turn)."""
    out = [dict(m) for m in messages]
    for message in out:
        if message["role"] == "user":
            message["content"] = [{"type": "image"}, *message["content"]]
            return out
    return [{"role": "user", "content": [{"type": "image"}]}, *out]
