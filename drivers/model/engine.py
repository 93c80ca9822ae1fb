"""Engines run many sequences on one model instance and stream their tokens; this module holds their contract.

An engine offers ``encode`` (prompt or chat messages to token ids), ``add`` (start a
sequence), ``preempt``/``resume`` (a context switch out of and back into the batch: KV swapped
to a bounded host swap area, else spilled to the worker's area on disk (``spill.py``), else dropped and
recomputed), ``append`` (a session's next turn),
``renice``, ``abort`` (end one now, keeping its output), ``has_work`` and ``step`` (advance every
active sequence it can, returning :class:`~llmos.drivers.model.protocol.StepEvent`s). A sequence
is *active* (in the batch) or *parked*; the engine never resumes a parked one by itself: the
kernel's scheduler decides (``protocol.py``). ``load_engine`` picks the paged, continuously
batching engine (``paged.py``) for the Llama family and the sequential engine (``sequential.py``,
plain transformers with one KV cache per sequence) for any other causal LM.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from llmos.drivers.memory import KVBlockPool, chain_hashes
from llmos.drivers.model.capture import start_capture
from llmos.drivers.model.memory_contract import MemoryContract
from llmos.drivers.model.protocol import BLOCK_SIZE, PREEMPT_MODES, StepEvent, blocks_for
from llmos.drivers.model.prompt import chars_cap, check_length, check_prompt_chars, check_prompt_ids
from llmos.drivers.model.sampling import SamplingParams
from llmos.drivers.model.shape import model_shape
from llmos.drivers.model.text import TextTracker, silent_tokens, split_stops
from llmos.syscalls.errors import Errno, InvalidArgument, OutOfMemory, TooBig, quote, wire_error

__all__ = ["BaseEngine", "Sequence", "StepEvent", "load_engine", "load_model"]  # StepEvent: protocol's

DEFAULT_POOL_CONTEXTS = 64  # full contexts the pool holds when neither num_blocks nor max_batch is given
DEFAULT_TOKENS_PER_STEP = 512  # the step's token budget: each decoding sequence takes one, prompts the rest
SWAP_PROBE_BYTES = 4 << 20  # copied out and back at load to measure the swap path
PREFILL_PROBE_TOKENS = 64  # one warm-up prefill of this many tokens measures the prefill rate at load
PREFILL_EMA = 0.2  # weight of a new prefill step in the running prefill rate
MIN_PREFILL_SAMPLE = 16  # steps that prefill fewer tokens say little about the rate

_arrivals = itertools.count()

PREFIX_CHARS_PER_TOKEN = 4  # the first prefix of a long text tried against the context: ~one token per 4 characters
CUT_MARGIN_TOKENS = 64  # tokens a prefix may have beyond the context and the whole text still fit (the cut word)
RELEASE_AFTER_CHARS = 2**18  # tokenising a text this long leaves tens of MB in the allocator's free lists


def release_memory() -> None:
    """Give the C allocator's free memory back to the OS (glibc ``malloc_trim(0)``; nothing elsewhere).

    The tokenizer's Rust code allocates through malloc on the encoder threads, each with an arena of
    its own; glibc keeps freed pages in those arenas, so a worker that tokenised a few MB of text
    would keep hundreds of MB. ``malloc_trim`` returns them from every arena, in milliseconds."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


@dataclass
class Sequence:
    """One process's context inside an engine: its tokens, how many are in the KV cache, its sampler."""

    pid: int
    tokens: list[int]  # prompt followed by generated tokens
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    text: TextTracker
    user: str = ""
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    computed: int = 0  # leading tokens whose keys and values are in the cache
    preemptions: int = 0
    cache: Any = None  # the sequential engine's per-sequence transformers cache
    stop_ids: frozenset[int] = frozenset()  # stop_token_ids and the ids of stop strings that are special tokens
    session: bool = False  # a finished turn parks it (KV kept) instead of dropping it
    parked: bool = False  # out of the batch until the kernel resumes it
    swap: Any = None  # its KV in the engine's host swap area (engine-specific), covering ``computed`` tokens
    swap_blocks: int = 0  # swap-area blocks that holds
    spilled: int = 0  # or: its KV's blocks in the engine's spill area on disk (spill.py), covering ``computed``
    capture: Any = None  # its captured intermediates (capture.SequenceCapture), when it asked for them
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its tokens' first full blocks
    registered: int = 0  # leading blocks of its table offered to the prefix index (prefix caching)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def rank(self) -> tuple[int, int]:
        """Lower ranks run first and are preempted last."""
        return (self.priority, self.arrival)


def longest_token_chars(tokenizer: Any) -> int:
    """The most input characters one token can stand for, from the vocabulary (token strings,
    added tokens included; a WordPiece model's longest word before it becomes one unknown token).

    A token's string is never shorter than the input it covers for byte-level BPE (one character
    per byte), Metaspace/SentencePiece (with byte fallback) and WordPiece pieces, so
    ``context_len * longest_token_chars`` characters bound what can fit the context.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    return max(1, longest, int(getattr(backend, "max_input_chars_per_word", 0) or 0))


class BaseEngine(MemoryContract):
    """What every engine shares: tokenizer handling, sequence bookkeeping, stop rules, the KV pool, the swap area.

    Subclasses implement ``_step`` (one step over the active sequences, recording prompt tokens computed
    with :meth:`_prefilled`) and, when they hold KV tensors themselves, ``_swap_out``/``_swap_in``.

    Spill options (``can_spill`` engines): ``spill_dir`` the spill area's directory (None: no spill area; the
    worker gives ``$LLMOS_HOME/store/spill/<pid>``), ``spill_bytes`` its bound in bytes (default 8 GiB; 0: no
    spill area), ``spill_below_bytes`` the host memory available below which the host swap area is passed
    over (default: a tenth of RAM or 1 GiB, whichever is smaller). :meth:`close` removes the area.

    ``prefix_cache``: engines that can (the paged engine) share the KV blocks of identical token prefixes
    between sequences; False turns it off (for comparison).
    """

    kind = "base"
    can_spill = False  # its KV lies in pool blocks it can write to the spill area and read back (_spill_out/_in)
    capture_kinds: tuple[str, ...] = ()  # what its sequences may capture (capture.py)

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, name: str = "model",
                 block_size: int = BLOCK_SIZE, num_blocks: int | None = None, max_batch: int | None = None,
                 kv_policy: str = "static", max_blocks: int | None = None, user_cap_blocks: int | None = None,
                 user_caps: dict[str, int] | None = None, max_tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
                 swap_blocks: int | None = None, measure: bool = True, spill_dir: str | Path | None = None,
                 spill_bytes: int | None = None, spill_below_bytes: int | None = None,
                 prefix_cache: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = bool(prefix_cache)  # engines that can share prefix KV blocks do when True
        self.device = device
        self.name = name
        if max_batch is not None and max_batch < 1:
            raise InvalidArgument(f"max_batch must be at least 1, got {max_batch}")
        if max_tokens_per_step < 1:
            raise InvalidArgument(f"max_tokens_per_step must be at least 1, got {max_tokens_per_step}")
        self.max_tokens_per_step = int(max_tokens_per_step)
        # None: no cap but the step's token budget (one token per decoding sequence) and the KV pool
        self.max_batch_cap = max_batch
        self.max_batch = max_batch if max_batch is not None else self.max_tokens_per_step
        self.seqs: dict[int, Sequence] = {}
        cfg = model.config
        self.shape = model_shape(cfg)
        self.context_len = self.shape.context_len
        # a prompt with more characters than this cannot fit: refused before tokenising it
        self.max_prompt_chars = self.context_len * longest_token_chars(tokenizer)
        self._silent = silent_tokens(tokenizer)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if num_blocks is None:  # room for full contexts (+ the padding block)
            num_blocks = (max_batch or DEFAULT_POOL_CONTEXTS) * -(-self.context_len // block_size) + 1
        if kv_policy not in ("static", "dynamic", "isolated"):
            raise InvalidArgument(f"unknown KV memory policy {quote(kv_policy)}: static, dynamic or isolated")
        self.kv_policy = kv_policy
        self.initial_blocks = num_blocks
        self.max_blocks = max(max_blocks or num_blocks, num_blocks) if kv_policy == "dynamic" else num_blocks
        caps = user_caps if kv_policy == "isolated" else None
        self.pool = KVBlockPool(num_blocks, block_size, caps, user_cap_blocks if kv_policy == "isolated" else None)
        elem = next(model.parameters()).element_size()
        self.kv_token_bytes = self.shape.kv_bytes_per_token(elem)
        self.swap_total = int(swap_blocks) if swap_blocks is not None else self.pool.capacity
        if self.swap_total < 0:
            raise InvalidArgument(f"swap_blocks must be at least 0, got {swap_blocks}")
        self.swap_used = 0
        # the second tier (spill.py): engines that can write their blocks to disk, when the worker gives a place
        self.spill = None
        if spill_dir is not None and self.can_spill and (spill_bytes is None or spill_bytes > 0):
            from llmos.drivers.model.spill import DEFAULT_SPILL_BYTES, SpillArea

            self.spill = SpillArea(spill_dir, block_size * self.kv_token_bytes,
                                   DEFAULT_SPILL_BYTES if spill_bytes is None else int(spill_bytes), spill_below_bytes)
        self.swaps_out = 0
        self.swaps_in = 0
        self.recomputed_tokens = 0
        self.steps = 0
        self.yields = 0  # steps abandoned between layers for an urgent arrival (paged engine)
        self.preemptions = 0
        self.last_batch = 0
        self.last_step_tokens = 0
        self._forced: list[StepEvent] = []  # preemptions made under memory pressure during this step
        self._ended_on_resume: list[int] = []  # resumed sequences whose journaled output already ends them
        self._step_prefill: dict[int, int] = {}  # pid -> prompt tokens computed this step
        self.swap_bytes_per_s = 0.0
        self.prefill_tokens_per_s = 0.0  # measured at load, then a running estimate from real prefill steps
        self.load_prefill_tokens_per_s = 0.0
        self._measure = measure
        self.captured: list[tuple[int, Any]] = []  # (pid, SequenceCapture) of ended sequences, for the worker
        self.prefix_lookups = 0  # prompts (new, recomputed, turns whose KV was dropped) looked up in the index
        self.prefix_hits = 0  # of which started from cached blocks
        self.prefix_hit_tokens = 0  # tokens those started with, not computed
        self.prefix_cow_copies = 0  # shared blocks copied before a write (copy-on-write)

    def measure(self) -> None:
        """Measure the two costs of a context switch on this instance: bytes per second through the swap
        path (a few MB copied out and back) and prompt tokens per second (one short warm-up prefill).
        Subclasses call it at the end of their ``__init__``; it leaves no sequence and no counter behind."""
        if not self._measure:
            return
        self.swap_bytes_per_s = self._measure_swap()
        cap = self.pool.cap_of("")
        slots = min(self.pool.capacity, cap if cap is not None else self.pool.capacity) * self.pool.block_size
        n = min(PREFILL_PROBE_TOKENS, self.context_len - 1, slots - 1)  # a probe that fits the pool
        if n < 1:
            return
        ids = [i % int(self.model.config.vocab_size) for i in range(n)]
        best = float("inf")
        sharing, self.prefix_cache = self.prefix_cache, False  # the second run must compute, not hit the first's
        for _ in range(2):  # the first run pays one-time costs (allocator, kernels)
            self.add(-1, ids, {"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True})
            t = time.perf_counter()
            while -1 in self.seqs:
                if any(ev.finish_reason == "error" for ev in self._step()):
                    best = float("inf")  # the probe could not run: no measure rather than a wrong one
                    break
            else:
                best = min(best, time.perf_counter() - t)
        self._drop(-1)
        self.prefix_cache = sharing
        self.prefill_tokens_per_s = self.load_prefill_tokens_per_s = n / best if best < float("inf") else 0.0
        self.steps = self.preemptions = self.last_batch = self.last_step_tokens = 0
        self._step_prefill.clear()

    def _measure_swap(self) -> float:
        """Bytes per second copying KV-sized data to host memory and back (engines with a real swap path
        override this to time that path)."""
        dtype = next(self.model.parameters()).dtype
        x = torch.ones(SWAP_PROBE_BYTES // torch.tensor([], dtype=dtype).element_size(), dtype=dtype,
                       device=self.device)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            host = x.to("cpu", copy=True)
            x.copy_(host.to(self.device))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t)
        return 2 * SWAP_PROBE_BYTES / max(best, 1e-9)

    # -- description -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "engine": self.kind,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "context_len": self.context_len,
            "max_prompt_chars": self.max_prompt_chars,
            "vocab_size": int(self.model.config.vocab_size),
            "parameters": n_params,
            "weight_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "max_batch": self.max_batch,
            "max_tokens_per_step": self.max_tokens_per_step,
            "architecture": type(self.model).__name__,
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "kv_block_size": self.pool.block_size,
            "kv_blocks": self.pool.capacity,
            "kv_bytes_per_token": self.kv_token_bytes,
            "kv_policy": self.kv_policy,
            "kv_max_blocks": self.max_blocks - 1,
            "swap_blocks": self.swap_total,
            "spill_bytes": self.spill.budget_bytes if self.spill is not None else 0,
            "spill_below_bytes": self.spill.below_bytes if self.spill is not None else 0,
            "swap_bytes_per_s": self.swap_bytes_per_s,
            "prefill_tokens_per_s": self.load_prefill_tokens_per_s,
            "layers": self.shape.layers,
            "heads": self.shape.heads,
            "capture": list(self.capture_kinds),
            "prefix_cache": self.prefix_cache,
        }

    def stats(self) -> dict[str, Any]:
        u = self.pool.usage()
        return {"running": self.running, "parked": len(self.seqs) - self.running, "batch": self.last_batch,
                "step_tokens": self.last_step_tokens,
                "kv_used": u.used, "kv_free": u.free, "kv_total": u.total, "kv_block_size": u.block_size,
                "kv_bytes": self.pool.num_blocks * u.block_size * self.kv_token_bytes,
                "kv_per_user": u.per_user, "steps": self.steps, "step_yields": self.yields, "preemptions": self.preemptions,
                "kv_policy": self.kv_policy, "swap_used": self.swap_used, "swap_total": self.swap_total,
                "swaps_out": self.swaps_out, "swaps_in": self.swaps_in, "recomputed_tokens": self.recomputed_tokens,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "prefix_lookups": self.prefix_lookups, "prefix_hits": self.prefix_hits,
                "prefix_hit_tokens": self.prefix_hit_tokens, "prefix_cached_blocks": self.pool.cached_blocks,
                "prefix_evictions": self.pool.evictions, "prefix_cow_copies": self.prefix_cow_copies,
                **(self.spill.stats() if self.spill is not None else
                   {"spills": 0, "spilled_blocks": 0, "spill_bytes_used": 0, "spill_failures": 0})}

    def close(self) -> None:
        """Release what the engine holds outside its process's memory: its spill area's files. Idempotent."""
        if self.spill is not None:
            self.spill.close()

    # -- input -----------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               prompt_ids: list[int] | None = None, add_special_tokens: bool = True) -> list[int]:
        """Tokenise a prompt, render chat messages with the model's chat template, or check token ids.

        TooBig (E2BIG) when the prompt cannot fit the context, decided as cheaply as can be: ids by their
        count; text by its characters (every string of the messages counts, then the rendered
        template), then by the tokens of a prefix (:meth:`tokenize`); InvalidArgument for bad input.
        """
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise InvalidArgument("give exactly one of 'prompt', 'messages' and 'prompt_ids'")
        if prompt_ids is not None:
            return check_prompt_ids(prompt_ids, int(self.model.config.vocab_size), self.context_len)
        check_prompt_chars(prompt, messages, self.max_prompt_chars, self.context_len)
        if messages is not None:
            ids = self._encode_messages(messages)
        else:
            ids = self.tokenize(prompt, add_special_tokens=add_special_tokens, what="prompt")
            if not ids and add_special_tokens:
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise InvalidArgument("empty prompt, and the model has no BOS token to start from")
                ids = [bos]
        check_length(len(ids), self.context_len)
        return ids

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {quote(self.name)} has no chat template; use 'prompt'")
        if not messages:
            raise InvalidArgument("'messages' is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"message {i} must be a map with string 'role' and 'content'")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.max_prompt_chars and len(text) > self.max_prompt_chars:  # a template may repeat what it is given
            raise TooBig(f"the chat template renders the messages as {len(text)} characters; "
                         f"{chars_cap(self.max_prompt_chars, self.context_len)}")
        return self.tokenize(text, add_special_tokens=False, what="the rendered chat template")

    def tokenize(self, text: str, add_special_tokens: bool, what: str = "prompt") -> list[int]:
        """Token ids of ``text``; TooBig as soon as a prefix shows it cannot fit the context.

        A text longer than ``PREFIX_CHARS_PER_TOKEN`` characters per context token is first tokenised by
        prefixes (that many characters per context token, then twice as many..., while shorter than
        half the text): one with at least ``CUT_MARGIN_TOKENS`` more tokens than the context holds (a
        cut inside a word can split it into more tokens than the whole text gives it) cannot fit, and
        the rest is never tokenised. Only otherwise is the whole text tokenised. After a long text the
        allocator's free memory goes back to the OS (:func:`release_memory`).
        """
        try:
            size = PREFIX_CHARS_PER_TOKEN * self.context_len
            while size <= len(text) // 2:
                n = len(self.tokenizer(text[:size], add_special_tokens=add_special_tokens)["input_ids"])
                if n >= self.context_len + CUT_MARGIN_TOKENS:
                    raise TooBig(f"{what} cannot fit: its first {size} of {len(text)} characters are already "
                                 f"{n} tokens; the model's context holds {self.context_len}")
                size *= 2
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        finally:
            if len(text) >= RELEASE_AFTER_CHARS:
                release_memory()

    # -- sequences -------------------------------------------------------------------------
    def add(self, pid: int, prompt_ids: list[int], params: SamplingParams | dict, user: str = "",
            priority: int = 0, session: bool = False, output_ids: list[int] | None = None) -> None:
        """Start a sequence, active. ``session``: a turn that ends with stop or length parks it with its KV
        kept, for :meth:`append`. ``output_ids``: tokens it already generated (a process resumed from the
        kernel's journal after a crash): they are prefilled with the prompt, count toward ``max_new_tokens``
        and its stop rules, and their text is taken as already streamed; if they already end it, its next
        step reports the finish. ``params["capture"]`` (a dict of params only): a capture spec from the kernel
        (capture.py); its tensors are kept as computed and listed in ``captured`` when it ends. InvalidArgument
        for a pid already here, an empty prompt, or a capture this engine cannot make."""
        capture = start_capture(params, self, session)  # InvalidArgument for a capture it cannot make
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if pid in self.seqs:
            raise InvalidArgument(f"pid {pid} already runs on this engine")
        if not prompt_ids:
            raise InvalidArgument("empty prompt")
        strings, special = split_stops(params.stop, self._silent)
        seq = Sequence(pid, list(prompt_ids), len(prompt_ids), params, params.generator(self.device),
                       TextTracker(self.tokenizer, strings, prompt_ids), user=user, priority=priority,
                       stop_ids=frozenset([*params.stop_token_ids, *special]), session=bool(session))
        seq.capture = capture
        self.seqs[pid] = seq
        if output_ids:
            seq.tokens.extend(output_ids)
            seq.text.update(seq.generated)  # its text so far was streamed before the crash
            if self._finish_reason(seq, seq.tokens[-1]) is not None:
                self._ended_on_resume.append(pid)

    def preempt(self, pid: int, mode: str = "swap") -> StepEvent | None:
        """Take a sequence (active or parked) out of the batch and its KV out of the pool; None for an unknown pid.

        ``swap`` copies the KV of its computed tokens to the host swap area, or to the spill area on disk when
        the host area lacks room or host memory is short, else drops it as ``recompute`` does (computed = 0).
        The event's ``preempted`` is the mode used (``swap`` for a spill too; ``none`` when its KV had already
        left the pool), ``recomputed`` the tokens a resume recomputes. InvalidArgument for a mode not in
        PREEMPT_MODES."""
        if mode not in PREEMPT_MODES:
            raise InvalidArgument(f"unknown preemption mode {quote(str(mode))}: swap or recompute")
        seq = self.seqs.get(pid)
        if seq is None:
            return None
        if not seq.parked:
            seq.preemptions += 1
            self.preemptions += 1
        seq.parked = True
        if not self.pool.tables.get(pid) and seq.cache is None:
            return StepEvent(pid, preempted="none")
        return self._evict(seq, mode)

    def _evict(self, seq: Sequence, mode: str) -> StepEvent:
        """Move ``seq``'s KV out of the pool. ``swap``: to the host swap area if it has room and host memory is
        not short (``spill_below_bytes``), else to the spill area, else (or for ``recompute``) drop it. A spill
        is a ``swap`` to the kernel: the KV is kept."""
        need = blocks_for(seq.computed, self.pool.block_size)
        if mode == "swap" and seq.computed:
            short = self.spill is not None and self.spill.host_short()
            if not short and self.swap_used + need <= self.swap_total:
                seq.swap = self._swap_out(seq)
                seq.swap_blocks = need
                self.swap_used += need
            elif self.spill is not None and self.spill.write(seq.pid, need, self._spill_rows(seq)):
                seq.spilled = need
            else:
                need = 0
            if need:
                self.swaps_out += 1
                self.pool.free(seq.pid)
                seq.registered = 0
                seq.cache = None
                return StepEvent(seq.pid, preempted="swap")
        dropped = seq.computed
        self.pool.free(seq.pid)
        seq.registered = 0
        seq.computed = 0
        seq.cache = None
        self.recomputed_tokens += dropped
        return StepEvent(seq.pid, preempted="recompute", recomputed=dropped)

    def resume(self, pid: int, priority: int | None = None) -> None:
        """Put a parked sequence back in the batch; its KV comes back (swap-in or recompute) on its next step.
        Nothing for an unknown pid."""
        seq = self.seqs.get(pid)
        if seq is None:
            return
        seq.parked = False
        if priority is not None:
            seq.priority = priority

    def renice(self, pid: int, priority: int) -> None:
        """A sequence's new priority: the rank it is kept or preempted by under memory pressure."""
        seq = self.seqs.get(pid)
        if seq is not None:
            seq.priority = priority

    def append(self, pid: int, prompt_ids: list[int], params: SamplingParams | dict | None = None) -> None:
        """A parked session's next turn: ``prompt_ids`` is its whole new context.

        The KV of the longest common prefix with its current tokens is kept (in the pool or the swap area),
        the rest dropped; the turn starts with a fresh stop-string tracker and, when ``params`` is given,
        new sampling parameters (and generator). It stays parked until :meth:`resume`. Nothing for an
        unknown pid; InvalidArgument for an active or non-session sequence or an empty context."""
        seq = self.seqs.get(pid)
        if seq is None:
            return
        if not seq.session or not seq.parked:
            raise InvalidArgument(f"pid {pid} is not a parked session: a turn is appended between turns")
        if not prompt_ids:
            raise InvalidArgument("empty prompt")
        if params is not None:
            seq.params = SamplingParams.from_dict(params) if isinstance(params, dict) else params
            seq.generator = seq.params.generator(self.device)
        lcp = 0
        for a, b in zip(seq.tokens, prompt_ids):
            if a != b:
                break
            lcp += 1
        keep = min(seq.computed, lcp, len(prompt_ids) - 1)  # one token at least is fed to sample the reply
        seq.computed = self._truncate_kv(seq, keep)
        del seq.keys[lcp // self.pool.block_size:]  # a key names every token up to its block's end
        seq.tokens = list(prompt_ids)
        seq.prompt_len = len(prompt_ids)
        strings, special = split_stops(seq.params.stop, self._silent)
        seq.text = TextTracker(self.tokenizer, strings, seq.tokens)
        seq.stop_ids = frozenset([*seq.params.stop_token_ids, *special])

    def _truncate_kv(self, seq: Sequence, tokens: int) -> int:
        """Keep the KV of the first ``tokens`` tokens only, wherever it is; returns the tokens kept: ``tokens``,
        or fewer (down to the last block boundary) when the block the next write goes into is shared with another
        table or the prefix index and no block is free for its private copy (the rest is recomputed)."""
        keep = blocks_for(tokens, self.pool.block_size)
        if seq.spilled and tokens < seq.computed:
            if tokens == 0:
                self._drop_swap(seq)
            else:
                self.spill.drop(seq.pid, keep)
                seq.spilled = min(seq.spilled, keep)
        if seq.swap is not None and tokens < seq.computed:
            if tokens == 0:
                self._drop_swap(seq)
            else:  # a per-sequence cache holds exactly its tokens: cut it even within the last block
                seq.swap = self._swap_truncate(seq.swap, keep, tokens)
                self.swap_used -= seq.swap_blocks - keep
                seq.swap_blocks = keep
        self.pool.truncate(seq.pid, keep)
        seq.registered = min(seq.registered, tokens // self.pool.block_size)
        if tokens % self.pool.block_size and len(self.pool.tables.get(seq.pid, ())) == keep:
            # the next turn writes into block keep - 1 from slot ``tokens`` on: never into one others read
            if not self._make_private(seq, keep - 1):
                tokens -= tokens % self.pool.block_size
                self.pool.truncate(seq.pid, keep - 1)
        if seq.cache is not None and tokens < seq.computed:
            self._cache_truncate(seq, tokens)
        return tokens

    # -- prefix caching (blocks shared by the hash chain of their tokens: memory.py) ------------------------
    def _copy_block(self, src: int, dst: int) -> None:
        """Engines that hold the KV tensors copy block ``src``'s slots (every layer's keys and values) to ``dst``."""
        raise NotImplementedError

    def _make_private(self, seq: Sequence, i: int) -> bool:
        """Copy-on-write: give ``seq`` a private copy of block ``i`` of its table when the block is shared;
        False when no block is free for the copy."""
        try:
            pair = self.pool.make_private(seq.pid, i)
        except OutOfMemory:
            return False
        if pair is not None:
            self._copy_block(*pair)
            self.prefix_cow_copies += 1
        return True

    def _keys(self, seq: Sequence) -> list[bytes]:
        """The prefix keys of ``seq``'s full blocks; the isolated policy salts them with the user: users whose
        memory is isolated share no KV (a shared block would also tell one user, by timing, another's prompt)."""
        salt = seq.user.encode() if self.kv_policy == "isolated" else b""
        return chain_hashes(seq.tokens, self.pool.block_size, seq.keys, salt)

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Start a sequence that computes from position 0 with the longest run of cached blocks matching its
        tokens (prefix caching): its table starts with them and ``computed`` with their tokens, which are not
        computed again (nor counted in ``prefilled``). One token at least is left to compute, since the step
        that samples needs its logits; a capturing sequence reuses only positions it has already captured.
        Returns the tokens reused (0: no hit, or the cache is off, or the sequence already has KV)."""
        if not self.prefix_cache or seq.computed or seq.swap is not None or seq.spilled:
            return 0
        bs = self.pool.block_size
        limit = (len(seq.tokens) - 1) // bs
        if seq.capture is not None:
            limit = min(limit, seq.capture.tokens // bs)
        self.prefix_lookups += 1
        blocks = self.pool.lookup(self._keys(seq)[:limit])
        if not blocks:
            return 0
        self.pool.free(seq.pid)  # blocks from a step that never completed hold nothing of use
        seq.registered = self.pool.attach(seq.pid, blocks, seq.user)  # fewer at the user's cap
        seq.computed = seq.registered * bs
        if seq.computed:
            self.prefix_hits += 1
            self.prefix_hit_tokens += seq.computed
        return seq.computed

    def _unshare(self, seq: Sequence) -> None:
        """Give back the cached blocks :meth:`_reuse_prefix` just took, when the rest of the prompt must wait for
        memory: a waiting prompt holds no blocks (two waiting prompts could otherwise hold each other's room)."""
        self.prefix_hits -= 1
        self.prefix_hit_tokens -= seq.computed
        self.pool.free(seq.pid)
        seq.computed = seq.registered = 0

    def _register_blocks(self, seq: Sequence) -> None:
        """Offer the prefix index every block of ``seq``'s table that became full (all its slots computed)."""
        full = seq.computed // self.pool.block_size
        if not self.prefix_cache or full <= seq.registered or seq.pid not in self.pool.tables:
            return
        keys = self._keys(seq)
        for i in range(seq.registered, full):
            self.pool.register(seq.pid, i, keys[i])
        seq.registered = full

    def _drop_swap(self, seq: Sequence) -> None:
        """Forget ``seq``'s swapped-out KV, in the host area or the spill area."""
        self.swap_used -= seq.swap_blocks
        seq.swap, seq.swap_blocks = None, 0
        if seq.spilled:
            self.spill.drop(seq.pid)
            seq.spilled = 0

    def abort(self, pid: int) -> StepEvent | None:
        """End a sequence now (signal TERM): keep and flush what it generated, free its pool and swap blocks."""
        seq = self._drop(pid)
        if seq is None:
            return None
        return StepEvent(pid, [], seq.text.finish(), "killed", seq.text.text)

    def _drop(self, pid: int) -> Sequence | None:
        seq = self.seqs.pop(pid, None)
        self.pool.free(pid)
        if seq is not None:
            seq.cache = None
            self._drop_swap(seq)
            if seq.capture is not None:  # the worker sends it before the event that ends the process
                self.captured.append((pid, seq.capture))
        return seq

    def has_work(self) -> bool:
        """True when an active sequence may run (parked ones wait for the kernel's resume)."""
        return any(not s.parked for s in self.seqs.values())

    @property
    def running(self) -> int:
        """Active sequences."""
        return sum(not s.parked for s in self.seqs.values())

    def active(self) -> list[Sequence]:
        """Active sequences in rank order."""
        return sorted((s for s in self.seqs.values() if not s.parked), key=lambda s: s.rank)

    def step(self) -> list[StepEvent]:
        """One step over the active sequences: their new tokens, finishes, prompt tokens computed
        (``prefilled``) and any preemption memory pressure forced (``preempted``: the victim is parked)."""
        ended = [self._end_resumed(pid) for pid in self._ended_on_resume]
        self._ended_on_resume = []
        t = time.perf_counter()
        events = [e for e in ended if e is not None] + self._step()
        dt = time.perf_counter() - t
        forced, self._forced = self._forced, []
        prefill, self._step_prefill = self._step_prefill, {}
        total = sum(prefill.values())
        if total >= MIN_PREFILL_SAMPLE and dt > 0:
            self.prefill_tokens_per_s += PREFILL_EMA * (total / dt - self.prefill_tokens_per_s)
        for ev in events:
            ev.prefilled = prefill.pop(ev.pid, 0)
        events.extend(StepEvent(pid, prefilled=n) for pid, n in prefill.items() if n)
        return forced + events

    def _prefilled(self, seq: Sequence, start: int, n: int) -> None:
        """Record ``n`` tokens computed from ``start`` this step: all but the newest sample's are prompt
        (or recomputed) tokens."""
        decode = 1 if len(seq.tokens) > seq.prompt_len and start + n == len(seq.tokens) else 0
        if n - decode > 0:
            self._step_prefill[seq.pid] = self._step_prefill.get(seq.pid, 0) + n - decode

    def _step(self) -> list[StepEvent]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _accept(self, seq: Sequence, token: int) -> StepEvent:
        """Record a sampled token; finish the sequence (or a session's turn) if a stop rule fires."""
        seq.tokens.append(token)
        delta = seq.text.update(seq.generated)
        reason = self._finish_reason(seq, token)
        if reason is None:
            return StepEvent(seq.pid, [token], delta)
        if seq.session:
            seq.parked = True  # its KV stays in the pool until the next turn, or a preemption
        else:
            self._drop(seq.pid)
        delta += seq.text.finish()
        return StepEvent(seq.pid, [token], delta, reason, seq.text.text)

    def _end_resumed(self, pid: int) -> StepEvent | None:
        """The finish of a resumed sequence whose journaled output already met a stop rule (the crash came
        between its last token and the journal's record of its end)."""
        seq = self.seqs.get(pid)
        if seq is None or seq.parked:
            return None
        reason = self._finish_reason(seq, seq.tokens[-1])
        if seq.session:
            seq.parked = True
        else:
            self._drop(pid)
        return StepEvent(pid, [], seq.text.finish(), reason or "stop", seq.text.text)

    def _fail(self, seq: Sequence, errno: Errno, message: str) -> StepEvent:
        self._drop(seq.pid)
        return StepEvent(seq.pid, [], seq.text.finish(), "error", seq.text.text, wire_error(errno, message))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.text.stopped or token in seq.stop_ids:
            return "stop"
        if token in self.eos_ids and not p.ignore_eos:
            return "stop"
        if len(seq.tokens) - seq.prompt_len >= p.max_new_tokens:
            return "length"
        if len(seq.tokens) >= self.context_len:
            return "length"
        return None



def load_model(path: str | Path, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any, torch.device]:
    """(model, tokenizer, device) from a model directory, its weights in ``dtype`` (precision.py: None or "auto"
    picks bfloat16 where the hardware has bfloat16 units, else float32 on a CPU); InvalidArgument when its
    tokenizer is not one (:func:`check_tokenizer`), before the weights are read, or for an unknown dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmos.drivers.model.precision import resolve

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, resolve(dtype, dev.type))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_tokenizer(tokenizer, int(getattr(AutoConfig.from_pretrained(str(path)), "vocab_size", 0) or 0))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev)
    model.eval()
    return model, tokenizer, dev


MIN_TOKENIZER_TOKENS = 256  # a byte-level vocabulary's alphabet alone


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """InvalidArgument when a loaded tokenizer has implausibly few tokens: fewer than 256 and fewer than
    half the model's vocabulary. transformers builds an empty tokenizer (one token) when a model's
    tokenizer files are missing or empty, and the model would then print nothing."""
    n = len(tokenizer)
    if n < min(MIN_TOKENIZER_TOKENS, vocab_size // 2):
        raise InvalidArgument(f"its tokenizer ({type(tokenizer).__name__}) has {n} tokens for a model of {vocab_size}: "
                              "the tokenizer's files in the model directory (tokenizer.json, tokenizer.model, "
                              "vocab.json with merges.txt, vocab.txt...) are missing or empty")


def load_engine(path: str | Path, device: str | None = None, engine: str = "auto", *,
                on_stage: Callable[[str], None] | None = None, loader: Callable[..., Any] | None = None,
                **kw: Any) -> BaseEngine:
    """Load a model (``loader``: a directory by default; the store's for a store model) and wrap it in the
    best engine that supports its architecture. ``on_stage`` is told each stage as it starts ("reading
    weights", "building the KV pool"): the worker reports them, and ``llmos run`` shows them while it waits."""
    from llmos.drivers.model.paged import PagedEngine
    from llmos.drivers.model.protocol import LOAD_STAGES
    from llmos.drivers.model.sequential import SequentialEngine

    stage = on_stage or (lambda _: None)
    stage(LOAD_STAGES[2])
    model, tokenizer, dev = (loader or load_model)(path, device, kw.pop("dtype", None))
    stage(LOAD_STAGES[3])
    if engine == "paged" or (engine == "auto" and PagedEngine.supports(model)):
        return PagedEngine(model, tokenizer, dev, name=str(path), **kw)
    return SequentialEngine(model, tokenizer, dev, name=str(path), **kw)
