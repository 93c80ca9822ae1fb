"""The executor engine: runs many sequences on one model, one token each per step, and streams.

This first engine keeps one transformers KV cache per sequence and steps the running
sequences one after another, so every process makes progress every step. Its contract
(``encode``, ``add``, ``abort``, ``step`` returning :class:`StepEvent`) is what the worker
and the kernel rely on; a batched, paged engine can replace it behind the same contract.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.drivers.model.sampling import SamplingParams, sample
from llmos.drivers.model.text import TextTracker
from llmos.syscalls.errors import Errno, InvalidArgument, TooBig


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

    @classmethod
    def from_wire(cls, w: list) -> "StepEvent":
        return cls(*w)


@dataclass
class Sequence:
    pid: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: TextTracker
    generated: list[int] = field(default_factory=list)
    cache: Any = None
    next_input: torch.Tensor | None = None  # ids to feed on the next forward


class Engine:
    """Owns one model instance, its tokenizer and the sequences running on it."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, name: str = "model",
                 max_batch: int = 16) -> None:
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
        self.steps = 0
        # transformers 5.x renamed the KV cache argument and output field from past_key_values to cache
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str | None = None, max_batch: int = 16) -> "Engine":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev)
        model.eval()
        return cls(model, tokenizer, dev, name=str(path), max_batch=max_batch)

    def info(self) -> dict[str, Any]:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "context_len": self.context_len,
            "vocab_size": int(self.model.config.vocab_size),
            "parameters": n_params,
            "max_batch": self.max_batch,
            "architecture": type(self.model).__name__,
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }

    # -- the contract ----------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Tokenise a prompt or render chat messages with the model's chat template."""
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give exactly one of 'prompt' and 'messages'")
        if messages is not None:
            ids = self._encode_messages(messages)
        else:
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            if not ids:
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise InvalidArgument("empty prompt, and the model has no BOS token to start from")
                ids = [bos]
        if len(ids) >= self.context_len:
            raise TooBig(f"prompt is {len(ids)} tokens; the model's context holds {self.context_len} "
                         "(and at least one token must be generated)")
        return ids

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(f"model {self.name} has no chat template; use 'prompt'")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"message {i} must be a map with string 'role' and 'content'")
        if not messages:
            raise InvalidArgument("'messages' is empty")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add(self, pid: int, prompt_ids: list[int], params: SamplingParams | dict) -> None:
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if pid in self.seqs:
            raise InvalidArgument(f"pid {pid} already runs on this engine")
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        self.seqs[pid] = Sequence(pid, list(prompt_ids), params, params.generator(self.device),
                                  TextTracker(self.tokenizer, params.stop), next_input=ids)

    def abort(self, pid: int) -> StepEvent | None:
        """End a sequence now (signal TERM): keep and flush what it generated."""
        seq = self.seqs.pop(pid, None)
        if seq is None:
            return None
        return StepEvent(pid, [], seq.text.finish(), "killed", seq.text.text)

    def has_work(self) -> bool:
        return bool(self.seqs)

    @property
    def running(self) -> int:
        return len(self.seqs)

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Advance every sequence by one token (prefilling new ones first)."""
        events: list[StepEvent] = []
        for seq in list(self.seqs.values()):
            try:
                events.append(self._advance(seq))
            except Exception as exc:  # one bad sequence must not take the others down
                self.seqs.pop(seq.pid, None)
                events.append(StepEvent(seq.pid, [], seq.text.finish(), "error", seq.text.text,
                                        {"errno": int(Errno.EIO), "error": "EIO",
                                         "message": f"model step failed: {type(exc).__name__}: {exc}"}))
        self.steps += 1
        return events

    def _advance(self, seq: Sequence) -> StepEvent:
        out = self.model(input_ids=seq.next_input, use_cache=True, **self._extra,
                         **{self._cache_kw: seq.cache})
        seq.cache = getattr(out, self._cache_kw)
        logits = out.logits[0, -1]
        context = None
        if seq.params.repetition_penalty != 1.0:
            context = torch.tensor(seq.prompt_ids + seq.generated, dtype=torch.long, device=self.device)
        token = sample(logits, seq.params, seq.generator, context)
        seq.generated.append(token)
        seq.next_input = torch.tensor([[token]], dtype=torch.long, device=self.device)
        delta = seq.text.update(seq.generated)
        reason = self._finish_reason(seq, token)
        if reason is None:
            return StepEvent(seq.pid, [token], delta)
        del self.seqs[seq.pid]
        delta += seq.text.finish()
        return StepEvent(seq.pid, [token], delta, reason, seq.text.text)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.text.stopped or token in p.stop_token_ids:
            return "stop"
        if token in self.eos_ids and not p.ignore_eos:
            return "stop"
        if len(seq.generated) >= p.max_new_tokens:
            return "length"
        if len(seq.prompt_ids) + len(seq.generated) >= self.context_len:
            return "length"
        return None

