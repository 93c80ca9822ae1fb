"""The fallback engine: any transformers causal LM, one KV cache per sequence, one token per sequence per step.

Used for architectures the paged engine does not implement. Every active process makes progress
every step while memory lasts; its KV use is accounted in the same block pool (as logical
blocks: transformers holds the tensors), under the same memory contract as the paged engine
(``BaseEngine._make_room``: ENOMEM for a sequence that can never fit, else an idle session or the
last-ranked sequence is parked). A swap moves the sequence's cache tensors to host memory and
frees its logical blocks; a recompute drops the cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from llmos.drivers.model.engine import BaseEngine, Sequence
from llmos.drivers.model.protocol import StepEvent
from llmos.drivers.model.sampling import sample
from llmos.syscalls.errors import Errno


def move_cache(cache: Any, device: torch.device | str) -> Any:
    """Move a transformers cache's key and value tensors to ``device``, in place; returns the cache.

    Walks the cache generically: transformers 5's ``DynamicCache.layers[i].keys/.values``, else the
    older ``key_cache``/``value_cache`` lists. ``Tensor.to`` returns the tensor itself when it is on
    ``device`` already: on a CPU instance a swap copies nothing (host memory is where the KV lives)."""
    for layer in getattr(cache, "layers", None) or ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                setattr(layer, name, t.to(device))
    for name in ("key_cache", "value_cache"):
        tensors = getattr(cache, name, None)
        if isinstance(tensors, list):
            tensors[:] = [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]
    return cache


def crop_cache(cache: Any, tokens: int) -> Any:
    """Keep the first ``tokens`` positions of a transformers cache, in place; returns the cache.

    The key and value tensors ([batch, heads, positions, head_dim]) are cut directly, walking the cache
    as :func:`move_cache` does: ``crop``'s argument changed meaning across transformers versions."""
    for layer in getattr(cache, "layers", None) or ():
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                setattr(layer, name, t[..., :tokens, :])
    for name in ("key_cache", "value_cache"):
        tensors = getattr(cache, name, None)
        if isinstance(tensors, list):
            tensors[:] = [t[..., :tokens, :] if isinstance(t, torch.Tensor) and t.dim() >= 2 else t for t in tensors]
    return cache


class SequentialEngine(BaseEngine):
    kind = "sequential"
    # transformers' own hidden states cost no change to the forward; its attention weights would need the
    # eager attention, another compute path than the one that makes the output
    capture_kinds = ("hidden_states",)

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.prefix_cache = False  # one transformers cache per sequence: nothing to share
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed the cache argument and output field from past_key_values to cache
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.measure()

    @torch.inference_mode()
    def _step(self) -> list[StepEvent]:
        """Advance every active sequence that has (or can be given) the blocks for its context, in rank order,
        while the step's token budget and ``max_batch`` (when set) last.

        Memory pressure follows the engine contract (``BaseEngine._make_room``): a sequence that can
        never fit ends with ENOMEM; otherwise an idle session, else the last-ranked sequence not yet run
        this step, is parked (its cache swapped to host memory or dropped) until the kernel resumes it.
        """
        events: list[StepEvent] = []
        done: set[int] = set()
        tokens = 0
        seats = self.max_batch_cap or self.max_tokens_per_step
        for seq in self.active():
            if len(done) >= seats or tokens >= self.max_tokens_per_step:
                break
            if seq.pid not in self.seqs or seq.parked:
                continue  # ended or parked by a preemption above
            room = self._make_room(seq, len(seq.tokens), done)
            if isinstance(room, StepEvent):
                events.append(room)
                continue
            if not room:
                continue
            n = len(seq.tokens) - seq.computed
            tokens += n
            self._prefilled(seq, seq.computed, n)
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
        start, n = seq.computed, len(seq.tokens) - seq.computed
        ids = torch.tensor([seq.tokens[start:]], dtype=torch.long, device=self.device)
        span = seq.capture.span(start, n) if seq.capture is not None else None
        extra = {"output_hidden_states": True} if span is not None and span[1] > span[0] else {}
        out = self.model(input_ids=ids, use_cache=True, **self._extra, **extra, **{self._cache_kw: seq.cache})
        if span is not None:
            lo, hi, capped = span
            hidden = {layer: out.hidden_states[layer][0, lo - start:hi - start] for layer in seq.capture.hidden} \
                if extra else {}
            seq.capture.commit(lo, hi, capped, hidden, {})
        seq.cache = getattr(out, self._cache_kw)
        seq.computed = len(seq.tokens)
        return self._accept(seq, sample(out.logits[0, -1], seq.params, seq.generator, seq.tokens))

    # -- the swap area: the cache object itself, its tensors in host memory ------------------------
    def _swap_out(self, seq: Sequence) -> Any:
        return move_cache(seq.cache, "cpu")

    def _swap_in(self, seq: Sequence) -> None:
        seq.cache = move_cache(seq.swap, self.device)

    def _swap_truncate(self, swap: Any, blocks: int, tokens: int) -> Any:
        return crop_cache(swap, tokens)

    def _cache_truncate(self, seq: Sequence, tokens: int) -> None:
        if tokens == 0:
            seq.cache = None
        else:
            crop_cache(seq.cache, tokens)
