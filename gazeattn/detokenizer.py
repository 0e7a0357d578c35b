"""The engine's detokenizer: the text a sequence may emit after each new token.

Text is emitted as it is decoded, except what could still become one of the request's stop
strings (held back until it cannot) and a partial UTF-8 character; a stop string ends the
sequence and never reaches the output, streamed or not.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, processor):
        self.processor = processor

    def delta(self, seq) -> str:
        """The new text of ``seq`` (the engine's sequence; its ``sent``, ``final``, ``done``
        and ``finish_reason`` are updated): held back while it could still be the start of a
        stop string; cut before a stop string (which then ends the sequence)."""
        text = self.processor.decode(seq.tokens)
        stops = [s for s in seq.request.stop if s]
        found = [text.find(s, max(len(seq.sent) - len(s) + 1, 0)) for s in stops]
        hits = [i for i in found if i >= 0]
        if hits:
            text = text[: min(hits)]
            seq.done, seq.finish_reason = True, "stop"
        elif not seq.done:
            hold = max((len(s) for s in stops), default=1) - 1
            # a partial UTF-8 character decodes as U+FFFD until its last byte arrives
            while text.endswith("\ufffd"):
                text = text[:-1]
            text = text[: len(text) - hold] if hold else text
        if seq.done:
            # the result's text; the same as what was streamed unless decoding more tokens
            # rewrote earlier characters (then the result is the exact one)
            seq.final = text
        if not text.startswith(seq.sent) or len(text) <= len(seq.sent):
            return ""
        delta = text[len(seq.sent) :]
        seq.sent = text
        return delta
