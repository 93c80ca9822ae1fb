"""Incremental detokenisation with stop strings: what a process may stream, and where it ends."""

from __future__ import annotations

import codecs
import re
import weakref
from typing import Any, Sequence

PROMPT_CONTEXT = 6  # prompt tokens the output is decoded after (vLLM's incremental detokeniser starts with 5)
PENDING_TOKENS = 4  # an incomplete UTF-8 character (at most 3 of its 4 bytes) spans at most this many tokens
PENDING_WINDOW = 64  # trailing tokens searched for those bytes (special tokens between them add none)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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


def _gpt2_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: character -> the byte it stands for."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            chars.append(chr(256 + len(chars) - 188))
    return dict(zip(chars, bs))


class TokenBytes:
    """The bytes behind token ids, for tokenizers whose tokens can hold part of a character:
    byte-level BPE (GPT-2, Llama-3, Qwen: every token is bytes) and SentencePiece byte fallback
    (Llama-2, Mistral, Gemma: ``<0xE4>``). :meth:`pending` tells exactly how many trailing tokens
    hold an incomplete character, which decoding alone cannot tell from a genuine U+FFFD."""

    def __init__(self, tokenizer: Any, byte_level: bool) -> None:
        self.tokenizer = tokenizer
        self.alphabet = _gpt2_alphabet() if byte_level else None
        self.special = set(getattr(tokenizer, "all_special_ids", None) or ())  # skipped when decoding...
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special.update(i for i, t in added.items() if getattr(t, "special", False))  # ...as these are
        self.added = {i: str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, bytes] = {}

    @staticmethod
    def of(tokenizer: Any) -> TokenBytes | None:
        """The byte view of ``tokenizer`` (made once per tokenizer), or None when it is neither
        byte-level nor byte fallback (its text then never holds a partial character we can see)."""
        try:
            view = _byte_views.get(tokenizer)
        except TypeError:  # not weakly referenceable
            view = None
        if view is None:
            view = False
            try:
                if tokenizer.convert_tokens_to_string(["Ã", "©"]) == "é":  # bytes C3 A9 in byte-level spelling
                    view = TokenBytes(tokenizer, byte_level=True)
                elif tokenizer.convert_tokens_to_string(["<0xC3>", "<0xA9>"]) == "é":
                    view = TokenBytes(tokenizer, byte_level=False)
            except Exception:
                view = False
            try:
                _byte_views[tokenizer] = view
            except TypeError:
                pass
        return view or None

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to a decoded text (none for a special token, skipped)."""
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def _bytes(self, i: int) -> bytes:
        if i in self.special:
            return b""
        if i in self.added:
            return self.added[i].encode()
        tok = self.tokenizer.convert_ids_to_tokens(i)
        if not isinstance(tok, str):
            return b""  # an id outside the vocabulary decodes to nothing
        if self.alphabet is not None:
            return bytes(self.alphabet[c] for c in tok) if all(c in self.alphabet for c in tok) else tok.encode()
        m = _BYTE_TOKEN.fullmatch(tok)
        return bytes([int(m[1], 16)]) if m else tok.encode()  # a piece of whole characters

    def pending(self, ids: Sequence[int]) -> int:
        """How many trailing ``ids`` hold a character whose remaining bytes are still to come (0: none)."""
        tail: list[bytes] = []
        size = 0
        for i in reversed(ids[-PENDING_WINDOW:]):
            if size >= 4:  # the lead byte of any incomplete character is among these
                break
            tail.append(self.bytes_of(i))
            size += len(tail[-1])
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(reversed(tail)), final=False)
        left = len(decoder.getstate()[0])  # bytes of a character begun and not finished
        count = 0
        while left > 0 and count < len(tail):
            left -= len(tail[count])
            count += 1
        return count


_byte_views: weakref.WeakKeyDictionary[Any, TokenBytes | bool] = weakref.WeakKeyDictionary()


class TextTracker:
    """Turns a growing list of token ids into streamable text deltas.

    Invariant: the concatenation of every delta returned equals the final text, always. Text is
    *decided* once no later token can change it; only decided text is streamed, searched for stop
    strings, and kept as ``text``, which only ever grows (until a stop string cuts what was not
    yet streamed). A character whose bytes are still coming (byte tokens) is not decided: it never
    matches a stop string (not even "\\ufffd"), and a process that ends inside one drops it. A
    genuine U+FFFD in the output is text like any other. Text that could still turn out to be the
    start of a stop string is held back until that is decided too.

    The output is decoded after the last ``PROMPT_CONTEXT`` prompt tokens, so that
    ``decode(prompt) + text == decode(prompt + output)``: a SentencePiece (Metaspace) decoder keeps
    the first word's leading space, a WordPiece continuation joins the prompt's last word. A prompt
    that ends inside a multi-byte character completed by the output: that character opens the output
    (prompt ids ending with byte 0xE4, output bytes 0xB8 0xAD " value" give "中 value"), since the
    prompt's own text could only show it as U+FFFD.

    Where the decoder rewrites decided text when new tokens arrive (SentencePiece byte fallback
    decodes a run of byte tokens all at once, and one invalid byte turns the whole run, a newline
    already streamed included, into U+FFFDs), the decided text stays and the new tokens are decoded
    with less of the context before them, down to none.
    """

    def __init__(self, tokenizer: Any, stop: list[str], prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters of the text already streamed
        self.text = ""  # the decided output text (cut at a stop string)
        self.stopped = False
        self._bytes = TokenBytes.of(tokenizer)
        self._generated: Sequence[int] = ()
        # Incremental decoding over ids = context + generated: ids[:read] are decided and gave ``text``
        # (the output's part of it). Each update decodes only ids[prefix:], where ids[prefix:read] is a
        # little context so that a token's leading space or merge with its neighbour decodes as in the
        # whole text. The prompt's tail is the first context, less a partial character at its end.
        self._context = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix = 0
        c = len(self._context)
        if self._bytes is not None:
            self._read = c - self._bytes.pending(self._context)
        else:
            self._read = next(c - k for k in range(min(PENDING_TOKENS, c) + 1)
                              if k == c or not self._decode(self._context[:c - k]).endswith("\ufffd"))

    def update(self, token_ids: Sequence[int]) -> str:
        """Take ``token_ids`` (all generated so far); return the new streamable text.

        Costs O(new tokens), not O(all tokens): only the tail past the last decided token is decoded.
        The text is decoded without transformers' clean-up of spaces before punctuation, which looks
        across token boundaries and would rewrite text already streamed.
        """
        if self.stopped:
            return ""
        self._generated = token_ids
        end, new = self._decided(len(self._context) + len(token_ids))
        # decided when the tokens add text (a skipped special token adds none, and must not become the
        # only context of the next window)
        if new:
            self._prefix, self._read = self._read, end
            self._add(new)
        return self._emit(len(self.text) if self.stopped else len(self.text) - self.hold)

    def finish(self) -> str:
        """The process ended: release everything held back (dropping a dangling partial character)."""
        if not self.stopped and self._bytes is None:
            # without the tokens' bytes a trailing U+FFFD was taken for a partial character: what came
            # before it is decided now
            n = len(self._context) + len(self._generated)
            if n > self._read:
                self._add(self._new_text(n).rstrip("\ufffd"))
        return self._emit(len(self.text))

    def _add(self, new: str) -> None:
        self.text += new
        cut = self._first_stop(self.text)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True

    def _decided(self, n: int) -> tuple[int, str]:
        """(end, text): ids[read:end] are the new tokens that hold no partial character at the end (without
        the tokens' bytes: whose text does not end in U+FFFD), and the text they add."""
        if self._bytes is not None:
            ids = self._ids(self._generated, max(0, n - PENDING_WINDOW), n)
            end = max(self._read, n - self._bytes.pending(ids))
            return end, self._new_text(end) if end > self._read else ""
        for end in range(n, max(self._read, n - PENDING_TOKENS) - 1, -1):
            new = self._new_text(end) if end > self._read else ""
            if not new.endswith("\ufffd"):
                return end, new
        return self._read, ""

    def _new_text(self, end: int) -> str:
        """The text ids[read:end] add to the decided text, decoded after as much of ids[prefix:read]
        as leaves that text as it was."""
        for lo in range(self._prefix, self._read + 1):
            before = self._decode(self._ids(self._generated, lo, self._read)) if lo < self._read else ""
            after = self._decode(self._ids(self._generated, lo, end))
            if after.startswith(before):
                return after[len(before):]
        return ""  # not reached: with no context, ``before`` is empty

    def _ids(self, generated: Sequence[int], lo: int, hi: int) -> list[int]:
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

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
