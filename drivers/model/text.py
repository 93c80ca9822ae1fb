"""Incremental detokenisation with stop strings: what a process may stream, and where it ends."""

from __future__ import annotations

from typing import Any


class TextTracker:
    """Turns a growing list of token ids into streamable text deltas.

    Invariant: the concatenation of every delta returned equals the final text. Text that could
    still turn out to be the start of a stop string, or an incomplete UTF-8 sequence, is held
    back until it is decided.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters of the text already streamed
        self.text = ""
        self.stopped = False

    def update(self, token_ids: list[int]) -> str:
        """Decode ``token_ids`` (all generated so far); return the new streamable text."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for s in self.stop:
            idx = text.find(s, max(0, self.emitted - len(s)))
            if idx != -1:
                text = text[:idx]
                self.stopped = True
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        end = len(text) - self.hold
        while end > self.emitted and text[end - 1] == "\ufffd":  # incomplete multi-byte char
            end -= 1
        return self._emit(end)

    def finish(self) -> str:
        """The process ended: release everything held back (dropping a dangling partial char)."""
        if self.text.endswith("\ufffd"):
            self.text = self.text.rstrip("\ufffd")
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
