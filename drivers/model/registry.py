"""Where models are found: the shipped default model and any Hugging Face causal LM directory.

``resolve_model`` also checks the directory before anything loads it: the path itself (a path the
OS refuses, too long, unreadable, is ENOENT or EINVAL saying so), config.json (a JSON object whose
model shape is in range: positive sizes the memory estimate can represent), a tokenizer's files,
and every safetensors header (well formed, inside its file). A broken model is refused with EINVAL
naming the file and the fault, not with an error from deep in a loader. Every path or name an error
quotes is cut to a short prefix (``errors.quote``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from llmos.drivers.model.shape import (CONTEXT_KEYS, HEAD_DIM_KEYS, HEADS_KEYS, HIDDEN_KEYS, KV_HEADS_KEYS,
                                       LAYERS_KEYS)
from llmos.syscalls.errors import InvalidArgument, LLMOSError, NotFound, quote, quote_path

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own bound on a header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Each config key of the model's shape, when present (and not null), must be a whole number in
# [1, bound]. The bounds are far above any real model (the largest have ~128k contexts... 10M, 16k-32k
# hidden, ~128 heads, ~160 layers, ~256k vocabularies) and far below what breaks the loader or the
# estimate; transformers accepts a negative n_positions and fails later with "negative dimension".
SHAPE_BOUNDS: tuple[tuple[tuple[str, ...], int], ...] = (
    (CONTEXT_KEYS, 2**31),
    (HIDDEN_KEYS, 2**20),
    (HEADS_KEYS, 2**16),
    (KV_HEADS_KEYS, 2**16),
    (LAYERS_KEYS, 2**16),
    (HEAD_DIM_KEYS, 2**16),
    (("vocab_size",), 2**26),
    (("intermediate_size", "n_inner", "ffn_hidden_size"), 2**22),
)

# Files one of which a tokenizer needs (vocab.json only with merges.txt); without them transformers
# quietly builds an empty tokenizer of one token, and generation prints nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "sentencepiece.model", "spm.model", "vocab.txt", "qwen.tiktoken", "tokenizer.tiktoken")
_checked: dict[str, tuple] = {}  # model directory -> the stamps it last passed the check with


def resolve_model(model: str | None) -> str:
    """Map a model name or path to the absolute path of a checked model directory.

    NotFound (ENOENT) when there is no directory with a config.json (or the path names a missing
    user's home); InvalidArgument (EINVAL) when the OS refuses the path (a component over 255 bytes,
    no permission) or the directory's files are broken (see :func:`check_model_dir`).
    """
    if model is None or model == DEFAULT_MODEL_NAME:
        path = DEFAULT_MODEL_DIR
    else:
        try:
            path = Path(model).expanduser()
        except RuntimeError:  # "~name/..." for a user with no home directory
            raise NotFound(f"model {quote_path(model)}: no such user's home directory") from None
        if not path.is_absolute():
            raise NotFound(f"model {quote_path(model)}: give an absolute path to a Hugging Face model directory "
                           f"or '{DEFAULT_MODEL_NAME}'")
    try:
        if not (path / "config.json").is_file():
            raise NotFound(f"no model at {quote_path(model)}: expected a Hugging Face model directory with config.json")
        resolved = path.resolve()
    except OSError as exc:
        raise path_error(f"model {quote_path(model)}", exc) from None
    except (RuntimeError, ValueError) as exc:  # a symlink loop; a NUL byte
        raise NotFound(f"no model at {quote_path(model)}: {type(exc).__name__}: {quote(str(exc))}") from None
    check_model_dir(resolved)
    return str(resolved)


def path_error(what: str, exc: OSError) -> LLMOSError:
    """The error for an OSError on a path: NotFound when nothing is there, else InvalidArgument saying why."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENAMETOOLONG:
        reason += " (a path component over 255 bytes, or the path over 4096)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        return NotFound(f"{what}: {reason}")
    return InvalidArgument(f"{what}: {reason}")


def check_model_dir(path: Path) -> None:
    """InvalidArgument naming the file and the fault when config.json is not a JSON object or states
    a model shape out of range, no tokenizer's files are there, or a ``*.safetensors`` file's header
    is malformed or points outside the file. Only headers are read; a directory whose files have not
    changed since it last passed is not read again."""
    where = f"model {quote_path(path)}"
    try:
        names = set(os.listdir(path))
        files = [path / "config.json", *(path / n for n in sorted(names) if n.endswith(".safetensors"))]
        stamp = (path.stat().st_mtime_ns, *((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    except OSError as exc:
        what = quote(Path(exc.filename).name) if exc.filename else "the directory"
        raise path_error(f"{where}: cannot read {what}", exc) from None
    if _checked.get(str(path)) == stamp:
        return
    check_config(files[0], where)
    if not (names.intersection(TOKENIZER_FILES) or {"vocab.json", "merges.txt"} <= names
            or any(n.endswith(".tiktoken") for n in names)):
        raise InvalidArgument(f"{where}: no tokenizer files (one of tokenizer.json, tokenizer.model, vocab.json "
                              "with merges.txt, vocab.txt, spiece.model, sentencepiece.bpe.model, *.tiktoken)")
    for f in files[1:]:
        check_safetensors(f, where)
    _checked[str(path)] = stamp


def check_config(f: Path, where: str = "model") -> dict[str, Any]:
    """The config.json at ``f`` as a dict, or InvalidArgument naming the fault: not JSON, not an object,
    or a model shape key (context, sizes, heads, layers, vocabulary) that is not a whole number in range."""
    try:
        config = json.loads(f.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{where}: config.json is not valid JSON: {exc}") from None
    except OSError as exc:
        raise path_error(f"{where}: cannot read config.json", exc) from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{where}: config.json must hold a JSON object, not {type(config).__name__}")
    text = config.get("text_config")
    for section, cfg in (("", config), ("text_config.", text if isinstance(text, dict) else {})):
        for keys, bound in SHAPE_BOUNDS:
            for k in keys:
                v = cfg.get(k)
                if v is not None and not _whole_in(v, bound):
                    raise InvalidArgument(f"{where}: config.json: {section}{k} is {quote(v)}; it must be a whole "
                                          f"number from 1 to {bound}")
    return config


def _whole_in(v: object, bound: int) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return (isinstance(v, int) or (math.isfinite(v) and v == int(v))) and 1 <= v <= bound


def check_safetensors(f: Path, where: str = "model") -> None:
    """InvalidArgument unless ``f`` has a well-formed safetensors header: an 8-byte little-endian length,
    that many bytes of a JSON object inside the file, and for every tensor a dtype, a shape and data
    offsets that lie inside the data area and match the shape's size."""
    name = quote(f.name)
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InvalidArgument(f"{where}: {name} is not a safetensors file: {size} bytes, too short "
                                      "for a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
                raise InvalidArgument(f"{where}: {name} is not a safetensors file: its header claims {n} bytes, "
                                      f"the file holds {size - 8} after the length")
            raw = fh.read(n)
    except OSError as exc:
        raise path_error(f"{where}: cannot read {name}", exc) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{where}: {name}: the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{where}: {name}: the safetensors header must be a JSON object")
    data = size - 8 - n
    for tensor, meta in header.items():
        if tensor == "__metadata__":
            continue
        fault = _tensor_fault(meta, data)
        if fault:
            raise InvalidArgument(f"{where}: {name}: tensor {quote(tensor)}: {fault}")


def _tensor_fault(meta: object, data: int) -> str | None:
    if not isinstance(meta, dict):
        return "its entry is not a JSON object"
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        return "no dtype"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {quote(shape)} is not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        return f"data_offsets {quote(offsets)} is not a [begin, end] pair"
    begin, end = offsets
    if not 0 <= begin <= end <= data:
        return f"data_offsets [{begin}, {end}] lie outside the file's {data} data bytes"
    if dtype in _DTYPE_BYTES:
        numel = 1
        for d in shape:
            numel *= d
        if numel * _DTYPE_BYTES[dtype] != end - begin:
            return (f"shape {quote(shape)} of {quote(dtype)} needs {numel * _DTYPE_BYTES[dtype]} bytes, "
                    f"its offsets give {end - begin}")
    return None
