"""The dtype load option from the CLI and the client, through a kernel: a model loaded in bfloat16 runs in
bfloat16 with the native kernels, model_info says so, and asking for another precision is EBUSY."""

import json
import subprocess
import sys

import pytest

from llmos.drivers.model import precision
from llmos.syscalls.errors import Busy
from tests.tinymodel import make_tiny_llama


def llmos(kernel, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos", *argv], env=kernel.env, capture_output=True, text=True,
                          timeout=120)


def test_a_model_loaded_in_bfloat16_from_the_cli_runs_bfloat16_kernels_and_says_so(kernel, client, tmp_path):
    path = str(make_tiny_llama(tmp_path / "bf16", hidden=64, kv_heads=2))
    loaded = llmos(kernel, "load", path, "--dtype", "bfloat16", "--no-prefix-cache", "--json")
    try:
        assert loaded.returncode == 0, loaded.stderr
        (ex,) = json.loads(loaded.stdout)["executors"]
        assert ex["dtype"] == "bfloat16" and ex["prefix_cache"] is False
        assert ex["kernels"] == "native" and "native C (bfloat16, float32 accumulation)" in ex["kernel_path"]
        pid = client.spawn(prompt="the kernel", model=path, max_new_tokens=6, temperature=0.0, ignore_eos=True)
        assert len(client.wait(pid).token_ids) == 6
        info = llmos(kernel, "model-info", path)
        assert "bfloat16" in info.stdout and "native C (bfloat16" in info.stdout, info.stdout
        with pytest.raises(Busy, match=r"dtype \(asked float32, loaded bfloat16\)"):
            client.model_load(path, dtype="float32")
        assert client.model_load(path, dtype="auto")["model"] == path  # auto takes the model as it is
    finally:
        client.model_unload(path, force=True)


def test_the_session_models_instances_say_their_precision_and_prefix_cache(client, tiny_model):
    (ex,) = client.model_info(tiny_model)["executors"]
    auto = precision.resolve("auto", "cpu")  # float32 here (no AMX, no AVX512-BF16); bfloat16 where they are
    assert ex["dtype"] == auto and ex["prefix_cache"] is True
    assert ex["kernel_path"].startswith(f"attention+norm+rotary+SiLU: native C ({auto}")
    assert {"prefix_hits", "prefix_hit_tokens", "prefix_cached_blocks"} <= ex.keys()
