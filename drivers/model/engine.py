"""Engines run many sequences on one model instance and stream their tokens; this module holds their contract.

An engine offers ``encode`` (prompt or chat messages to token ids), ``add`` (start a
sequence), ``abort`` (end one now, keeping its output), ``has_work`` and ``step`` (advance
every sequence it can, returning :class:`StepEvent`s). ``load_engine`` picks the paged,
continuously batching engine (``paged.py``) for the Llama family and the sequential engine
(``sequential.py``, plain transformers with one KV cache per sequence) for any other
causal LM.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.drivers.memory import KVBlockPool, blocks_for
from llmos.drivers.model.prompt import check_length, check_prompt_chars, check_prompt_ids
from llmos.drivers.model.sampling import SamplingParams
from llmos.drivers.model.shape import model_shape
from llmos.drivers.model.text import TextTracker, silent_tokens, split_stops
from llmos.syscalls.errors import Errno, InvalidArgument, OutOfMemory, TooBig, quote, wire_error


@dataclass
class StepEvent:
    """What one sequence did in one step: new tokens, new text, and whether it finished."""

    pid: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the sequence's last event
    final_text: str | None = None
    error: dict[str, Any] | None = None

    def to_wire(self) -> list:
        return [self.pid, self.token_ids, self.text, self.finish_reason, self.final_text, self.error]


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


class BaseEngine:
    """What every engine shares: tokenizer handling, sequence bookkeeping, stop rules, the KV pool."""

    kind = "base"

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, name: str = "model",
                 block_size: int = 8, num_blocks: int | None = None, max_batch: int = 64,
                 kv_policy: str = "static", max_blocks: int | None = None, user_cap_blocks: int | None = None,
                 user_caps: dict[str, int] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.max_batch = max_batch
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
        if num_blocks is None:  # room for a full batch of full contexts (+ the padding block)
            num_blocks = max_batch * -(-self.context_len // block_size) + 1
        if kv_policy not in ("static", "dynamic", "isolated"):
            raise InvalidArgument(f"unknown KV memory policy {quote(kv_policy)}: static, dynamic or isolated")
        self.kv_policy = kv_policy
        self.initial_blocks = num_blocks
        self.max_blocks = max(max_blocks or num_blocks, num_blocks) if kv_policy == "dynamic" else num_blocks
        caps = user_caps if kv_policy == "isolated" else None
        self.pool = KVBlockPool(num_blocks, block_size, caps, user_cap_blocks if kv_policy == "isolated" else None)
        elem = next(model.parameters()).element_size()
        self.kv_token_bytes = self.shape.kv_bytes_per_token(elem)
        self.steps = 0
        self.preemptions = 0
        self.last_batch = 0
        self.last_step_tokens = 0

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
            "architecture": type(self.model).__name__,
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "kv_block_size": self.pool.block_size,
            "kv_blocks": self.pool.capacity,
            "kv_bytes_per_token": self.kv_token_bytes,
            "kv_policy": self.kv_policy,
            "kv_max_blocks": self.max_blocks - 1,
        }

    def stats(self) -> dict[str, Any]:
        u = self.pool.usage()
        return {"running": len(self.seqs), "batch": self.last_batch, "step_tokens": self.last_step_tokens,
                "kv_used": u.used, "kv_free": u.free, "kv_total": u.total, "kv_block_size": u.block_size,
                "kv_bytes": self.pool.num_blocks * u.block_size * self.kv_token_bytes,
                "kv_per_user": u.per_user, "steps": self.steps, "preemptions": self.preemptions,
                "kv_policy": self.kv_policy}

    # -- input -----------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               prompt_ids: list[int] | None = None) -> list[int]:
        """Tokenise a prompt, render chat messages with the model's chat template, or check token ids.

        TooBig (E2BIG) when the prompt cannot fit the context, decided as cheaply as can be: ids by their
        count; text by its characters (every string of the messages counts, then the rendered
        template), then by the tokens of a prefix (:meth:`tokenize`); InvalidArgument for bad input.
        """
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise InvalidArgument("give exactly one of 'prompt', 'messages' and 'prompt_ids'")
        if prompt_ids is not None:
            return check_prompt_ids(prompt_ids, int(self.model.config.vocab_size), self.context_len)
        check_prompt_chars(prompt, messages, self.max_prompt_chars)
        if messages is not None:
            ids = self._encode_messages(messages)
        else:
            ids = self.tokenize(prompt, add_special_tokens=True, what="prompt")
            if not ids:
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
            raise TooBig(f"the chat template renders the messages as {len(text)} characters; the model's "
                         f"context holds at most {self.max_prompt_chars}")
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
            priority: int = 0) -> None:
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if pid in self.seqs:
            raise InvalidArgument(f"pid {pid} already runs on this engine")
        if not prompt_ids:
            raise InvalidArgument("empty prompt")
        strings, special = split_stops(params.stop, self._silent)
        self.seqs[pid] = Sequence(pid, list(prompt_ids), len(prompt_ids), params, params.generator(self.device),
                                  TextTracker(self.tokenizer, strings, prompt_ids), user=user, priority=priority,
                                  stop_ids=frozenset([*params.stop_token_ids, *special]))

    def abort(self, pid: int) -> StepEvent | None:
        """End a sequence now (signal TERM): keep and flush what it generated, free its blocks."""
        seq = self._drop(pid)
        if seq is None:
            return None
        return StepEvent(pid, [], seq.text.finish(), "killed", seq.text.text)

    def _drop(self, pid: int) -> Sequence | None:
        seq = self.seqs.pop(pid, None)
        self.pool.free(pid)
        if seq is not None:
            seq.cache = None
        return seq

    def has_work(self) -> bool:
        return bool(self.seqs)

    @property
    def running(self) -> int:
        return len(self.seqs)

    def _accept(self, seq: Sequence, token: int) -> StepEvent:
        """Record a sampled token; finish the sequence if a stop rule fires."""
        seq.tokens.append(token)
        delta = seq.text.update(seq.generated)
        reason = self._finish_reason(seq, token)
        if reason is None:
            return StepEvent(seq.pid, [token], delta)
        self._drop(seq.pid)
        delta += seq.text.finish()
        return StepEvent(seq.pid, [token], delta, reason, seq.text.text)

    def _fail(self, seq: Sequence, errno: Errno, message: str) -> StepEvent:
        self._drop(seq.pid)
        return StepEvent(seq.pid, [], seq.text.finish(), "error", seq.text.text, wire_error(errno, message))

    # -- memory: one contract for every engine ------------------------------------------------
    def _block_limit(self, seq: Sequence) -> int:
        """The most blocks this sequence could ever hold: the pool's (largest) size, and its user's cap."""
        limit = (self.max_blocks if self.kv_policy == "dynamic" else self.pool.num_blocks) - 1
        cap = self.pool.cap_of(seq.user)
        return min(limit, cap) if cap is not None else limit

    def _never_fits(self, seq: Sequence, tokens: int) -> StepEvent | None:
        """The ENOMEM event (the sequence is dropped) when ``tokens`` need more blocks than it may ever hold."""
        limit = self._block_limit(seq)
        if blocks_for(tokens, self.pool.block_size) <= limit:
            return None
        return self._fail(seq, Errno.ENOMEM, f"{tokens} tokens need more KV blocks of {self.pool.block_size} "
                                             f"than the {limit} this sequence may ever hold")

    def _make_room(self, seq: Sequence, tokens: int, keep: set[int]) -> StepEvent | bool:
        """Give ``seq`` blocks for ``tokens`` slots, the memory contract every engine keeps.

        A sequence that can never fit ends with ENOMEM (the event is returned). Otherwise, while the
        pool (or the user's cap) is short, the sequence that ranks last (lowest priority, then newest)
        among those holding blocks and not in ``keep`` (already run this step) is preempted: its
        blocks are freed and it is recomputed later from its tokens. At its user's cap only that
        user's sequences give way. True when ``seq`` has its blocks; False when it must wait (it
        was the one preempted, or nobody could give way).
        """
        failed = self._never_fits(seq, tokens)
        if failed is not None:
            return failed
        while not self._ensure(seq, tokens):
            capped = self._capped(seq)
            victim = max((s for s in self.seqs.values() if s.pid not in keep and self.pool.tables.get(s.pid)
                          and (not capped or s.user == seq.user)), key=lambda s: s.rank, default=None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _capped(self, seq: Sequence) -> bool:
        """True when the pool has a block but the sequence's user may not take it."""
        return self.pool.free_blocks > 0 and not self.pool.can_allocate(1, seq.user)

    def _ensure(self, seq: Sequence, tokens: int) -> bool:
        """Grow ``seq``'s block table to ``tokens`` slots (growing a dynamic pool if need be); no preemption."""
        try:
            self.pool.ensure(seq.pid, tokens, seq.user)
            return True
        except OutOfMemory:
            pass
        if self.kv_policy != "dynamic" or not self._grow():
            return False
        return self._ensure(seq, tokens)

    def _grow(self) -> bool:
        """The dynamic policy: double the pool (up to its maximum) while the host has the memory."""
        import psutil

        new = min(self.max_blocks, 2 * self.pool.num_blocks)
        extra = new - self.pool.num_blocks
        nbytes = extra * self.pool.block_size * self.kv_token_bytes
        if extra <= 0 or (self.device.type == "cpu" and psutil.virtual_memory().available < nbytes + 2**30):
            return False
        self._grow_cache(extra)
        self.pool.grow(new)
        return True

    def _grow_cache(self, extra: int) -> None:
        """Engines that hold the KV tensors themselves add ``extra`` blocks to them."""

    def _shrink_if_idle(self) -> None:
        """The dynamic policy gives memory back once no sequence holds blocks."""
        if self.kv_policy == "dynamic" and not self.seqs and self.pool.num_blocks > self.initial_blocks:
            self.pool.reset(self.initial_blocks)
            self._shrink_cache(self.initial_blocks)

    def _shrink_cache(self, blocks: int) -> None:
        """Engines that hold the KV tensors themselves cut them to ``blocks``."""

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and cache; it is recomputed from its tokens when it runs again."""
        self.pool.free(seq.pid)
        seq.computed = 0
        seq.cache = None
        seq.preemptions += 1
        self.preemptions += 1

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

    def step(self) -> list[StepEvent]:  # pragma: no cover - abstract
        raise NotImplementedError


def load_model(path: str | Path, device: str | None = None) -> tuple[Any, Any, torch.device]:
    """(model, tokenizer, device) from a model directory; InvalidArgument when its tokenizer is not one
    (:func:`check_tokenizer`), before the weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
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


def load_engine(path: str | Path, device: str | None = None, engine: str = "auto", **kw: Any) -> BaseEngine:
    """Load a model directory and wrap it in the best engine that supports its architecture."""
    from llmos.drivers.model.paged import PagedEngine
    from llmos.drivers.model.sequential import SequentialEngine

    model, tokenizer, dev = load_model(path, device)
    if engine == "paged" or (engine == "auto" and PagedEngine.supports(model)):
        return PagedEngine(model, tokenizer, dev, name=str(path), **kw)
    return SequentialEngine(model, tokenizer, dev, name=str(path), **kw)
