"""Token log-probabilities of a text under a model (perplexity), window by window, with the model's plain forward.

A text longer than the model's context is scored with a sliding window, as Hugging Face's perplexity
guide does: windows of ``context`` tokens start every ``stride`` = context // 2 tokens, and each token
is scored once, in the first window that reaches it, so every token after the first window has at
least ``context - stride`` tokens of context. The first token of the text has no context and is not
scored. The worker runs one window per turn of its step loop (:class:`ScoreJob`), so a long text
never holds up the processes generating meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.drivers.model import protocol as p
from llmos.syscalls.errors import InvalidArgument, TooBig

MAX_SCORE_TOKENS = 1_000_000  # tokens of one Score: its reply (ids and float log-probs) stays inside a frame


def windows(n: int, context: int) -> list[tuple[int, int, int]]:
    """The windows that score ``n`` tokens with a model of ``context`` tokens: ``(begin, end, first)``,
    the window's tokens ``[begin, end)`` of which ``[first, end)`` are scored. Every token but the
    first is scored exactly once; the windows start ``context // 2`` apart."""
    if context < 2:
        raise InvalidArgument(f"a context of {context} tokens cannot score anything")
    stride = context // 2
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@dataclass
class ScoreJob:
    """One ``Score`` in progress: its token ids, the windows left, and what the done ones gave.

    ``step`` runs the next window's forward (float32 log_softmax over the logits); ``reply`` is the
    ``Scored`` frame once ``done``."""

    rid: int
    ids: list[int]
    context: int
    plan: list[tuple[int, int, int]] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    nll: float = 0.0
    ran: int = 0

    def __post_init__(self) -> None:
        if len(self.ids) > MAX_SCORE_TOKENS:
            raise TooBig(f"the text is {len(self.ids)} tokens; one score takes at most {MAX_SCORE_TOKENS} "
                         "(score it in parts)")
        self.plan = windows(len(self.ids), self.context)

    @property
    def done(self) -> bool:
        return self.ran == len(self.plan)

    def step(self, model: Any, device: Any) -> None:
        """Score the next window with ``model``'s forward on ``device`` (no KV cache, no gradients)."""
        import torch

        begin, end, first = self.plan[self.ran]
        with torch.inference_mode():
            x = torch.tensor(self.ids[begin:end], dtype=torch.long, device=device)[None]
            logits = model(input_ids=x, use_cache=False).logits[0]
            # the logits at position i predict token i + 1
            lp = torch.log_softmax(logits[first - begin - 1:end - begin - 1].float(), dim=-1)
            vals = lp.gather(1, x[0, first - begin:end - begin, None])[:, 0]
        self.logprobs.extend(vals.tolist())
        self.nll -= float(vals.double().sum())
        self.ran += 1

    def reply(self) -> p.Scored:
        return p.Scored(self.rid, token_ids=self.ids, logprobs=self.logprobs, nll=self.nll, windows=len(self.plan),
                        stride=self.context // 2)
