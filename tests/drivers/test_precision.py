"""Precision (the ``dtype`` load option): what ``auto`` picks, the bfloat16 native kernels against torch's
bfloat16 operators, the engine's bfloat16 tokens against transformers' own, and the default model's
bfloat16 perplexity against float32's."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmos.drivers.model import cpu_kernels, precision
from llmos.drivers.model.engine import load_engine, load_model
from llmos.drivers.model.score import ScoreJob
from llmos.syscalls.errors import InvalidArgument
from tests.tinymodel import make_tiny_llama

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
BF16 = torch.bfloat16
DEFAULT_MODEL = Path(precision.__file__).resolve().parents[1] / "models" / "default"


# -- what auto picks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,picked", [({"avx2", "fma"}, "float32"), ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
                                          ({"avx512f", "amx_bf16", "amx_tile"}, "bfloat16")])
def test_auto_picks_bfloat16_only_on_a_cpu_with_bfloat16_units(monkeypatch, flags, picked):
    monkeypatch.delenv("LLMOS_AUTO_DTYPE")  # the suite pins auto to float32 (conftest)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve("auto", "cpu") == precision.resolve(None, "cpu") == picked
    assert precision.element_bytes("auto", "cpu") == (2 if picked == "bfloat16" else 4)


def test_llmos_auto_dtype_pins_what_auto_means_and_a_bad_value_is_einval(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv("LLMOS_AUTO_DTYPE", "float32")
    assert precision.resolve("auto", "cpu") == precision.resolve("auto", "cuda") == "float32"
    assert precision.element_bytes("auto", "cuda") == 4
    monkeypatch.setenv("LLMOS_AUTO_DTYPE", "int8")
    with pytest.raises(InvalidArgument, match="LLMOS_AUTO_DTYPE"):
        precision.resolve(None, "cpu")


def test_a_named_dtype_is_taken_as_it_is_and_an_unknown_one_is_einval():
    assert [precision.resolve(d, "cpu") for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
    with pytest.raises(InvalidArgument, match="unknown dtype 'int3'"):
        precision.resolve("int3", "cpu")


# -- the bfloat16 kernels: torch's bfloat16 operator chains, within a bfloat16 unit in the last place -------------
@needs_cc
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,ctx", [(4, 4, 16, 4, [1, 5, 13]), (8, 2, 64, 8, [190, 7]),
                                                               (4, 2, 64, 8, [1300, 3]), (6, 3, 32, 1, [9])])
def test_bfloat16_decode_attention_matches_torch_sdpa_in_bfloat16(heads, kv_heads, dim, block_size, ctx):
    g = torch.Generator().manual_seed(sum(ctx))
    width = max(-(-c // block_size) for c in ctx)
    blocks = width * len(ctx) + 2
    k = torch.randn(blocks, block_size * kv_heads * dim, generator=g).to(BF16)
    v = torch.randn(blocks, block_size * kv_heads * dim, generator=g).to(BF16)
    tables = torch.randperm(blocks, generator=g)[:width * len(ctx)].to(torch.int32).view(len(ctx), width)
    q = torch.randn(len(ctx), heads + kv_heads, dim, generator=g).to(BF16)[:, :heads]  # strided, as in the engine
    out = cpu_kernels.load().paged_decode(q, k, v, tables, torch.tensor(ctx, dtype=torch.int32),
                                          torch.empty(len(ctx), heads, dim, dtype=BF16), block_size, dim ** -0.5)
    assert out.dtype == BF16
    for b, n in enumerate(ctx):
        slots = torch.tensor([int(tables[b, t // block_size]) * block_size + t % block_size for t in range(n)])
        kb = k.view(-1, kv_heads, dim)[slots].transpose(0, 1)[None]
        vb = v.view(-1, kv_heads, dim)[slots].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(q[b][None, :, None], kb, vb, scale=dim ** -0.5, enable_gqa=True)[0, :, 0]
        # about one bfloat16 unit in the last place (the absolute bound is for outputs near zero)
        torch.testing.assert_close(out[b], ref, atol=2e-3, rtol=1.6e-2)


@needs_cc
@pytest.mark.parametrize("rows,dim", [(1, 8), (300, 512)])
def test_bfloat16_residual_add_and_rms_norm_round_where_transformers_rounds(rows, dim):
    g = torch.Generator().manual_seed(dim)
    h, delta, w = (torch.randn(*shape, generator=g).to(BF16) for shape in ((rows, dim), (rows, dim), (dim,)))
    expected_h = h + delta  # transformers' residual add, rounded to bfloat16
    out = cpu_kernels.load().add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(h, expected_h)
    # LlamaRMSNorm: float32 statistics, the row rounded, then times the weight in bfloat16
    torch.testing.assert_close(out, cpu_kernels.reference_rms_norm(expected_h, w, 1e-5))
    assert (out != cpu_kernels.reference_rms_norm(expected_h, w, 1e-5)).float().mean() < 0.01  # nearly all equal


@needs_cc
def test_bfloat16_silu_gate_multiply_and_rotary_embedding_match_torchs_bfloat16_chains():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    gu = (torch.randn(64, 2 * 1376, generator=g) * 8).to(BF16)
    torch.testing.assert_close(cpu_kernels.load().silu_mul(gu), F.silu(gu[:, :1376]) * gu[:, 1376:])
    tokens, heads, dim = 7, 12, 64
    x = torch.randn(tokens, (heads + 4) * dim, generator=g).to(BF16)
    cos, sin = (torch.randn(tokens, dim, generator=g).to(BF16) for _ in range(2))
    ref, _ = apply_rotary_pos_emb(x[:, :heads * dim].view(1, tokens, heads, dim).transpose(1, 2),
                                  x[:, :dim].view(1, 1, tokens, dim), cos[None], sin[None])
    y = cpu_kernels.load().rope(x.clone(), cos, sin, heads, dim)
    assert torch.equal(y[:, :heads * dim], ref.transpose(1, 2).reshape(tokens, heads * dim))
    assert torch.equal(y[:, heads * dim:], x[:, heads * dim:])


# -- the engine in bfloat16 ----------------------------------------------------------------------------------------
def hf_greedy_with_margins(model, ids, n):
    """transformers' greedy tokens and, per step, the gap between its two best logits (float32 of bfloat16)."""
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=2, output_logits=True, return_dict_in_generate=True)
    gaps = [float(l[0].float().topk(2).values.diff().abs()) for l in out.logits]
    return out.sequences[0, len(ids):].tolist(), gaps


@needs_cc
def test_a_bfloat16_model_runs_bfloat16_kernels_and_gives_transformers_greedy_tokens(tmp_path):
    """Tokens equal transformers' generate in bfloat16 up to its first exact tie: bfloat16 logits (8 bits of
    mantissa) tie often on a random model, and a tie is broken by noise below bfloat16's resolution."""
    path = make_tiny_llama(tmp_path / "m", hidden=64, heads=4, kv_heads=2)
    e = load_engine(path, engine="paged", dtype="bfloat16", block_size=4, measure=False)
    info = e.info()
    assert info["dtype"] == "bfloat16" and e.k_cache[0].dtype == BF16 and info["kernels"] == "native"
    assert "native C (bfloat16, float32 accumulation)" in info["kernel_path"]
    prompts = ["the quick brown fox", "这是一个关于", "x" * 70, "jumps over the lazy dog " * 2]
    ids = {pid: e.encode(p) for pid, p in enumerate(prompts, 1)}
    for pid, x in ids.items():
        e.add(pid, x, {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True})
    toks: dict[int, list[int]] = {}
    while e.has_work():
        for ev in e.step():
            toks.setdefault(ev.pid, []).extend(ev.token_ids)
    compared = 0
    for pid, x in ids.items():
        ref, gaps = hf_greedy_with_margins(e.model, x, 16)
        upto = next((i for i, gap in enumerate(gaps) if gap == 0.0), len(ref))  # through the first tie, inclusive
        assert toks[pid][:upto] == ref[:upto], pid
        compared += upto
    assert compared >= 32  # at least half of the 64 tokens were compared: the test can fail


def test_a_float16_model_runs_on_the_cpu_on_the_torch_path(tmp_path):
    path = make_tiny_llama(tmp_path / "m")
    e = load_engine(path, engine="paged", dtype="float16", measure=False)
    assert e.info()["dtype"] == "float16" and e.info()["kernels"] == "torch"  # the native kernels take f32, bf16
    e.add(1, e.encode("abc"), {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True})
    toks = []
    while e.has_work():
        for ev in e.step():
            assert ev.finish_reason != "error", ev
            toks += ev.token_ids
    assert len(toks) == 4


def perplexity(dtype: str, tokens: int | None) -> float:
    model, tok, dev = load_model(DEFAULT_MODEL, "cpu", dtype)
    ids = tok((DEFAULT_MODEL / "validation.txt").read_text())["input_ids"][:tokens]
    job = ScoreJob(0, ids, model.config.max_position_embeddings)
    while not job.done:
        job.step(model, dev)
    return math.exp(job.nll / len(job.logprobs))


@pytest.mark.slow
def test_the_default_models_bfloat16_perplexity_is_within_1_percent_of_float32_on_its_validation_text():
    """The whole held-out text (13,416 tokens, the training script's validation split; ~1 min: the slow step)."""
    fp32, bf16 = perplexity("float32", None), perplexity("bfloat16", None)
    assert abs(bf16 / fp32 - 1) < 0.01, (fp32, bf16)
