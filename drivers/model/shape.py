"""A model's context length and KV-cache shape, read from its config under every common spelling.

One function, :func:`model_shape`, used by the memory estimate before loading (``estimate.py``, from
config.json) and by the engines after loading (``BaseEngine``, from the transformers config), so the
two never disagree. Families spell the same numbers differently: GPT-2 ``n_positions``/``n_embd``/
``n_head``/``n_layer``, MPT ``max_seq_len``/``d_model``/``n_heads``/``n_layers``, ChatGLM and Qwen-1
``seq_length``/``kv_channels``/``multi_query_group_num``, Falcon and GPT-BigCode ``multi_query``,
multimodal models nest the language model under ``text_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# the architectures the paged engine runs (model_type), and the largest weights it keeps a oneDNN-packed
# copy of on a CPU; here, not in paged.py, so that the kernel can estimate memory without importing torch
PAGED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})
PACK_LIMIT_BYTES = 4 * 2**30

DEFAULT_CONTEXT = 2048  # a config that states no context length (ALiBi models such as BLOOM)

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len",
                "max_sequence_length")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
HEADS_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
LAYERS_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HEAD_DIM_KEYS = ("head_dim", "kv_channels")
KV_HEADS_KEYS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache of one token holds: ``layers`` x (keys + values) x ``kv_heads`` x ``head_dim``."""

    context_len: int  # tokens
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        """Bytes of keys and values one token takes in the cache, at ``elem_bytes`` per element."""
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return int(v)
    return None


def _kv_heads(cfg: Mapping[str, Any], heads: int) -> int:
    n = _first(cfg, ("num_key_value_heads", "n_head_kv"))
    if n:
        return n
    if cfg.get("new_decoder_architecture"):  # Falcon-40B style: num_kv_heads groups
        return _first(cfg, ("num_kv_heads",)) or heads
    if cfg.get("multi_query"):  # Falcon-7B, GPT-BigCode: one shared key/value head
        return 1
    if cfg.get("multi_query_attention"):  # ChatGLM
        return _first(cfg, ("multi_query_group_num",)) or 1
    attn = cfg.get("attn_config")
    if isinstance(attn, Mapping) and _first(attn, ("kv_n_heads",)):  # MPT with grouped-query attention
        return _first(attn, ("kv_n_heads",)) or heads
    return _first(cfg, ("num_kv_heads", "multi_query_group_num")) or heads


def model_shape(config: Mapping[str, Any] | Any) -> ModelShape:
    """Read context length and KV shape from a config (a config.json dict or a transformers config).

    Keys in a nested ``text_config`` win over the top level's. Missing numbers give 0 (layers,
    heads, head size: the KV size is then 0, unknown) and ``DEFAULT_CONTEXT`` for the context.
    """
    cfg = dict(config if isinstance(config, Mapping) else config.to_dict())
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        cfg = {**cfg, **{k: v for k, v in text.items() if v is not None}}
    heads = _first(cfg, HEADS_KEYS) or 0
    hidden = _first(cfg, HIDDEN_KEYS) or 0
    head_dim = _first(cfg, HEAD_DIM_KEYS) or (hidden // heads if heads else 0)
    return ModelShape(context_len=_first(cfg, CONTEXT_KEYS) or DEFAULT_CONTEXT, layers=_first(cfg, LAYERS_KEYS) or 0,
                      heads=heads, kv_heads=_kv_heads(cfg, heads) if heads else 0, head_dim=head_dim)
