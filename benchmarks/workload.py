"""The seeded benchmark workload and the random-weight Llama shapes it runs on."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmos.drivers.model.registry import DEFAULT_MODEL_DIR

SHAPES = {
    # overhead-bound: the kernel's and the bus's per-step cost shows here
    "5M": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4),
    # compute-bound
    "40M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8),
    # a small real model's shape (TinyLlama/Llama-2 family proportions): GQA with 4 KV heads, a Llama-2-sized
    # vocabulary, untied output layer; ~336M parameters. The default tokenizer has 4096 tokens: ids beyond it
    # are valid model ids that detokenise to nothing (drivers/model/text.py), and the requests are ids anyway
    "350M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
LONG_CONTEXT = 4352  # make_model's context for the long-context workload: 4,000 + 256 tokens fit
# shapes too slow for one `generate` per request (HF sequential is skipped for them)
NO_SEQUENTIAL = {"350M"}


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int


def workload(vocab: int, n: int = 32, seed: int = 0, prompt=(8, 96), output=(16, 96)) -> list[Request]:
    rng = random.Random(seed)
    return [Request([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))], rng.randint(*output))
            for _ in range(n)]


def long_context(vocab: int, seed: int = 0) -> list[Request]:
    """8 sequences of 4,000-token prompts, 256 output tokens each (needs a context of 4,256 or more)."""
    return workload(vocab, n=8, seed=seed, prompt=(4000, 4000), output=(256, 256))


def make_model(root: Path, shape: str, seed: int = 0, context: int = 512) -> Path:
    """A random-weight LlamaForCausalLM of the named shape (:data:`SHAPES`) and a ``context``-token window, with
    the default model's tokenizer (a shape may set its own vocab_size, KV heads and tying)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / (f"llama-{shape}" if context == 512 else f"llama-{shape}-{context}")
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": len(tok), "tie_word_embeddings": True,
                         "num_key_value_heads": SHAPES[shape]["num_attention_heads"], **SHAPES[shape]},
                      max_position_embeddings=context, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, path / f.name)
    return path
