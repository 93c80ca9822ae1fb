"""Captured intermediates, the client's side: where a process's captured tensors are and how they load.

A process spawned with ``capture=["attentions", "hidden_states"]`` (optionally ``capture_layers``,
``capture_heads``) has its tensors stored by the kernel as ``.npy`` files (float32):

    /proc/<pid>/capture/hidden_states/<layer>.npy   [tokens, hidden], layer 0..L of a model of L blocks: 0 the
                                                    embeddings' output, l block l's output, L the last block's
                                                    output after the final norm (transformers' output_hidden_states)
    /proc/<pid>/capture/attentions/<layer>.npy      [tokens, heads, tokens], layer 0..L-1: row t the softmax weights
                                                    of position t over positions 0..t, zero beyond; heads as chosen
    /proc/<pid>/capture/index.json                  {tokens, heads, dtype, layers: {kind: [...]}, warnings}

tokens: every position the model processed, the prompt's and then each generated token's but the last (it is
sampled, never fed back). They outlive the process (``wait`` reaps it, its capture stays); its owner and the
admin read them.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from llmos.syscalls.errors import InvalidArgument, quote

KINDS = ("attentions", "hidden_states")


def capture_path(pid: int, kind: str, layer: int) -> str:
    """The store path of one captured tensor. InvalidArgument for an unknown kind or a layer that is not a
    whole number >= 0."""
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}; got {quote(kind)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise InvalidArgument(f"layer must be a whole number >= 0; got {quote(layer)}")
    return f"/proc/{int(pid)}/capture/{kind}/{layer}.npy"


def load_array(data: bytes) -> Any:
    """A stored ``.npy`` file's bytes as a numpy array (no pickles)."""
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def read_capture(get: Callable[[str], bytes], pid: int, kind: str, layer: int) -> Any:
    """``kind``'s tensor of ``layer`` read through ``get`` (path -> the file's bytes), as a numpy array."""
    return load_array(get(capture_path(pid, kind, layer)))
