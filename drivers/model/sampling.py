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
           context: torch.Tensor | None = None) -> int:
    """Choose the next token id from one row of logits (shape [vocab])."""
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
