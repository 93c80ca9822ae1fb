"""Splitting a long text into parts of at most a number of tokens, on paragraph and sentence boundaries.

Pure functions over a token counter (``count(text) -> tokens``: the apps count with the kernel, tests with
``len``) and a cheap estimate of it (the apps: characters times the whole text's tokens per character, with
slack). A text is cut into *units*: its paragraphs (blank lines between them); a paragraph over the budget
into its sentences; a sentence over it into the longest pieces that fit, cut after a space where there is
one. The units are packed in order, as many to a part as the estimate says fit; each part is then counted
exactly, as a whole (a tokenizer may merge across a join), and split between its units if it came out over,
a single unit cut. Counting is one kernel call per part, plus a few for a part that came out over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Count = Callable[[str], int]

PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# a sentence ends at . ! ? or … (with any closing quotes or brackets) before white space, or at a CJK full stop
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[\"'”’」』)\]]*")
PARAGRAPH_SEP, SENTENCE_SEP = "\n\n", " "


@dataclass(frozen=True)
class Unit:
    """A piece of the text that fits the budget alone: its text, its tokens, and what joins it to the unit
    before it in a part (a blank line between paragraphs, a space within one)."""

    text: str
    tokens: int
    sep: str


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs (split at blank lines), stripped, empty ones dropped."""
    return [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]


def sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences, each with its closing punctuation."""
    out, start = [], 0
    for m in SENTENCE_END.finditer(paragraph):
        out.append(paragraph[start:m.end()])
        start = m.end()
    out.append(paragraph[start:])
    return [s.strip() for s in out if s.strip()]


def cut(text: str, budget: int, count: Count) -> list[str]:
    """``text`` in consecutive pieces of at most ``budget`` tokens each (the first pieces as long as they can
    be), each cut after a space when the piece holds one in its second half. Counting by prefixes: a binary
    search over characters, from a first guess of 4 characters a token, doubled while it still fits."""
    pieces: list[str] = []
    rest = text.strip()
    while rest:
        if count(rest) <= budget:
            pieces.append(rest)
            break
        lo, hi = 1, min(len(rest), 4 * budget)  # lo fits (one character: budget >= 1 and a character is a
        while hi < len(rest) and count(rest[:hi]) <= budget:  # token or a few bytes); hi does not, or is all
            lo, hi = hi, min(len(rest), 2 * hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(rest[:mid]) <= budget else (lo, mid)
        end = lo
        space = rest.rfind(" ", end // 2, end)
        if space > 0:
            end = space + 1
        pieces.append(rest[:end].strip())
        rest = rest[end:].strip()
    return [p for p in pieces if p]


def units(text: str, budget: int, estimate: Count) -> list[Unit]:
    """The text as units that each fit ``budget`` tokens by ``estimate``: paragraphs, else their sentences,
    else pieces of those cut at spaces."""
    out: list[Unit] = []
    for para in paragraphs(text):
        n = estimate(para)
        if n <= budget:
            out.append(Unit(para, n, PARAGRAPH_SEP))
            continue
        first = True
        for sentence in sentences(para):
            m = estimate(sentence)
            pieces = [sentence] if m <= budget else cut(sentence, budget, estimate)
            for piece in pieces:
                out.append(Unit(piece, estimate(piece), PARAGRAPH_SEP if first else SENTENCE_SEP))
                first = False
    return out


def join(group: list[Unit]) -> str:
    """The units' text, each after its separator but the first."""
    return "".join((u.sep if i else "") + u.text for i, u in enumerate(group))


def pack(items: list[Unit], budget: int, count: Count, estimate: Count | None = None) -> list[str]:
    """The units packed in order into parts of at most ``budget`` tokens: as many to a part as their tokens
    (``Unit.tokens``) and their separators' (by ``estimate``, default ``count``) allow; then each part is
    counted whole with ``count``, and one over the budget is split between its units into halves, again until
    each fits; a single unit over it is cut (:func:`cut`, counted with ``count``)."""
    estimate = estimate or count
    sep_tokens = {s: estimate(s) for s in {u.sep for u in items}}
    groups: list[list[Unit]] = []
    group: list[Unit] = []
    used = 0
    for u in items:
        extra = u.tokens + (sep_tokens[u.sep] if group else 0)
        if group and used + extra > budget:
            groups.append(group)
            group, used = [], 0
            extra = u.tokens
        group.append(u)
        used += extra
    if group:
        groups.append(group)
    parts: list[str] = []
    for g in groups:
        parts.extend(_fitted(g, budget, count))
    return parts


def _fitted(group: list[Unit], budget: int, count: Count) -> list[str]:
    text = join(group)
    if count(text) <= budget:
        return [text]
    if len(group) == 1:
        return cut(text, budget, count)
    half = len(group) // 2
    return _fitted(group[:half], budget, count) + _fitted(group[half:], budget, count)


def ratio_estimate(text: str, tokens: int, slack: float = 1.15) -> Count:
    """An estimate of a piece of ``text``'s tokens from its characters, at the whole text's ``tokens`` per
    character with ``slack``: pieces are packed by it, and each part is then counted exactly."""
    per_char = tokens / max(1, len(text)) * slack
    return lambda piece: max(1, int(len(piece) * per_char + 0.999)) if piece else 0


def split(text: str, budget: int, count: Count, estimate: Count | None = None) -> list[str]:
    """``text`` as parts of at most ``budget`` tokens (>= 1) by ``count``, cut on paragraph, then sentence, then
    word boundaries where possible; ``estimate`` (default ``count``) sizes the pieces before each part is
    counted whole. [] for a text with nothing but white space."""
    if budget < 1:
        raise ValueError(f"a budget of {budget} tokens holds nothing")
    estimate = estimate or count
    return pack(units(text, budget, estimate), budget, count, estimate)
