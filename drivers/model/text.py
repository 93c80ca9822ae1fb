"""Incremental detokenisation with stop strings: what a process may stream, and where it ends."""

from __future__ import annotations

from typing import Any


REDECODE_CONTEXT = 4  # tokens kept as decoding context after a full re-decode


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
        self.text = ""  # the text so far (truncated at a stop string); may end in an incomplete character
        self.stopped = False
        # incremental decoding: ids[:read] are decided and gave ``_committed``; each update decodes only
        # ids[prefix:], where ids[prefix:read] is a little context so a token's leading space or merge
        # with its neighbour decodes as it would in the full text
        self._committed = ""
        self._prefix = 0
        self._read = 0

    def update(self, token_ids: list[int]) -> str:
        """Take ``token_ids`` (all generated so far); return the new streamable text.

        Costs O(new tokens), not O(all tokens): only the tail past the last decided token is decoded.
        The text is decoded without transformers' clean-up of spaces before punctuation, which looks
        across token boundaries and would rewrite text already streamed.
        """
        before = self._decode(token_ids[self._prefix:self._read]) if self._read else ""
        after = self._decode(token_ids[self._prefix:])
        if after.startswith(before):
            text = self._committed + after[len(before):]
            # decided when the tail adds text and ends on a whole character (a skipped special token adds
            # none, and must not become the only context of the next window)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self._committed, self._prefix, self._read = text, self._read, len(token_ids)
        else:  # the new tokens rewrote their context: decode everything once, and go on from there
            text = self._decode(token_ids)
            if not text.endswith("\ufffd"):
                self._committed, self._read = text, len(token_ids)
                self._prefix = max(0, self._read - REDECODE_CONTEXT)
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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

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
