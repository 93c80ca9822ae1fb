"""The native CPU kernels: same numbers as torch, same tokens in the engine, and a safe fallback."""

import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from llmos.drivers.model import cpu_kernels
from llmos.drivers.model.engine import load_engine
from tests.tinymodel import make_tiny_llama

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """An empty kernel cache and no memoised kernel, before and after the test."""
    monkeypatch.setenv("LLMOS_KERNEL_CACHE", str(tmp_path / "kernels"))
    cpu_kernels.load.cache_clear()
    yield tmp_path / "kernels"
    cpu_kernels.load.cache_clear()


def random_pool(heads, kv_heads, dim, block_size, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-c // block_size) for c in ctx)
    blocks = width * len(ctx) + 3
    k = torch.randn(blocks, block_size * kv_heads * dim, generator=g)
    v = torch.randn(blocks, block_size * kv_heads * dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[:width * len(ctx)].to(torch.int32).view(len(ctx), width)
    q = torch.randn(len(ctx), heads + kv_heads, dim, generator=g)[:, :heads]  # strided rows, as in the engine
    return q, k, v, tables, torch.tensor(ctx, dtype=torch.int32)


@needs_cc
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,ctx", [
    (4, 4, 16, 4, [1, 4, 5, 13]),
    (8, 2, 64, 8, [190, 7, 64]),  # grouped-query attention
    (6, 3, 32, 1, [3, 9]),
    (2, 1, 8, 16, [16, 33, 1]),
    (4, 4, 96, 8, [17, 40]),  # a head size that is not a multiple of 64
    (8, 8, 32, 8, [9, 64, 3]),
    (4, 2, 64, 8, [1300, 513, 7]),  # long contexts are split into pieces on several threads, then merged
    (2, 2, 16, 4, [1100, 1]),
    (4, 4, 16, 24, [1200]),  # a piece is a whole number of blocks: 264 tokens here
])
def test_native_decode_attention_matches_torch(heads, kv_heads, dim, block_size, ctx):
    kernels = cpu_kernels.load()
    assert kernels is not None
    q, k, v, tables, ctx_t = random_pool(heads, kv_heads, dim, block_size, ctx)
    out = kernels.paged_decode(q, k, v, tables, ctx_t, torch.empty(len(ctx), heads, dim), block_size, dim ** -0.5)
    ref = cpu_kernels.reference_decode(q, k, v, tables, ctx_t, block_size, dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@needs_cc
def test_the_kernels_refuse_inputs_they_cannot_handle_and_name_the_fault():
    kernels = cpu_kernels.load()
    q, k, v, tables, ctx = random_pool(4, 4, 16, 4, [5])
    out = torch.empty(1, 4, 16)
    refused = {
        "float32": lambda: kernels.paged_decode(q.double(), k, v, tables, ctx, out, 4, 0.25),
        "int32": lambda: kernels.paged_decode(q, k, v, tables.long(), ctx, out, 4, 0.25),
        "shaped like q": lambda: kernels.paged_decode(q, k, v, tables, ctx, torch.empty(1, 1, 1), 4, 0.25),
        "of one shape": lambda: kernels.paged_decode(q, k, v[:2], tables, ctx, out, 4, 0.25),
        "block_size * kv_heads * dim": lambda: kernels.paged_decode(q, k, v, tables, ctx, out, 3, 0.25),
        "contiguous [rows, dim]": lambda: kernels.add_rms_norm(torch.randn(3, 8).t(), None, torch.ones(3), 1e-6),
        "2 * inter": lambda: kernels.silu_mul(torch.randn(2, 7)),
        "part of the head": lambda: kernels.rope(torch.randn(2, 16), torch.randn(2, 4), torch.randn(2, 4), 2, 8),
        "non-overlapping rows": lambda: kernels.rope(torch.randn(1, 16).expand(3, 16), torch.randn(3, 8),
                                                     torch.randn(3, 8), 2, 8),
    }
    for fault, call in refused.items():
        with pytest.raises(ValueError, match=re.escape(fault)):
            call()


@needs_cc
@pytest.mark.parametrize("block_size", [8, 4])  # the AVX2 path and the portable one
def test_decode_refuses_contexts_and_blocks_outside_the_tables_without_crashing(block_size):
    kernels = cpu_kernels.load()
    q, k, v, tables, ctx = random_pool(4, 2, 16, block_size, [9, 3])
    out = torch.empty(2, 4, 16)
    for bad_ctx in ([9, 0], [9, -4], [9, tables.shape[1] * block_size + 1]):
        with pytest.raises(ValueError, match="1 of 2 sequences"):
            kernels.paged_decode(q, k, v, tables, torch.tensor(bad_ctx, dtype=torch.int32), out, block_size, 0.25)
    for bad_block in (k.shape[0], -1):
        t = tables.clone()
        t[1, 0] = bad_block
        with pytest.raises(ValueError, match="block id outside the pool"):
            kernels.paged_decode(q, k, v, t, ctx, out, block_size, 0.25)
    # and the good call still works afterwards
    ref = cpu_kernels.reference_decode(q, k, v, tables, ctx, block_size, 0.25)
    torch.testing.assert_close(kernels.paged_decode(q, k, v, tables, ctx, out, block_size, 0.25), ref,
                               atol=1e-5, rtol=1e-4)


@needs_cc
@pytest.mark.parametrize("rows,dim", [(1, 8), (5, 40), (300, 512)])  # 300 x 512 runs on several threads
@pytest.mark.parametrize("with_delta", [True, False])
def test_fused_residual_add_and_rms_norm_match_torch(rows, dim, with_delta):
    g = torch.Generator().manual_seed(rows)
    h, delta = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    w = torch.randn(dim, generator=g)
    expected_h = h + delta if with_delta else h.clone()
    out = cpu_kernels.load().add_rms_norm(h, delta if with_delta else None, w, 1e-5)
    torch.testing.assert_close(h, expected_h)  # the residual add happened in place
    torch.testing.assert_close(out, F.rms_norm(expected_h, (dim,), w, 1e-5), atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("rows,inter", [(1, 3), (4, 1376), (64, 1376)])
def test_fused_silu_gate_multiply_matches_torch(rows, inter):
    gu = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 8  # exp's tails too
    expected = F.silu(gu[:, :inter]) * gu[:, inter:]
    torch.testing.assert_close(cpu_kernels.load().silu_mul(gu), expected, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("tokens,heads,extra,dim", [(1, 2, 0, 8), (7, 12, 4, 64), (300, 12, 4, 64)])
def test_rotary_embedding_in_place_matches_transformers(tokens, heads, extra, dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, (heads + extra) * dim, generator=g)  # extra heads (the values) stay untouched
    cos, sin = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    ref, _ = apply_rotary_pos_emb(x[:, :heads * dim].view(1, tokens, heads, dim).transpose(1, 2),
                                  x[:, :dim].view(1, 1, tokens, dim), cos[None], sin[None])
    y = cpu_kernels.load().rope(x.clone(), cos, sin, heads, dim)
    torch.testing.assert_close(y[:, :heads * dim], ref.transpose(1, 2).reshape(tokens, heads * dim))
    torch.testing.assert_close(y[:, heads * dim:], x[:, heads * dim:])


@needs_cc
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("block_size", [8, 4])  # decode attention on the AVX2 path and the portable one
def test_the_engine_gives_the_same_tokens_with_and_without_the_native_kernels(tmp_path, kv_heads, block_size):
    path = make_tiny_llama(tmp_path / "m", heads=4, kv_heads=kv_heads)
    e = load_engine(path, engine="paged", block_size=block_size, max_tokens_per_step=16)
    assert e.info()["kernels"] == "native"
    prompts = ["the quick brown fox", "a", "x" * 30, "jumps over the lazy dog"]

    def run():
        for pid, p in enumerate(prompts, 1):
            e.add(pid, e.encode(p), {"max_new_tokens": 12, **GREEDY})
        toks = {}
        while e.has_work():
            for ev in e.step():
                toks.setdefault(ev.pid, []).extend(ev.token_ids)
        return toks

    native = run()
    e.ops = None
    assert run() == native
    assert all(len(t) == 12 for t in native.values())


def test_a_failed_build_leaves_the_torch_path(fresh_kernels, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    assert cpu_kernels.load() is None
    assert "native CPU kernels unavailable" in caplog.text
    assert not any(fresh_kernels.glob("*.so"))  # no half-built object left behind


@needs_cc
def test_the_kernel_is_built_once_and_reused(fresh_kernels):
    assert cpu_kernels.load() is not None
    built = list(fresh_kernels.glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels.load.cache_clear()
    assert cpu_kernels.load() is not None
    assert built[0].stat().st_mtime_ns == stamp


def test_llmos_cpu_kernels_0_turns_them_off(fresh_kernels, monkeypatch):
    monkeypatch.setenv("LLMOS_CPU_KERNELS", "0")
    assert cpu_kernels.load() is None


@needs_cc
def test_an_unwritable_cache_falls_back_to_a_private_temp_dir(fresh_kernels, monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("LLMOS_KERNEL_CACHE", str(blocked / "kernels"))
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    assert cpu_kernels.load() is not None
    private = tmp_path / f"llmos-kernels-{os.getuid()}"
    assert any(private.glob("*.so")) and private.stat().st_mode & 0o777 == 0o700
