"""Native CPU kernels for the paged engine, built from ``csrc/`` with the system C compiler on first use.

Only what torch does slowly at decode sizes lives here: decode attention that reads keys and
values in place through block tables (``paged_attention.c``), and fused element-wise steps of
the forward, residual add + RMSNorm, SiLU-gate multiply and rotary embedding
(``fused_ops.c``), whose chains of small torch operators cost more in dispatch than in
arithmetic. Each comes in float32 and in bfloat16 (a bfloat16 KV cache is read and widened in place,
everything is accumulated in float32, and the element-wise kernels round where transformers' bfloat16
Llama rounds, so greedy tokens match it). The shared object is compiled once per source and machine (``-march=native``)
into a cache directory and loaded with ctypes; it uses OpenMP through the runtime torch
already loaded, so it shares torch's threads instead of adding its own. Anything that goes
wrong (no compiler, a failed build, a result that disagrees with torch on a self-check)
leaves the engine on its pure-torch path, which computes the same thing more slowly.
``LLMOS_CPU_KERNELS=0`` turns the kernels off.
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
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("paged_attention.c", "fused_ops.c")
HEADERS = ("simd.h", "paged_kv.h")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
ABI = {"llmos_paged_decode_abi": 7, "llmos_fused_ops_abi": 2}

_p, _i, _l, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
DTYPES = (torch.float32, torch.bfloat16)  # the storage dtypes the kernels take (they accumulate in float32)


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


def _private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents owner-only; bring LLMOS's own cache directories to 0700."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    ours = set(missing)
    if path.parent.name == "llmos" and path.name == "kernels":  # the default location: both levels are LLMOS's
        ours |= {path, path.parent}
    for p in ours:
        if p.stat().st_mode & 0o077:
            os.chmod(p, 0o700)  # mkdir's mode is masked by the umask; an older LLMOS made them 0755


def _writable(preferred: Path) -> Path:
    """The cache directory, or a private one under the temp dir when it cannot be created (a read-only home)."""
    try:
        _private_dirs(preferred)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    private = Path(tempfile.gettempdir()) / f"llmos-kernels-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:  # never load code from a directory others can write
        raise RuntimeError(f"{preferred} is not writable and {private} is not private")
    return private


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    parts = [(CSRC / name).read_bytes() for name in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode(), torch.__version__.encode()])).hexdigest()[:16]
    target = _writable(cache_dir()) / f"llmos_cpu-{key}.so"
    if target.exists():
        if target.stat().st_mode & 0o077:
            os.chmod(target, 0o600)  # built by an older LLMOS with the umask's 0755
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # torch's own libgomp satisfies the OpenMP dependency at load time (same soname, already loaded)
        res = subprocess.run([compiler, *FLAGS, *(str(CSRC / s) for s in SOURCES), "-o", tmp, "-lm"],
                             capture_output=True, text=True, check=False, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o600)  # the linker writes 0755 (umask); loading needs read only
        os.replace(tmp, target)  # atomic: a concurrent build by another worker is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for stale in target.parent.glob("llmos_cpu-*.so"):  # builds of older sources or another torch
        if stale != target:
            stale.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
    return target


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (more than one means two thread pools)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines()
            if any(name in line for name in ("libgomp", "libiomp", "libomp"))}


def _one_dtype(*tensors: torch.Tensor) -> bool:
    """All CPU tensors of one of the kernels' dtypes (DTYPES)."""
    dtype = tensors[0].dtype
    return dtype in DTYPES and all(t.dtype is dtype and t.is_cpu for t in tensors)  # is_cpu: t.device costs ~1 us


def _require(ok: bool, op: str, what: str) -> None:
    """Refuse, before any pointer reaches C, an input the kernel cannot handle: a crash would kill the worker."""
    if not ok:
        raise ValueError(f"{op}: {what}")


class CpuKernels:
    """The loaded kernels. Each wrapper checks every shape, stride and dtype its kernel relies on."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        def bind(name: str, restype, *argtypes) -> ctypes._CFuncPtr:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
            return fn

        # per storage dtype: float32 and bfloat16 entry points of the same kernels
        suffix = {torch.float32: "", torch.bfloat16: "_bf16"}
        self._decode = {dt: bind("llmos_paged_decode" + (sfx or "_f32"), _i, _p, _l, _p, _p, _i, _p, _i, _p, _p, _i,
                                 _i, _i, _i, _i, _f) for dt, sfx in suffix.items()}
        self._norm = {dt: bind("llmos_add_rms_norm" + sfx, None, _p, _p, _p, _p, _i, _i, _f) for dt, sfx in suffix.items()}
        self._silu_mul = {dt: bind("llmos_silu_mul" + sfx, None, _p, _p, _i, _i) for dt, sfx in suffix.items()}
        self._rope = {dt: bind("llmos_rope" + sfx, None, _p, _l, _p, _p, _i, _i, _i) for dt, sfx in suffix.items()}

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     ctx: torch.Tensor, out: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
        """q: [B, H, D] with contiguous heads (rows may be strided); k/v_cache: [blocks, block_size * KV * D];
        tables: [B, W] int32 block ids; ctx: [B] int32 context lengths; out: [B, H, D] contiguous. Fills and
        returns out. q, the caches and out are all float32 or all bfloat16 (then q is widened to float32 first,
        the caches as they are read, and out is rounded once at the end). The kernel itself refuses context
        lengths and block ids outside the tables and the pool."""
        op = "paged_decode"
        _require(_one_dtype(q, k_cache, v_cache, out), op, "q, caches and out must be CPU tensors of one dtype, "
                 "float32 or bfloat16")
        _require(q.dim() == 3 and q.stride(2) == 1 and q.stride(1) == q.shape[2] and q.stride(0) >= q.shape[1]
                 * q.shape[2], op, "q must be [batch, heads, dim] with contiguous heads")
        batch, heads, dim = q.shape
        _require(out.shape == q.shape and out.is_contiguous(), op, "out must be contiguous and shaped like q")
        _require(k_cache.dim() == 2 and k_cache.shape == v_cache.shape and k_cache.is_contiguous()
                 and v_cache.is_contiguous(), op, "k_cache and v_cache must be contiguous [blocks, slots] of one shape")
        kv_heads = k_cache.shape[1] // max(1, block_size * dim)
        _require(block_size > 0 and kv_heads > 0 and k_cache.shape[1] == block_size * kv_heads * dim
                 and heads % kv_heads == 0, op, "cache rows must hold block_size * kv_heads * dim floats, "
                 "with heads a multiple of kv_heads")
        _require(tables.dtype == ctx.dtype == torch.int32 and tables.dim() == 2 and tables.is_contiguous()
                 and ctx.is_contiguous() and tables.shape[0] == ctx.numel() == batch, op,
                 "tables must be contiguous int32 [batch, width] and ctx int32 [batch]")
        dtype = k_cache.dtype
        q32 = q if dtype is torch.float32 else q.float()  # [B, H, D] contiguous: a copy of B * H * D values
        o32 = out if dtype is torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        failed = self._decode[dtype](q32.data_ptr(), q32.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                     k_cache.shape[0], tables.data_ptr(), tables.shape[1], ctx.data_ptr(),
                                     o32.data_ptr(), batch, heads, kv_heads, dim, block_size, float(scale))
        if o32 is not out:
            out.copy_(o32)
        if failed:
            raise ValueError(f"{op}: {failed} of {batch} sequences have a context length outside their block table, "
                             "a block id outside the pool, or no memory for scratch space")
        return out

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """``h += delta`` in place (when given), then RMSNorm of h times weight, as a new tensor. h: [rows, dim];
        all float32 or all bfloat16."""
        op = "add_rms_norm"
        _require(_one_dtype(h, weight, *(() if delta is None else (delta,))), op,
                 "tensors must be CPU tensors of one dtype, float32 or bfloat16")
        _require(h.dim() == 2 and h.is_contiguous(), op, "h must be a contiguous [rows, dim] tensor")
        _require(weight.is_contiguous() and weight.numel() == h.shape[1], op, "weight must be contiguous [dim]")
        _require(delta is None or (delta.shape == h.shape and delta.is_contiguous()), op,
                 "delta must be contiguous and shaped like h")
        out = torch.empty_like(h)
        self._norm[h.dtype](h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                            out.data_ptr(), h.shape[0], h.shape[1], float(eps))
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[rows, 2 * inter] (gate | up) -> silu(gate) * up, [rows, inter]."""
        _require(_one_dtype(gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous() and gate_up.shape[1] % 2 == 0,
                 "silu_mul", "gate_up must be a contiguous float32 or bfloat16 [rows, 2 * inter] tensor")
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype)
        self._silu_mul[gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), rows, inter)
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """Rotary embedding in place on the first ``heads`` heads of ``head_dim`` floats in each row of x
        ([tokens, >= heads * head_dim], unit stride); cos, sin: [tokens, head_dim] contiguous. Returns x."""
        op = "rope"
        _require(_one_dtype(x, cos, sin), op, "tensors must be CPU tensors of one dtype, float32 or bfloat16")
        _require(x.dim() == 2 and x.stride(1) == 1 and x.shape[1] >= heads * head_dim
                 and x.stride(0) >= heads * head_dim and heads > 0, op,
                 "x must be [tokens, >= heads * head_dim] with unit-stride, non-overlapping rows")
        _require(cos.shape == sin.shape == (x.shape[0], head_dim) and head_dim % 2 == 0 and cos.is_contiguous()
                 and sin.is_contiguous(), op, "cos and sin must be contiguous [tokens, head_dim], head_dim even "
                 "(a rotary embedding over part of the head is not supported)")
        self._rope[x.dtype](x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), x.shape[0], heads, head_dim)
        return x


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     ctx: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Decode attention in plain torch, one sequence at a time (for checks, not speed)."""
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


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """The rotary embedding as transformers' Llama applies it, on a copy."""
    dim = cos.shape[1]
    y = x.clone()
    v = y[:, :heads * dim].view(-1, heads, dim)
    half = dim // 2
    rot = torch.cat((-v[..., half:], v[..., :half]), dim=-1)
    y[:, :heads * dim] = (v * cos[:, None] + rot * sin[:, None]).reshape(-1, heads * dim)
    return y


def reference_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm computes it: float32 statistics, the normalised row rounded to
    h's dtype, then times the weight in that dtype."""
    x = h.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _self_check(k: CpuKernels) -> str | None:
    """The name of the first kernel that disagrees with torch on a small random case, or None."""
    g = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, dim, blocks = 8, 4, 2, 16, 12
    kc = torch.randn(blocks, bs * kv_heads * dim, generator=g)
    vc = torch.randn(blocks, bs * kv_heads * dim, generator=g)
    tables = torch.tensor([[3, 7, 1], [0, 11, 5], [9, 2, 2]], dtype=torch.int32)
    ctx = torch.tensor([19, 24, 1], dtype=torch.int32)
    q = torch.randn(3, heads + 1, dim, generator=g)[:, :heads]  # strided rows, as in the engine
    out = k.paged_decode(q, kc, vc, tables, ctx, torch.empty(3, heads, dim), bs, 0.25)
    if not torch.allclose(out, reference_decode(q, kc, vc, tables, ctx, bs, 0.25), atol=1e-5, rtol=1e-4):
        return "paged_decode"
    h, d, w = (torch.randn(5, 40, generator=g) for _ in range(3))
    ref = F.rms_norm(h + d, (40,), w[0], 1e-6)
    if not torch.allclose(k.add_rms_norm(h, d, w[0].contiguous(), 1e-6), ref, atol=1e-5, rtol=1e-4):
        return "add_rms_norm"
    gu = torch.randn(3, 2 * 21, generator=g) * 4
    if not torch.allclose(k.silu_mul(gu), F.silu(gu[:, :21]) * gu[:, 21:], atol=1e-5, rtol=1e-4):
        return "silu_mul"
    x, cos, sin = torch.randn(3, 5 * 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    if not torch.allclose(k.rope(x.clone(), cos, sin, 4, 8), reference_rope(x, cos, sin, 4), atol=1e-5, rtol=1e-4):
        return "rope"
    # bfloat16: against torch's bfloat16 operators, within a unit in the last place of bfloat16
    bf = torch.bfloat16
    kb, vb, qb = kc.to(bf), vc.to(bf), q.to(bf)
    out = k.paged_decode(qb, kb, vb, tables, ctx, torch.empty(3, heads, dim, dtype=bf), bs, 0.25)
    if not torch.allclose(out.float(), reference_decode(qb.float(), kb.float(), vb.float(), tables, ctx, bs, 0.25),
                          atol=1e-2, rtol=1e-2):
        return "paged_decode (bfloat16)"
    hb, db, wb = h.to(bf), d.to(bf), w[0].to(bf).contiguous()
    if not torch.allclose(k.add_rms_norm(hb.clone(), db, wb, 1e-6).float(),
                          reference_rms_norm(hb + db, wb, 1e-6).float(), atol=1e-2, rtol=1e-2):
        return "add_rms_norm (bfloat16)"
    gb = gu.to(bf)
    if not torch.allclose(k.silu_mul(gb).float(), (F.silu(gb[:, :21]) * gb[:, 21:]).float(), atol=1e-2, rtol=1e-2):
        return "silu_mul (bfloat16)"
    xb, cb, sb = x.to(bf), cos.to(bf), sin.to(bf)
    if not torch.allclose(k.rope(xb.clone(), cb, sb, 4, 8).float(), reference_rope(xb, cb, sb, 4).float(),
                          atol=1e-2, rtol=1e-2):
        return "rope (bfloat16)"
    return None


@lru_cache(maxsize=1)
def load() -> CpuKernels | None:
    """The native kernels, or None when they are off or cannot be built or trusted here."""
    if os.environ.get("LLMOS_CPU_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        for name, version in ABI.items():
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            if fn() != version:
                raise RuntimeError(f"{name}: unexpected kernel ABI")
        runtimes = _openmp_runtimes()
        if len(runtimes) > 1:  # e.g. a torch build that bundles a renamed libgomp
            log.warning("two OpenMP runtimes are loaded (%s): the native kernels' threads may compete with "
                        "torch's", ", ".join(sorted(runtimes)))
        kernels = CpuKernels(lib)
        bad = _self_check(kernels)
        if bad:
            raise RuntimeError(f"self-check against torch failed: {bad}")
        return kernels
    except Exception as exc:  # any failure keeps the pure-torch path
        log.warning("native CPU kernels unavailable, using torch: %s", exc)
        return None
