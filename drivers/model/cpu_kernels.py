"""Native CPU kernels for the paged engine, built from ``csrc/`` with the system C compiler on first use.

Only what torch has no good operator for lives here: decode attention that reads keys and
values in place through block tables. The shared object is compiled once per source and
machine (``-march=native``) into a cache directory and loaded with ctypes; it uses OpenMP
through the runtime torch already loaded, so it shares torch's threads instead of adding
its own. Anything that goes wrong (no compiler, a failed build, a result that disagrees
with torch on a self-check) leaves the engine on its pure-torch path, which computes the
same thing more slowly. ``LLMOS_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("llmos.kernels")
SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def cache_dir() -> Path:
    env = os.environ.get("LLMOS_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmos" / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a binary built on one CPU may not run on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(source: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode(), torch.__version__.encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # torch's own libgomp satisfies the OpenMP dependency at load time (same soname, already loaded)
        res = subprocess.run([compiler, *FLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                             check=False, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build by another worker is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class PagedDecode:
    """``paged_decode(q, k_cache, v_cache, tables, ctx, out, block_size, scale)`` over the native kernel."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.llmos_paged_decode
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_float]
        self._fn = fn

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 ctx: torch.Tensor, out: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
        """q: [B, H, D] float32 with contiguous heads (rows may be strided); k/v_cache: [blocks, block_size *
        KV * D]; tables: [B, W] int32; ctx: [B] int32; out: [B, H, D] contiguous. Fills and returns out."""
        batch, heads, dim = q.shape
        kv_heads = k_cache.shape[1] // (block_size * dim)
        if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype == torch.float32
                and q.stride(2) == 1 and q.stride(1) == dim and out.is_contiguous()
                and k_cache.is_contiguous() and v_cache.is_contiguous() and tables.dtype == torch.int32
                and ctx.dtype == torch.int32 and tables.is_contiguous() and ctx.is_contiguous()
                and heads % kv_heads == 0 and tables.shape[0] == ctx.shape[0] == out.shape[0] == batch):
            raise ValueError("paged_decode: unsupported layout or dtype")
        self._fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                 tables.shape[1], ctx.data_ptr(), out.data_ptr(), batch, heads, kv_heads, dim, block_size,
                 float(scale))
        return out


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     ctx: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """The same computation in plain torch, one sequence at a time (for checks, not speed)."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1] // (block_size * dim)
    outs = []
    for b in range(batch):
        n = int(ctx[b])
        slots = torch.tensor([int(tables[b, t // block_size]) * block_size + t % block_size for t in range(n)])
        k = k_cache.reshape(-1, kv_heads, dim)[slots].transpose(0, 1)  # [KV, n, D]
        v = v_cache.reshape(-1, kv_heads, dim)[slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b][:, None, :], k, v, scale=scale, enable_gqa=heads != kv_heads)
        outs.append(o[:, 0, :])
    return torch.stack(outs)


def _self_check(kernel: PagedDecode) -> bool:
    g = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, dim, blocks = 4, 4, 2, 16, 12
    kc = torch.randn(blocks, bs * kv_heads * dim, generator=g)
    vc = torch.randn(blocks, bs * kv_heads * dim, generator=g)
    tables = torch.tensor([[3, 7, 1], [0, 11, 5], [9, 2, 2]], dtype=torch.int32)
    ctx = torch.tensor([9, 12, 1], dtype=torch.int32)
    q = torch.randn(3, heads + 1, dim, generator=g)[:, :heads]  # strided rows, as in the engine
    out = kernel(q, kc, vc, tables, ctx, torch.empty(3, heads, dim), bs, 0.25)
    return torch.allclose(out, reference_decode(q, kc, vc, tables, ctx, bs, 0.25), atol=1e-5, rtol=1e-4)


@lru_cache(maxsize=1)
def paged_decode() -> PagedDecode | None:
    """The native decode-attention kernel, or None when it is off or cannot be built here."""
    if os.environ.get("LLMOS_CPU_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build(SOURCE)))
        if lib.llmos_paged_decode_abi() != 3:
            raise RuntimeError("unexpected kernel ABI")
        kernel = PagedDecode(lib)
        if not _self_check(kernel):
            raise RuntimeError("self-check against torch failed")
        return kernel
    except Exception as exc:  # any failure keeps the pure-torch path
        log.warning("native paged attention unavailable, using torch: %s", exc)
        return None
