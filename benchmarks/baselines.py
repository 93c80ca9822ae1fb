"""Hugging Face baselines on the same workload: sequential, padded static batch, continuous batching, ceiling."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmarks.workload import Request


def load(path, dtype: str = "float32") -> Any:
    """The HF model at ``path`` with its weights in ``dtype`` (a torch dtype's name), for inference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


@torch.inference_mode()
def sequential(model: Any, reqs: list[Request]) -> tuple[float, list[list[int]]]:
    """One ``generate`` per request, greedy, EOS ignored (min_new_tokens = max_new_tokens)."""
    outs = []
    t = time.perf_counter()
    for r in reqs:
        ids = torch.tensor([r.prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new_tokens,
                             min_new_tokens=r.max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(out[0, ids.shape[1]:].tolist())
    return time.perf_counter() - t, outs


@torch.inference_mode()
def static_batch(model: Any, reqs: list[Request]) -> float:
    """All requests in one left-padded ``generate``; every row runs to the longest output."""
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    longest = max(r.max_new_tokens for r in reqs)
    t = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                   pad_token_id=0)
    return time.perf_counter() - t


@torch.inference_mode()
def static_prefill(model: Any, reqs: list[Request]) -> float:
    """Seconds to the static batch's first token: the same left-padded ``generate`` with one new token."""
    return static_batch(model, [Request(r.prompt_ids, 1) for r in reqs])


@torch.inference_mode()
def generate_batch(model: Any, reqs: list[Request]) -> tuple[float, str]:
    """transformers' own continuous batching, each request with its own max_new_tokens."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs),
                           eos_token_id=-1, pad_token_id=0)
    try:
        manager = model.init_continuous_batching(generation_config=cfg)
        manager.start()
        t = time.perf_counter()
        for r in reqs:
            manager.add_request(r.prompt_ids, max_new_tokens=r.max_new_tokens)
        done = 0
        while done < len(reqs):
            if manager.get_result(timeout=60) is not None:
                done += 1
        dt = time.perf_counter() - t
        manager.stop(block=True)
        return dt, "init_continuous_batching, per-request max_new_tokens"
    except Exception as exc:  # fall back to the one-config API
        t = time.perf_counter()
        model.generate_batch(inputs=[r.prompt_ids for r in reqs], generation_config=cfg, progress_bar=False)
        return time.perf_counter() - t, f"generate_batch, one max_new_tokens ({type(exc).__name__})"


@torch.inference_mode()
def decode_ceiling(model: Any, batch: int, context: int, repeats: int = 7) -> float:
    """The bare model's decode step at ``batch`` with ``context`` tokens cached: tokens per second."""
    x = torch.randint(3, model.config.vocab_size, (batch, context))
    out = model(x, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    nxt = torch.randint(3, model.config.vocab_size, (batch, 1))
    key = "cache" if "cache" in model.forward.__code__.co_varnames else "past_key_values"
    best = float("inf")
    for _ in range(repeats):
        c = copy.deepcopy(cache)
        t = time.perf_counter()
        model(nxt, use_cache=True, **{key: c})
        best = min(best, time.perf_counter() - t)
    return batch / best
