"""benchmarks.peers and benchmarks.run's report helpers: a peer that cannot be built is a row, not a crash;
targets read met / short by how much; the ~350M shape and the long-context workload are what issue 13 asks."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from benchmarks import peers, run
from benchmarks.workload import SHAPES, LONG_CONTEXT, long_context, workload


def _fake_sdist(cache: Path, version: str = "0.0.0") -> None:
    """An sdist whose vendored llama.cpp has no CMakeLists.txt: a real CMake configure fails on it."""
    src = cache / "src"
    src.mkdir(parents=True)
    with tarfile.open(src / f"llama_cpp_python-{version}.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo(f"llama_cpp_python-{version}/vendor/llama.cpp/README.md")
        data = b"not a llama.cpp tree\n"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_a_peer_that_cannot_be_built_is_a_row_with_its_reason(tmp_path, monkeypatch):
    _fake_sdist(tmp_path / "cache")
    monkeypatch.setattr(peers, "CACHE", tmp_path / "cache")
    reqs = workload(100, n=2)
    rows = peers.run_peers(tmp_path / "no-model", reqs, 512, 1, which=("llama.cpp",))
    assert [r["dtype"] for r in rows] == list(peers.GGUF_TYPES)
    assert all(r["error"].startswith("not built: llama.cpp build failed") for r in rows), rows
    # the build directory is keyed by the sdist's version, the machine and this CPU's flags
    (d,) = [p for p in (tmp_path / "cache").iterdir() if p.name != "src"]
    assert d.name.startswith("llama.cpp-0.0.0-") and len(d.name.rsplit("-", 1)[1]) == 10
    # and the report shows it as such
    row = {"shape": "40M", "by_dtype": {"float32": {"llmos": 100.0, "llmos_runs": [100], "hf_static": 40.0,
                                                    "hf_static_runs": [40], "worker_dtype": "float32",
                                                    "kernels": "native"}}, "peers": rows}
    text = "\n".join(run.peer_section([row]) + run.target_section([row]))
    assert text.count("could not run: not built") == 3
    assert "2.5x llama.cpp's server in float32: not measured" in text
    assert "HF static batch in the same dtype (float32): 2.50x: met" in text


def test_verdict_says_met_or_short_by_how_much():
    assert run.verdict(2.61, 2.5) == "2.61x: met"
    assert run.verdict(2.0, 2.5) == "2.00x: short by 0.50x (needs 25% more)"
    assert run.verdict(None, 2.0) == "not measured"


def test_best_reduced_llama_is_the_fastest_reduced_row_that_ran():
    row = {"peers": [{"peer": "llama.cpp server (1)", "dtype": "f32", "tok_s": 300.0},
                     {"peer": "llama.cpp server (1)", "dtype": "bf16", "tok_s": 200.0},
                     {"peer": "llama.cpp server (1)", "dtype": "q8_0", "tok_s": 350.0},
                     {"peer": "llama.cpp server (1)", "dtype": "q4_0", "error": "x"},
                     {"peer": "CTranslate2 4", "dtype": "int8_float32", "tok_s": 999.0}]}
    assert run.best_reduced_llama(row)["dtype"] == "q8_0"


def test_350m_shape_is_gqa_untied_and_about_350m_parameters():
    s = SHAPES["350M"]
    h, kv = s["hidden_size"], s["hidden_size"] * s["num_key_value_heads"] // s["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"] + 2 * h  # q, o; k, v; MLP; two norms
    n = s["num_hidden_layers"] * layer + 2 * s["vocab_size"] * h + h  # untied embedding and output; final norm
    assert 330e6 <= n <= 350e6, n  # benchmarks.run prints the real model's count: 336.1M
    assert s["num_key_value_heads"] < s["num_attention_heads"] and s["tie_word_embeddings"] is False


def test_long_context_workload_fits_its_window():
    reqs = long_context(4096)
    assert len(reqs) == 8 and {len(r.prompt_ids) for r in reqs} == {4000} and {r.max_new_tokens for r in reqs} == {256}
    assert 4000 + 256 <= LONG_CONTEXT
