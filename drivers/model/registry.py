"""Where models are found: the shipped default model and any Hugging Face causal LM directory.

``resolve_model`` also checks the directory's files before anything loads them (config.json parses
to a JSON object; every safetensors header is well formed and inside its file), so a broken model
is refused with EINVAL naming the file and the fault, not with an error from deep in a loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llmos.syscalls.errors import InvalidArgument, NotFound

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own bound on a header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_checked: dict[str, tuple] = {}  # model directory -> the file stamps it last passed the check with


def resolve_model(model: str | None) -> str:
    """Map a model name or path to the absolute path of a checked model directory.

    NotFound (ENOENT) when there is no directory with a config.json; InvalidArgument (EINVAL) when
    its files are broken (see :func:`check_model_dir`).
    """
    if model is None or model == DEFAULT_MODEL_NAME:
        path = DEFAULT_MODEL_DIR
    else:
        path = Path(model).expanduser()
        if not path.is_absolute():
            raise NotFound(f"model {model!r}: give an absolute path to a Hugging Face model directory "
                           f"or '{DEFAULT_MODEL_NAME}'")
    if not (path / "config.json").is_file():
        raise NotFound(f"no model at {model!r}: expected a Hugging Face model directory with config.json")
    resolved = path.resolve()
    check_model_dir(resolved)
    return str(resolved)


def check_model_dir(path: Path) -> None:
    """InvalidArgument naming the file and the fault when config.json is not a JSON object or a
    ``*.safetensors`` file's header is malformed or points outside the file. Only headers are read;
    a directory whose files have not changed since it last passed is not read again."""
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    try:
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError as exc:
        raise InvalidArgument(f"model {path}: cannot read {exc.filename}: {exc.strerror}") from None
    if _checked.get(str(path)) == stamp:
        return
    _check_config(files[0])
    for f in files[1:]:
        check_safetensors(f)
    _checked[str(path)] = stamp


def _check_config(f: Path) -> None:
    try:
        config = json.loads(f.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{f} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {f}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{f} must hold a JSON object, not {type(config).__name__}")


def check_safetensors(f: Path) -> None:
    """InvalidArgument unless ``f`` has a well-formed safetensors header: an 8-byte little-endian length,
    that many bytes of a JSON object inside the file, and for every tensor a dtype, a shape and data
    offsets that lie inside the data area and match the shape's size."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidArgument(f"{f} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise InvalidArgument(f"{f} is not a safetensors file: its header claims {n} bytes, "
                                  f"the file holds {size - 8} after the length")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{f}: the safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{f}: the safetensors header must be a JSON object")
    data = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        fault = _tensor_fault(meta, data)
        if fault:
            raise InvalidArgument(f"{f}: tensor {name[:200]!r}: {fault}")


def _tensor_fault(meta: object, data: int) -> str | None:
    if not isinstance(meta, dict):
        return "its entry is not a JSON object"
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        return "no dtype"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        return f"data_offsets {offsets!r} is not a [begin, end] pair"
    begin, end = offsets
    if not 0 <= begin <= end <= data:
        return f"data_offsets [{begin}, {end}] lie outside the file's {data} data bytes"
    if dtype in _DTYPE_BYTES:
        numel = 1
        for d in shape:
            numel *= d
        if numel * _DTYPE_BYTES[dtype] != end - begin:
            return f"shape {shape} of {dtype} needs {numel * _DTYPE_BYTES[dtype]} bytes, its offsets give {end - begin}"
    return None
