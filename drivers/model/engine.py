"""Engines run many sequences on one model instance and stream their tokens; this module holds their contract.

An engine offers ``encode`` (prompt or chat messages to token ids), ``add`` (start a
sequence), ``abort`` (end one now, keeping its output), ``has_work`` and ``step`` (advance
every sequence it can, returning :class:`StepEvent`s). ``load_engine`` picks the paged,
continuously batching engine (``paged.py``) for the Llama family and the sequential engine
(``sequential.py``, plain transformers with one KV cache per sequence) for any other
causal LM.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.drivers.memory import KVBlockPool
from llmos.drivers.model.estimate import kv_bytes_per_token
from llmos.drivers.model.prompt import check_length, check_prompt_ids
from llmos.drivers.model.sampling import SamplingParams
from llmos.drivers.model.text import TextTracker
from llmos.syscalls.errors import Errno, InvalidArgument


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

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def rank(self) -> tuple[int, int]:
        """Lower ranks run first and are preempted last."""
        return (self.priority, self.arrival)


def error_dict(errno: Errno, message: str) -> dict[str, Any]:
    return {"errno": int(errno), "error": errno.name, "message": message}


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
        self.context_len = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if num_blocks is None:  # room for a full batch of full contexts (+ the padding block)
            num_blocks = max_batch * -(-self.context_len // block_size) + 1
        if kv_policy not in ("static", "dynamic", "isolated"):
            raise InvalidArgument(f"unknown KV memory policy {kv_policy!r}: static, dynamic or isolated")
        self.kv_policy = kv_policy
        self.initial_blocks = num_blocks
        self.max_blocks = max(max_blocks or num_blocks, num_blocks) if kv_policy == "dynamic" else num_blocks
        caps = user_caps if kv_policy == "isolated" else None
        self.pool = KVBlockPool(num_blocks, block_size, caps, user_cap_blocks if kv_policy == "isolated" else None)
        elem = next(model.parameters()).element_size()
        self.kv_token_bytes = kv_bytes_per_token(cfg.to_dict(), elem)
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
        """Tokenise a prompt, render chat messages with the model's chat template, or check token ids."""
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise InvalidArgument("give exactly one of 'prompt', 'messages' and 'prompt_ids'")
        if prompt_ids is not None:
            return check_prompt_ids(prompt_ids, int(self.model.config.vocab_size), self.context_len)
        if messages is not None:
            ids = self._encode_messages(messages)
        else:
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            if not ids:
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise InvalidArgument("empty prompt, and the model has no BOS token to start from")
                ids = [bos]
        check_length(len(ids), self.context_len)
        return ids

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {self.name} has no chat template; use 'prompt'")
        if not messages:
            raise InvalidArgument("'messages' is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"message {i} must be a map with string 'role' and 'content'")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- sequences -------------------------------------------------------------------------
    def add(self, pid: int, prompt_ids: list[int], params: SamplingParams | dict, user: str = "",
            priority: int = 0) -> None:
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if pid in self.seqs:
            raise InvalidArgument(f"pid {pid} already runs on this engine")
        if not prompt_ids:
            raise InvalidArgument("empty prompt")
        self.seqs[pid] = Sequence(pid, list(prompt_ids), len(prompt_ids), params, params.generator(self.device),
                                  TextTracker(self.tokenizer, params.stop), user=user, priority=priority)

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
        return StepEvent(seq.pid, [], seq.text.finish(), "error", seq.text.text, error_dict(errno, message))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.text.stopped or token in p.stop_token_ids:
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev)
    model.eval()
    return model, tokenizer, dev


def load_engine(path: str | Path, device: str | None = None, engine: str = "auto", **kw: Any) -> BaseEngine:
    """Load a model directory and wrap it in the best engine that supports its architecture."""
    from llmos.drivers.model.paged import PagedEngine
    from llmos.drivers.model.sequential import SequentialEngine

    model, tokenizer, dev = load_model(path, device)
    if engine == "paged" or (engine == "auto" and PagedEngine.supports(model)):
        return PagedEngine(model, tokenizer, dev, name=str(path), **kw)
    return SequentialEngine(model, tokenizer, dev, name=str(path), **kw)
