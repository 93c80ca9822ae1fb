"""Decode attention alone, per layer: the native kernel against torch's gather + SDPA, on cold pools.

``python -m benchmarks.attention`` prints the table; ``benchmarks.run`` includes it in docs/performance.md.
The pools are as large as the ~40M shape's (8 heads of 64, blocks of 8 tokens) and there are 12 of
them, one per layer, so each call reads its keys and values from memory rather than from cache.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

CASES = [(32, 150), (8, 150), (1, 500), (1, 2000), (1, 8000), (4, 2000)]  # (sequences, context tokens)


def measure(cases=CASES, heads: int = 8, dim: int = 64, block_size: int = 8, layers: int = 12,
            pool_blocks: int = 4096) -> list[dict]:
    from llmos.drivers.model import cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None:
        return []
    k = [torch.randn(pool_blocks, block_size * heads * dim) for _ in range(layers)]
    v = [torch.randn(pool_blocks, block_size * heads * dim) for _ in range(layers)]
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch, n in cases:
        width = -(-n // block_size)
        tables = torch.randperm(pool_blocks - 1, generator=g)[:batch * width].add(1).to(torch.int32).view(batch, width)
        ctx = torch.full((batch,), n, dtype=torch.int32)
        q, out = torch.randn(batch, heads, dim), torch.empty(batch, heads, dim)
        flat = tables.long().view(-1)

        def native(li):
            kernels.paged_decode(q, k[li], v[li], tables, ctx, out, block_size, dim ** -0.5)

        def gather_sdpa(li):
            kd = k[li].index_select(0, flat).view(batch, width * block_size, heads, dim).transpose(1, 2)
            vd = v[li].index_select(0, flat).view(batch, width * block_size, heads, dim).transpose(1, 2)
            F.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=dim ** -0.5)

        row = {"batch": batch, "context": n}
        for name, fn in (("native_us", native), ("torch_us", gather_sdpa)):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for li in range(layers):
                    fn(li)
                best = min(best, (time.perf_counter() - t) / layers)
            row[name] = best * 1e6
        rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| sequences x context | native us/layer | torch gather + SDPA us/layer | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['batch']} x {r['context']} | {r['native_us']:.0f} | {r['torch_us']:.0f} | "
              f"{r['torch_us'] / r['native_us']:.2f}x |" for r in rows]
    return lines


if __name__ == "__main__":
    print("\n".join(table(measure())))
