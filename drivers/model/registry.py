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
from typing import Any, Callable

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


def resolve_model(model: str | None, fs: Any = None) -> str:
    """Map a model name or path to the absolute path of a checked model directory, or to a checked model in the
    store (``store:/models/<name>``).

    A string that is no model directory but names a model of the store (``<name>``, ``/models/<name>`` or
    ``store:/models/<name>``) resolves there, through ``fs`` (an ``llmos.drivers.storage.FS``; default: the
    process's, see ``from_store.use_store``). 'default' (or None) is always the shipped model's directory.
    NotFound (ENOENT) when there is no directory with a config.json (or the path names a missing user's
    home) and the store has no such model (the message names both places looked at); InvalidArgument
    (EINVAL) when the OS refuses the path (a component over 255 bytes, no permission) or the model's files
    are broken (see :func:`check_model_dir` and ``from_store.check_model``).
    """
    from llmos.drivers.model import from_store

    if model is None or model == DEFAULT_MODEL_NAME:
        path = DEFAULT_MODEL_DIR
    else:
        store = fs if fs is not None else from_store.process_store()
        name = from_store.store_name(model)
        if model.startswith(from_store.SCHEME):
            return _resolve_stored(model, name, store)
        try:
            path = Path(model).expanduser()
        except RuntimeError:  # "~name/..." for a user with no home directory
            raise NotFound(f"model {quote_path(model)}: no such user's home directory") from None
        if not path.is_absolute():
            if name is not None:
                return _resolve_stored(model, name, store, "not a directory (a model path must be absolute)")
            raise NotFound(f"model {quote_path(model)}: give an absolute path to a Hugging Face model directory, "
                           f"'{DEFAULT_MODEL_NAME}', or the name of a model in the store")
        try:
            if not (path / "config.json").is_file():
                if name is not None and not path.exists():
                    return _resolve_stored(model, name, store, "no such directory")
                raise NotFound(f"no model at {quote_path(model)}: expected a Hugging Face model directory with "
                               "config.json")
        except OSError as exc:
            raise path_error(f"model {quote_path(model)}", exc) from None
        except (RuntimeError, ValueError) as exc:  # a symlink loop; a NUL byte
            raise NotFound(f"no model at {quote_path(model)}: {type(exc).__name__}: {quote(str(exc))}") from None
    try:
        resolved = path.resolve()
    except OSError as exc:
        raise path_error(f"model {quote_path(model)}", exc) from None
    except (RuntimeError, ValueError) as exc:
        raise NotFound(f"no model at {quote_path(model)}: {type(exc).__name__}: {quote(str(exc))}") from None
    check_model_dir(resolved)
    return str(resolved)


def _resolve_stored(model: str, name: str | None, store: Any, on_disk: str | None = None) -> str:
    """``store:/models/<name>`` once the store's model ``name`` passes its check; NotFound naming the places
    looked at (the disk, when ``on_disk`` says what was found there, and the store)."""
    from llmos.drivers.model import from_store

    if name is None:
        raise NotFound(f"model {quote_path(model)}: a store model is named store:/models/<name>, the name being "
                       f"{from_store.NAME_DOC}")
    disk = f"{on_disk}, " if on_disk else ""
    if store is None:
        raise NotFound(f"no model {quote_path(model)}: {disk}and no store is open to look in")
    try:
        from_store.check_model(store, name)
    except NotFound as exc:
        raise NotFound(f"no model {quote_path(model)}: {disk}and in the store {exc.message}") from None
    return from_store.ref(name)


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
    check_tokenizer_files(names, where)
    for f in files[1:]:
        check_safetensors(f, where)
    _checked[str(path)] = stamp


def check_tokenizer_files(names: set[str], where: str = "model") -> None:
    """InvalidArgument unless the file names ``names`` of a model include a tokenizer's files."""
    if not (names.intersection(TOKENIZER_FILES) or {"vocab.json", "merges.txt"} <= names
            or any(n.endswith(".tiktoken") for n in names)):
        raise InvalidArgument(f"{where}: no tokenizer files (one of tokenizer.json, tokenizer.model, vocab.json "
                              "with merges.txt, vocab.txt, spiece.model, sentencepiece.bpe.model, *.tiktoken)")


def check_config(f: Path, where: str = "model") -> dict[str, Any]:
    """The config.json at ``f`` as a dict, or InvalidArgument naming the fault: not JSON, not an object,
    or a model shape key (context, sizes, heads, layers, vocabulary) that is not a whole number in range."""
    try:
        raw = f.read_bytes()
    except OSError as exc:
        raise path_error(f"{where}: cannot read config.json", exc) from None
    return parse_config(raw, where)


def parse_config(raw: bytes, where: str = "model") -> dict[str, Any]:
    """config.json's bytes as a dict, checked as :func:`check_config` says."""
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{where}: config.json is not valid JSON: {exc}") from None
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
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            def read(lo: int, hi: int) -> bytes:
                fh.seek(lo)
                return fh.read(hi - lo)

            safetensors_header(read, size, f.name, where)
    except OSError as exc:
        raise path_error(f"{where}: cannot read {quote(f.name)}", exc) from None


def safetensors_header(read: Callable[[int, int], bytes], size: int, filename: str,
                       where: str = "model") -> tuple[int, dict[str, Any]]:
    """(n, header) of a safetensors file of ``size`` bytes whose bytes ``[lo, hi)`` ``read(lo, hi)`` gives:
    the header's length n (its JSON is bytes [8, 8 + n), the data starts at 8 + n) and the header as a
    dict, checked as :func:`check_safetensors` says (InvalidArgument naming ``filename`` and the fault)."""
    name = quote(filename)
    head = read(0, min(8, size))
    if len(head) < 8:
        raise InvalidArgument(f"{where}: {name} is not a safetensors file: {size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
        raise InvalidArgument(f"{where}: {name} is not a safetensors file: its header claims {n} bytes, "
                              f"the file holds {size - 8} after the length")
    raw = read(8, 8 + n)
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
    return n, header


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
