"""Precision: the dtype a model's weights, KV cache and kernels run in (the ``dtype`` load option).

``auto`` picks bfloat16 where the hardware has bfloat16 units, float32 elsewhere: on a CPU, AMX
(``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) from /proc/cpuinfo's flags; on a GPU,
``torch.cuda.is_bf16_supported()`` (else float16). Without those units bfloat16 still runs (by conversion),
only slower: it is never picked by ``auto`` there. Logits and sampling stay float32 in every dtype.

``LLMOS_AUTO_DTYPE`` (float32, bfloat16 or float16), when set, is what ``auto`` means on every device: runs
that must not depend on the machine (the test suite pins float32) set it.

No torch import at module level: the kernel resolves dtypes for its memory estimate without torch.
"""

from __future__ import annotations

import os
from functools import lru_cache

from llmos.syscalls.errors import InvalidArgument

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_units() -> list[str]:
    """Which of the CPU's bfloat16 units it has (``amx_bf16``, ``avx512_bf16``); empty: none."""
    return [f for f in BF16_CPU_FLAGS if f in cpu_flags()]


def resolve(dtype: str | None, device_type: str) -> str:
    """The concrete dtype name for ``dtype`` (None or "auto" decided by the hardware) on a device of
    ``device_type`` ("cpu" or "cuda"). InvalidArgument for a name not in DTYPES."""
    if dtype in (None, "auto"):
        pinned = os.environ.get("LLMOS_AUTO_DTYPE")
        if pinned:
            if pinned not in ELEMENT_BYTES:
                raise InvalidArgument(f"LLMOS_AUTO_DTYPE={pinned!r}: one of {', '.join(ELEMENT_BYTES)}")
            return pinned
        if device_type == "cpu":
            return "bfloat16" if cpu_bf16_units() else "float32"
        import torch

        try:  # a GPU that only emulates bfloat16 (compute capability < 8) takes float16
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch: no emulation to tell apart
            native = torch.cuda.is_bf16_supported()
        return "bfloat16" if native else "float16"
    if dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}")
    return dtype


def element_bytes(dtype: str | None, device_type: str) -> int:
    """Bytes per weight or KV element for ``dtype`` on ``device_type``, without importing torch for a CPU.
    On a GPU "auto" is one of the 2-byte types whichever it resolves to."""
    if dtype in (None, "auto") and device_type != "cpu" and not os.environ.get("LLMOS_AUTO_DTYPE"):
        return 2
    return ELEMENT_BYTES[resolve(dtype, device_type)]
