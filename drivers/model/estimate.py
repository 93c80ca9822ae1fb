"""How much memory a model instance will take, read from its files before loading it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmos.drivers.model import from_store
from llmos.drivers.model.precision import element_bytes
from llmos.drivers.model.registry import check_config, path_error
from llmos.drivers.model.shape import PACK_LIMIT_BYTES, PAGED_MODEL_TYPES, model_shape
from llmos.syscalls.errors import InvalidArgument, NotFound, quote

MAX_ESTIMATE_BYTES = 2**63 - 1
WORKER_OVERHEAD_BYTES = 350 * 2**20  # a worker with torch and transformers imported: the RSS ps showed for one on the tiny test model
# what a worker holds on a GPU besides its weights and KV pool: the CUDA context, cuBLAS's workspace and the
# caching allocator's slack. Measured by benchmarks/gpu.py on an H200 (torch 2.11, CUDA 13): NVML showed a
# worker of a 40M model holding 1,044 MiB for 268 MiB of weights and KV (2026-11-30).
GPU_OVERHEAD_BYTES = 800 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def parameter_count(path: str | Path) -> int:
    """Count parameters from safetensors headers (no tensor is read); fall back to file sizes."""
    path = Path(path)
    total = 0
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                numel = 1
                for d in meta["shape"]:
                    numel *= d
                total += numel
    if not files:  # pytorch_model*.bin: assume 2 bytes per parameter as saved
        total = sum(f.stat().st_size for f in path.glob("*.bin")) // 2
    return total


def kv_bytes_per_token(config: dict[str, Any], elem_bytes: int) -> int:
    """Bytes of keys and values per token, from a config in any common spelling (``shape.model_shape``)."""
    return model_shape(config).kv_bytes_per_token(elem_bytes)


def estimate(path: str | Path, device: str = "cpu", kv_tokens: int | None = None,
             max_batch: int = 64, dtype: str | None = None) -> dict[str, Any]:
    """Bytes for weights, KV pool and process overhead of one instance on ``device`` (on a GPU: what the GPU
    will hold, the CUDA context included; on the CPU: the worker process's memory).

    ``dtype``: the load option (precision.py; None or "auto" as the hardware decides).
    InvalidArgument (or NotFound) when config.json fails :func:`registry.check_config` or a file cannot
    be read, and when a number would not fit a signed 64-bit integer (MessagePack's, and any
    memory budget's, range): the config states a shape no real model has.
    """
    where = f"model {quote(str(path))}"
    elem = element_bytes(dtype, "cpu" if device == "cpu" else "cuda")  # weights and KV in the load's dtype
    stored = from_store.ref_name(str(path))
    if stored is not None:  # a model in the store (store:/models/<name>): its config and headers from there
        fs = from_store.process_store()
        if fs is None:
            raise NotFound(f"{where}: no store is open in this process")
        config, params = from_store.read_config(fs, stored), from_store.parameter_count(fs, stored)
    else:
        config = check_config(Path(path) / "config.json", where)
        try:
            params = parameter_count(path)
        except OSError as exc:  # the files changed since resolve_model checked them
            raise path_error(f"{where}: cannot read its weights", exc) from None
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise InvalidArgument(f"{where}: a safetensors header changed and is malformed: "
                                  f"{type(exc).__name__}") from None
    shape = model_shape(config)
    per_token = shape.kv_bytes_per_token(elem)
    context = shape.context_len
    if kv_tokens is None:
        kv_tokens = max_batch * context
    weights = params * elem
    # the paged engine on a CPU keeps a oneDNN-packed copy of the weights of models up to the limit
    if device == "cpu" and config.get("model_type") in PAGED_MODEL_TYPES and weights <= PACK_LIMIT_BYTES:
        weights *= 2
    if elem < 4 and config.get("model_type") in PAGED_MODEL_TYPES:  # the paged engine's float32 copy of the LM head
        weights += 4 * int(config.get("vocab_size") or 0) * int(config.get("hidden_size") or 0)
    kv = per_token * kv_tokens
    overhead = WORKER_OVERHEAD_BYTES if device == "cpu" else GPU_OVERHEAD_BYTES  # what the device itself holds
    if max(weights, kv, weights + kv + overhead) > MAX_ESTIMATE_BYTES:
        raise InvalidArgument(f"model {quote(str(path))}: config.json gives {per_token} bytes of KV cache per token "
                              f"and {context} tokens of context, {weights + kv} bytes for {kv_tokens} tokens; "
                              "that is no real model's shape (more than 2**63 bytes cannot even be counted)")
    return {"parameters": params, "weight_bytes": weights, "kv_bytes": kv, "kv_bytes_per_token": per_token,
            "kv_tokens": kv_tokens, "overhead_bytes": overhead,
            "total_bytes": weights + kv + overhead, "context_len": context}
