"""The fallback engine: any transformers causal LM, one KV cache per sequence, one token per sequence per step.

Used for architectures the paged engine does not implement. Every process makes progress
every step while memory lasts; its KV use is accounted in the same block pool (as logical
blocks: transformers holds the tensors), under the same memory contract as the paged engine
(``BaseEngine._make_room``: ENOMEM for a sequence that can never fit, else preemption of the
last-ranked sequence, whose cache is dropped and recomputed from its tokens).
"""

from __future__ import annotations

import inspect

import torch

from llmos.drivers.model.engine import BaseEngine, Sequence, StepEvent
from llmos.drivers.model.sampling import sample
from llmos.syscalls.errors import Errno


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
        """Advance every sequence that has (or can be given) the blocks for its context, in rank order.

        Memory pressure follows the engine contract (``BaseEngine._make_room``): a sequence that can
        never fit ends with ENOMEM; otherwise the last-ranked sequences not yet run this step are
        preempted (their caches dropped) and recomputed from their tokens when they run again.
        """
        events: list[StepEvent] = []
        done: set[int] = set()
        tokens = 0
        for seq in sorted(self.seqs.values(), key=lambda s: s.rank):
            if seq.pid not in self.seqs:
                continue
            room = self._make_room(seq, len(seq.tokens), done)
            if isinstance(room, StepEvent):
                events.append(room)
                continue
            if not room:
                continue
            tokens += len(seq.tokens) - seq.computed
            try:
                events.append(self._advance(seq))
            except Exception as exc:  # one bad sequence must not take the others down
                events.append(self._fail(seq, Errno.EIO, f"model step failed: {type(exc).__name__}: {exc}"))
            done.add(seq.pid)
        self.steps += 1
        self.last_batch = len(done)
        self.last_step_tokens = tokens
        self._shrink_if_idle()
        return events

    def _advance(self, seq: Sequence) -> StepEvent:
        ids = torch.tensor([seq.tokens[seq.computed:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **self._extra, **{self._cache_kw: seq.cache})
        seq.cache = getattr(out, self._cache_kw)
        seq.computed = len(seq.tokens)
        return self._accept(seq, sample(out.logits[0, -1], seq.params, seq.generator, seq.tokens))
