"""Per-process sampling: repetition penalty, temperature (0 = greedy), top-k, top-p, seeded draws."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           context: list[int] | None = None) -> int:
    """Choose the next token id from one row of logits (shape [vocab]): ``sample_batch`` with one row."""
    return sample_batch(logits[None], [params], [generator], [context or []])[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 contexts: list[list[int]]) -> list[int]:
    """Choose one token per row of ``logits`` [B, vocab], each row with its own parameters and generator.

    Greedy rows take the argmax; sampled rows are filtered (top-k, top-p) in one vectorised pass
    and drawn by inverse CDF from one uniform number of their own generator, so a row's draw
    does not depend on the other rows in the batch.
    """
    n = len(params)
    if n == 0:
        return []
    logits = logits.float()
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            ctx = torch.tensor(contexts[i], dtype=torch.long, device=logits.device)
            logits[i] = apply_repetition_penalty(logits[i], ctx, p.repetition_penalty)
    out = [0] * n
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    if greedy:
        for i, tok in zip(greedy, logits[greedy].argmax(-1).tolist()):
            out[i] = tok
    rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if not rows:
        return out
    dev = logits.device
    vocab = logits.shape[-1]
    temp = torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
    lg = logits[rows] / temp
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows], device=dev)
    top_p = torch.tensor([params[i].top_p for i in rows], device=dev)[:, None]
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        lg, order = torch.sort(lg, dim=-1, descending=True)
        cols = torch.arange(vocab, device=dev)[None, :]
        lg = lg.masked_fill(cols >= top_k[:, None], float("-inf"))
        probs = torch.softmax(lg, dim=-1)
        lg = lg.masked_fill((torch.cumsum(probs, dim=-1) - probs) >= top_p, float("-inf"))
    else:
        order = None
    probs = torch.softmax(lg, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.cat([torch.rand(1, generator=generators[i], device=dev) for i in rows])[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u).clamp_(max=vocab - 1)
    chosen = order.gather(1, idx) if order is not None else idx
    for i, tok in zip(rows, chosen[:, 0].tolist()):
        out[i] = tok
    return out
