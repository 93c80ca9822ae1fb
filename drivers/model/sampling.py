"""Per-process sampling: repetition penalty, temperature (0 = greedy), top-k, top-p, seeded draws.

Whatever the model and the parameters give, the sampler never draws from NaN or infinite
numbers: logits are sanitised (NaN -> -inf, +inf -> the dtype's largest finite value, a row with
no finite value -> uniform), temperature scaling subtracts the row's maximum first (so it can only
push values down, never overflow up), and the best token always survives top-k and top-p.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# Temperatures below this are greedy: vLLM's _SAMPLING_EPS (vllm/sampling_params.py). Dividing logits by a
# smaller temperature only sharpens the distribution into the argmax, and overflows float32 on the way.
SAMPLING_EPS = 1e-5
MAX_TEMPERATURE = 1e6  # far above any accepted value (the syscall allows 100); keeps -inf / T from being NaN


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @property
    def greedy(self) -> bool:
        """True when the temperature is 0, below SAMPLING_EPS, or not a number."""
        return not self.temperature >= SAMPLING_EPS

    def generator(self, device: torch.device) -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """Shrink the logits of tokens already in the context, as transformers' processor does."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    scores = logits.gather(-1, context)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, context, scores)


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] with no NaN and no +inf: NaN -> -inf (never chosen), +inf -> the largest finite
    value; a row with no finite value left becomes all zeros (uniform), so every row has a maximum."""
    out = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))
    dead = ~torch.isfinite(out).any(-1)
    if bool(dead.any()):
        out[dead] = 0.0
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           context: list[int] | None = None) -> int:
    """Choose the next token id from one row of logits (shape [vocab]): ``sample_batch`` with one row."""
    return sample_batch(logits[None], [params], [generator], [context or []])[0]


def _penalised(logits: torch.Tensor, params: list[SamplingParams], contexts: list[list[int]]) -> torch.Tensor:
    """Float32 logits with each row's repetition penalty applied, then sanitised (a penalty of 100 on
    logits near the float32 limit overflows to inf)."""
    logits = logits.float()
    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and contexts[i]]
    if penalised:
        logits = logits.clone()  # the caller's logits stay as they were
    for i in penalised:
        ctx = torch.tensor(contexts[i], dtype=torch.long, device=logits.device)
        logits[i] = apply_repetition_penalty(logits[i], ctx, params[i].repetition_penalty)
    return sanitize(logits)


def _filtered(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities of sampled rows (sanitised logits [R, vocab]) after temperature, top-k and top-p.

    Returns (probs, order): when a filter applies, probs are in descending-logit order and ``order``
    maps their columns back to token ids; otherwise ``order`` is None and probs are in vocabulary order.
    Every row keeps its best token, and each row's maximum is 0 before the softmax, so no value is NaN.
    """
    dev = logits.device
    vocab = logits.shape[-1]
    temp = torch.tensor([min(p.temperature, MAX_TEMPERATURE) for p in params], device=dev)[:, None]
    lg = (logits - logits.max(-1, keepdim=True).values) / temp  # <= 0; the max stays 0
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    order = None
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        lg, order = torch.sort(lg, dim=-1, descending=True)
        cols = torch.arange(vocab, device=dev)[None, :]
        lg = lg.masked_fill(cols >= top_k[:, None], float("-inf"))
        probs = torch.softmax(lg, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[:, 0] = False  # the best token always stays (top_p below any probability, or NaN)
        lg = lg.masked_fill(drop, float("-inf"))
    return torch.softmax(lg, dim=-1), order


def probabilities(logits: torch.Tensor, params: list[SamplingParams], contexts: list[list[int]]) -> torch.Tensor:
    """The distribution each row is drawn from, [B, vocab] in vocabulary order (greedy rows: one-hot).

    Exposed so tests can check that any logits and parameters give finite probabilities summing to 1.
    """
    lg = _penalised(logits, params, contexts)
    out = torch.zeros_like(lg)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        out[greedy] = torch.nn.functional.one_hot(lg[greedy].argmax(-1), lg.shape[-1]).float()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs, order = _filtered(lg[rows], [params[i] for i in rows])
        out[rows] = probs if order is None else torch.zeros_like(probs).scatter(1, order, probs)
    return out


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 contexts: list[list[int]]) -> list[int]:
    """Choose one token per row of ``logits`` [B, vocab], each row with its own parameters and generator.

    Greedy rows (temperature below SAMPLING_EPS) take the argmax, the first maximal index on ties, as
    transformers does. Sampled rows are filtered (top-k, top-p) in one vectorised pass and drawn by
    inverse CDF from one uniform number of their own generator, so a row's draw does not depend on
    the other rows in the batch.
    """
    n = len(params)
    if n == 0:
        return []
    logits = _penalised(logits, params, contexts)
    out = [0] * n
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        for i, tok in zip(greedy, logits[greedy].argmax(-1).tolist()):
            out[i] = tok
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    dev = logits.device
    probs, order = _filtered(logits[rows], [params[i] for i in rows])
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.cat([torch.rand(1, generator=generators[i], device=dev) for i in rows])[:, None] * cdf[:, -1:]
    # the first column whose cdf exceeds u has a positive probability; rounding at the top end is
    # clamped to the last column that has one
    last = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)
    idx = torch.minimum(torch.searchsorted(cdf, u, right=True), last)
    chosen = order.gather(1, idx) if order is not None else idx
    for i, tok in zip(rows, chosen[:, 0].tolist()):
        out[i] = tok
    return out
