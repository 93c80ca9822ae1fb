"""What a capture asks for and what its files hold: the spec, its check against a model, the ``.npy`` bytes.

Torch-free, so the kernel checks a spawn's capture with the same rules as the worker (``capture.py``, which
computes the tensors). A file is numpy's format 1.0: the magic, a little-endian uint16 header length, a
Python-literal dict (``descr``, ``fortran_order``, ``shape``) padded with spaces to a multiple of 64 bytes
and a newline, then the C-ordered float32 data; ``np.load(io.BytesIO(data))`` reads it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from llmos.drivers.model.protocol import CAPTURE_KINDS as KINDS
from llmos.syscalls.errors import InvalidArgument, quote

DTYPE = "float32"  # every capture is float32 whatever the model's dtype (numpy has no bfloat16)
ELEM_BYTES = 4
_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(shape: tuple[int, ...] | list[int]) -> bytes:
    """The header of a C-ordered little-endian float32 array of ``shape``, as ``np.save`` writes it."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(int(n) for n in shape)!r}, }}"
    total = -(-(len(_MAGIC) + 2 + len(text) + 1) // 64) * 64
    text = text + " " * (total - len(_MAGIC) - 2 - len(text) - 1) + "\n"
    return _MAGIC + struct.pack("<H", len(text)) + text.encode("latin1")


def file_bytes(shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of the ``.npy`` file of a float32 array of ``shape``: header and data."""
    n = ELEM_BYTES
    for d in shape:
        n *= int(d)
    return len(npy_header(shape)) + n


@dataclass(frozen=True)
class CaptureSpec:
    """What a process asked to capture, as the kernel put it in its params (``params["capture"]``)."""

    kinds: tuple[str, ...]
    layers: tuple[int, ...] | None  # None: every layer
    heads: tuple[int, ...] | None  # None: every head (attentions)
    max_bytes: int  # the most bytes of files this capture may make
    key: int  # the kernel's key for this capture, echoed in every frame
    limit_doc: str = ""  # what ``max_bytes`` is, for the warning when it is reached

    @classmethod
    def from_params(cls, params: Any) -> "CaptureSpec | None":
        """The spec in a params map (None when there is none); InvalidArgument for a malformed one."""
        spec = params.get("capture") if isinstance(params, dict) else None
        if spec is None:
            return None
        try:
            kinds = tuple(spec["kinds"])
            layers = None if spec.get("layers") is None else tuple(int(x) for x in spec["layers"])
            heads = None if spec.get("heads") is None else tuple(int(x) for x in spec["heads"])
            out = cls(kinds, layers, heads, int(spec["max_bytes"]), int(spec["key"]), str(spec.get("limit_doc", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed capture spec {quote(spec)}: {exc}") from None
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise InvalidArgument(f"capture kinds must be some of {', '.join(KINDS)}; got {quote(list(kinds))}")
        return out


def resolve(spec: CaptureSpec, layers: int, heads: int, supported: tuple[str, ...], engine: str
            ) -> tuple[list[int], list[int], list[int]]:
    """(hidden_states layers, attentions layers, heads) that ``spec`` asks of a model of ``layers`` blocks and
    ``heads`` attention heads. InvalidArgument (EINVAL) naming the fault: a kind this engine cannot capture,
    a layer or head out of range, a duplicate."""
    for kind in spec.kinds:
        if kind not in supported:
            raise InvalidArgument(f"the {engine} engine cannot capture {kind} (it captures "
                                  f"{', '.join(supported) or 'nothing'}); the paged engine captures "
                                  f"{', '.join(KINDS)} (Llama, Qwen2 and Mistral models)")
    asked = list(spec.layers) if spec.layers is not None else None
    if asked is not None:
        if len(set(asked)) != len(asked):
            raise InvalidArgument(f"capture_layers has duplicates: {quote(asked)}")
        top = layers if "hidden_states" in spec.kinds else layers - 1
        wrong = [x for x in asked if not 0 <= x <= top]
        if wrong:
            raise InvalidArgument(f"capture_layers {quote(wrong)} out of range: the model has {layers} layers "
                                  f"(hidden_states 0..{layers}, attentions 0..{layers - 1})")
    hidden = (asked if asked is not None else list(range(layers + 1))) if "hidden_states" in spec.kinds else []
    attn = ([x for x in asked if x < layers] if asked is not None else list(range(layers))) \
        if "attentions" in spec.kinds else []
    head_list = list(spec.heads) if spec.heads is not None else list(range(heads))
    if spec.heads is not None:
        if not head_list or len(set(head_list)) != len(head_list):
            raise InvalidArgument(f"capture_heads must be distinct head numbers; got {quote(head_list)}")
        wrong = [h for h in head_list if not 0 <= h < heads]
        if wrong:
            raise InvalidArgument(f"capture_heads {quote(wrong)} out of range: the model has {heads} heads "
                                  f"(0..{heads - 1})")
    return hidden, attn, head_list
