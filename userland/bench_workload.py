"""The seeded serving workload of ``llmos bench``: prompt and output lengths, prompts of real tokens, arrivals.

Everything here is pure (a seed in, the same requests out); the only kernel call, tokenising the text the
prompts are cut from, is passed in as a function. A prompt is a window of a token pool: text (seeded random
sentences from ``WORDS``, or the records of a stored data set) tokenised by the model's own tokenizer, so
prompts are real tokens of that model and their lengths are exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from llmos.syscalls.errors import InvalidArgument

DISTRIBUTIONS = ("uniform", "normal")
# a seeded vocabulary of common English words: the default prompts' text
WORDS = tuple("""the of and to in is was for that with on as by at from it this be are or an which have not
had one were all their there been has more can when who also they will would into time only other new some
could these two may first then do any like my now over such our man me even most made after many before
must through back years where much your way well down should because each just those people how too little
state good very make world still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right used take three states
himself few house use during without again place around however home small found thought went say part once
general high upon school every does got united left number course war until always away something fact though
water less public put think almost hand enough far took head yet government system better set told nothing
night end why called didn find going look asked later knew point next program city business give group toward
young days let room president side social present given several order national possible rather second face
per among form important often things looked early white case john become large big need four within felt
along children saw best church ever least power development light thought family interest want members mind
country area others done turned although open god service problem certain kind different thing began door
help sense means whole matter perhaps itself york times law human line above name example action company hands
local show five history whether gave either act today feet across taken past quite anything seen having death
experience body word half really week field car words already themselves information tell together college
shall money period held keep sure probably free seems political real behind cannot miss question air office
making brought whose special heard major problems ago became federal moment study available known result
street economic boy position reason change south board individual job society areas west close turn love
community true court force full seemed am age wife future voice center woman control common policy necessary
following front sometimes six girl clear further land""".split())


@dataclass(frozen=True)
class Lengths:
    """A length distribution in tokens: ``mean``, ``spread`` (a fraction of the mean) and ``dist``.

    uniform: whole numbers in [mean*(1-spread), mean*(1+spread)]; normal: mean with standard deviation
    mean*spread, rounded and clipped to [1, 2*mean]; spread 0 is a fixed length. Every draw is >= 1."""

    mean: int
    spread: float = 0.0
    dist: str = "uniform"

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise InvalidArgument(f"a length must be at least 1 token, got {self.mean}")
        if not 0.0 <= self.spread <= 1.0:
            raise InvalidArgument(f"a length spread is a fraction 0..1 of the mean, got {self.spread}")
        if self.dist not in DISTRIBUTIONS:
            raise InvalidArgument(f"a length distribution is one of {', '.join(DISTRIBUTIONS)}, got {self.dist!r}")

    @property
    def max(self) -> int:
        """The longest length a draw can give."""
        if self.spread == 0:
            return self.mean
        return 2 * self.mean if self.dist == "normal" else math.floor(self.mean * (1 + self.spread))

    def draw(self, rng: random.Random) -> int:
        if self.spread == 0:
            return self.mean
        if self.dist == "uniform":
            lo = max(1, math.ceil(self.mean * (1 - self.spread)))
            return rng.randint(lo, max(lo, self.max))
        return min(self.max, max(1, round(rng.gauss(self.mean, self.mean * self.spread))))

    def describe(self) -> str:
        return describe_lengths(self.to_json())

    def to_json(self) -> dict:
        """{mean (tokens), spread (a fraction of the mean), dist}: numbers for programs (bench --json)."""
        return {"mean": self.mean, "spread": self.spread, "dist": self.dist}


def describe_lengths(d: dict) -> str:
    """A Lengths' JSON for people: '128', or '128 +-50% uniform'."""
    return f"{d['mean']}" if d["spread"] == 0 else f"{d['mean']} +-{d['spread']:.0%} {d['dist']}"


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: the prompt as token ids and the output length (max_new_tokens, EOS ignored)."""

    prompt_ids: list[int]
    max_new_tokens: int


def seeded_text(seed: int, words: int) -> str:
    """``words`` words of seeded random sentences over WORDS (the same seed, the same text)."""
    rng = random.Random(f"text-{seed}")
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 16))
        s = " ".join(rng.choice(WORDS) for _ in range(n))
        sentences.append(s[0].upper() + s[1:] + ".")
        left -= n
    return " ".join(sentences)


def token_pool(tokenize: Callable[[str], list[int]], need: int, seed: int,
               records: Iterable[str] | None = None) -> list[int]:
    """At least ``need`` token ids (fewer only when ``records`` hold fewer: windows then wrap around).

    ``tokenize``: text -> the model's token ids (no special tokens added). ``records``: the texts to use
    (a data set's records, joined by blank lines); None: seeded_text. Raises InvalidArgument when the
    records give no token at all."""
    if records is None:
        # a word is one token (a word-level BPE) to several (a byte-level one): start short, double until enough,
        # since tokenising costs the kernel a forward pass over the text
        words = max(need // 4, 16)
        while True:
            ids = tokenize(seeded_text(seed, words))
            if len(ids) >= need or words > 64 * need:
                return ids
            words *= 2
    ids: list[int] = []
    batch: list[str] = []
    for text in records:
        batch.append(text)
        if sum(map(len, batch)) >= 4 * (need - len(ids)):  # several characters a token: few kernel calls
            ids += tokenize("\n\n".join(batch) + "\n\n")
            batch = []
            if len(ids) >= need:
                return ids
    if batch:
        ids += tokenize("\n\n".join(batch))
    if not ids:
        raise InvalidArgument("the data set's records hold no text to make prompts from")
    return ids


def requests(pool: list[int], prompt: Lengths, output: Lengths, seed: int) -> Iterator[BenchRequest]:
    """The workload, endless and repeatable: request i is the same for the same (pool, lengths, seed).

    A prompt is ``prompt.draw()`` tokens of the pool from a seeded offset, wrapping around its end."""
    if not pool:
        raise InvalidArgument("no tokens to make prompts from")
    rng = random.Random(f"requests-{seed}")
    while True:
        n, start = prompt.draw(rng), rng.randrange(len(pool))
        ids = (pool[start:] + pool * (n // len(pool) + 1))[:n]
        yield BenchRequest(ids, output.draw(rng))


def arrival_gaps(rate: float, seed: int) -> Iterator[float]:
    """Seconds between request arrivals for ``rate`` requests/s: a Poisson process (exponential gaps, mean
    1/rate), seeded apart from the requests so a sweep's points send the same requests; rate inf: all at once."""
    rng = random.Random(f"arrivals-{seed}")
    while True:
        yield 0.0 if math.isinf(rate) else rng.expovariate(rate)
