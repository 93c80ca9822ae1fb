"""Incremental detokenisation with stop strings: what a process may stream, and where it ends."""

from __future__ import annotations

from typing import Any, Sequence


REDECODE_CONTEXT = 4  # tokens kept as decoding context after a full re-decode
PROMPT_CONTEXT = 6  # prompt tokens the output is decoded after (vLLM's incremental detokeniser starts with 5)


def silent_tokens(tokenizer: Any) -> dict[str, int]:
    """Text -> id of every special or added token that decodes to nothing when special tokens are
    skipped (``<|im_end|>``, ``</s>``...): a stop string equal to one of these can never match the
    output text, so the engine stops on the token id instead."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids.update(getattr(tokenizer, "added_tokens_decoder", None) or {})
    out: dict[str, int] = {}
    for i in sorted(ids):
        text = tokenizer.convert_ids_to_tokens(i)
        if isinstance(text, str) and text and text not in out and _decode(tokenizer, [i]) == "":
            out[text] = i
    return out


def split_stops(stop: Sequence[str], silent: dict[str, int]) -> tuple[list[str], list[int]]:
    """Stop strings -> (strings matched in the text, token ids for those that are a silent token's text)."""
    strings = [s for s in stop if s and s not in silent]
    return strings, [silent[s] for s in stop if s in silent]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextTracker:
    """Turns a growing list of token ids into streamable text deltas.

    Invariant: the concatenation of every delta returned equals the final text. Text that could
    still turn out to be the start of a stop string, or an incomplete UTF-8 sequence, is held
    back until it is decided.

    The output is decoded after the last ``PROMPT_CONTEXT`` prompt tokens, so that
    ``decode(prompt) + text == decode(prompt + output)``: a SentencePiece (Metaspace) decoder keeps
    the first word's leading space, a WordPiece continuation joins the prompt's last word. A prompt
    that ends inside a multi-byte character completed by the output: that character opens the output
    (prompt ids ending with byte 0xE4, output bytes 0xB8 0xAD " value" give "中 value"), since the
    prompt's own text could only show it as U+FFFD.
    """

    def __init__(self, tokenizer: Any, stop: list[str], prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters of the text already streamed
        self.text = ""  # the text so far (truncated at a stop string); may end in an incomplete character
        self.stopped = False
        # incremental decoding over ids = context + generated: ids[:read] are decided and gave
        # ``_committed`` (output text only); each update decodes only ids[prefix:], where ids[prefix:read] is
        # a little context so a token's leading space or merge with its neighbour decodes as it would in the
        # full text. The prompt's tail is the first context; a partial character at its end is not decided.
        self._context = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self._base = self._decode(self._context).rstrip("\ufffd")
        self._committed = ""
        self._prefix = 0
        self._read = len(self._context)

    def update(self, token_ids: list[int]) -> str:
        """Take ``token_ids`` (all generated so far); return the new streamable text.

        Costs O(new tokens), not O(all tokens): only the tail past the last decided token is decoded.
        The text is decoded without transformers' clean-up of spaces before punctuation, which looks
        across token boundaries and would rewrite text already streamed.
        """
        n = len(self._context) + len(token_ids)
        if self._read == len(self._context) and self._prefix == 0:
            before = self._base
        else:
            before = self._decode(self._ids(token_ids, self._prefix, self._read))
        after = self._decode(self._ids(token_ids, self._prefix, n))
        if after.startswith(before):
            text = self._committed + after[len(before):]
            # decided when the tail adds text and ends on a whole character (a skipped special token adds
            # none, and must not become the only context of the next window)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self._committed, self._prefix, self._read = text, self._read, n
        else:  # the new tokens rewrote their context: decode everything once, and go on from there
            full = self._decode(self._context + list(token_ids))
            text = full[len(self._base):] if full.startswith(self._base) else self._decode(list(token_ids))
            if not text.endswith("\ufffd"):
                self._committed, self._read = text, n
                self._prefix = max(0, self._read - REDECODE_CONTEXT)
        cut = self._first_stop(text)
        if cut is not None:
            text = text[:cut]
            self.stopped = True
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        end = len(text) - self.hold
        while end > self.emitted and text[end - 1] == "\ufffd":  # incomplete multi-byte char
            end -= 1
        return self._emit(end)

    def _ids(self, generated: list[int], lo: int, hi: int) -> list[int]:
        """(context + generated)[lo:hi] without copying the whole list."""
        c = len(self._context)
        return self._context[lo:hi] + list(generated[max(0, lo - c):max(0, hi - c)])

    def _first_stop(self, text: str) -> int | None:
        """Where the text ends: at the stop string whose match completes first, as if the text had
        arrived one character at a time (the earliest end; on a tie, the earliest start), whatever
        the order of the stop list and however the text was split into tokens."""
        best: tuple[int, int] | None = None
        for s in self.stop:
            idx = text.find(s, max(0, self.emitted - len(s)))
            if idx != -1 and (best is None or (idx + len(s), idx) < best):
                best = (idx + len(s), idx)
        return None if best is None else best[1]

    def _decode(self, ids: list[int]) -> str:
        return _decode(self.tokenizer, ids)

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
