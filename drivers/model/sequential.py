"""The fallback engine: any transformers causal LM, one KV cache per sequence, one token per sequence per step.

Used for architectures the paged engine does not implement. Every process still makes
progress every step, and its KV use is accounted in the same block pool (as logical blocks:
transformers holds the tensors).
"""

from __future__ import annotations

import inspect

import torch

from llmos.drivers.model.engine import BaseEngine, Sequence, StepEvent
from llmos.drivers.model.sampling import sample
from llmos.syscalls.errors import Errno, OutOfMemory


class SequentialEngine(BaseEngine):
    kind = "sequential"

    def __init__(self, *args, **kw) -> None:
        kw.pop("max_tokens_per_step", None)
        super().__init__(*args, **kw)
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed the cache argument and output field from past_key_values to cache
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        seqs = list(self.seqs.values())
        for seq in seqs:
            if not self._reserve(seq):
                if not self.pool.tables.get(seq.pid) and len(seqs) == 1:
                    events.append(self._fail(seq, Errno.ENOMEM, "the KV pool cannot hold this sequence"))
                continue
            try:
                events.append(self._advance(seq))
            except Exception as exc:  # one bad sequence must not take the others down
                events.append(self._fail(seq, Errno.EIO, f"model step failed: {type(exc).__name__}: {exc}"))
        self.steps += 1
        self.last_batch = len(seqs)
        return events

    def _reserve(self, seq: Sequence) -> bool:
        try:
            self.pool.ensure(seq.pid, len(seq.tokens), seq.user)
            return True
        except OutOfMemory:
            return False

    def _advance(self, seq: Sequence) -> StepEvent:
        ids = torch.tensor([seq.tokens[seq.computed:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **self._extra, **{self._cache_kw: seq.cache})
        seq.cache = getattr(out, self._cache_kw)
        seq.computed = len(seq.tokens)
        return self._accept(seq, sample(out.logits[0, -1], seq.params, seq.generator, seq.tokens))
