"""Generation through the kernel: sampling and stop parameters reach the engine, and non-Llama models run
on the sequential engine, also when its KV pool is too small."""

import time

import pytest
import torch

from tests.conftest import wait_for
from tests.tinymodel import make_tiny_gpt2

GREEDY = {"temperature": 0.0}


def test_a_tiny_temperature_through_the_kernel_gives_the_greedy_tokens(client, tiny_model):
    # (the field case on the default model, " value" and not "amount", is checked on the engine in
    # tests/drivers/test_sampling.py: loading the default model here would cost a worker start)
    greedy = client.wait(client.spawn(prompt="Return the", model=tiny_model, max_new_tokens=12, ignore_eos=True,
                                      **GREEDY))
    for t in (1e-38, 1e-45, 1e-6):
        r = client.wait(client.spawn(prompt="Return the", model=tiny_model, max_new_tokens=12, ignore_eos=True,
                                     temperature=t, top_p=1.0, seed=1))
        assert r.token_ids == greedy.token_ids, t


def test_stop_strings_given_to_spawn_end_the_output_through_the_kernel(client, tiny_model):
    run = dict(prompt="Return the", model=tiny_model, max_new_tokens=30, ignore_eos=True, **GREEDY)
    full = client.wait(client.spawn(**run))
    assert len(full.text) > 8 and full.finish_reason == "length"
    stop = full.text[4:7]
    stopped = client.wait(client.spawn(**run, stop=["\x00never", stop]))
    assert (stopped.text, stopped.finish_reason) == (full.text[:full.text.index(stop)], "stop")
    by_id = client.wait(client.spawn(**run, stop_token_ids=[full.token_ids[3]]))
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:full.token_ids.index(
        full.token_ids[3]) + 1]


@pytest.fixture(scope="module")
def gpt2(kernel, tmp_path_factory):
    """A tiny GPT-2 loaded on the shared kernel with a 2-block KV pool (16 token slots)."""
    path = str(make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "g", context=256))
    with kernel.client() as c:
        info = c.model_load(path, kv_blocks=2)
    yield path, info
    with kernel.client() as c:
        c.model_unload(path, force=True)


def test_a_model_outside_the_llama_family_runs_on_the_sequential_engine_and_matches_hf(client, gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, info = gpt2
    assert [ex["engine"] for ex in info["executors"]] == ["sequential"]
    assert client.model_info(path)["executors"][0]["engine"] == "sequential"
    r = client.wait(client.spawn(prompt="hi", model=path, max_new_tokens=5, ignore_eos=True, **GREEDY))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok("hi")["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert r.token_ids == ref and r.finish_reason == "length"


def test_the_sequential_engine_ends_a_sequence_its_pool_cannot_hold_with_enomem_and_the_kernel_keeps_answering(
        client, gpt2):
    path, _ = gpt2
    t = time.monotonic()
    pid = client.spawn(prompt="Return the", model=path, max_new_tokens=20, ignore_eos=True, **GREEDY)
    pings = []
    while client.stat(pid).state != "ZOMBIE" and time.monotonic() - t < 20:
        p0 = time.monotonic()
        client.ping()
        pings.append(time.monotonic() - p0)
    r = client.wait(pid, timeout=5)
    assert r.finish_reason == "error" and r.error["error"] == "ENOMEM"
    assert r.stats.prompt_tokens + len(r.token_ids) == 17  # every slot of the pool held, then one more token
    assert max(pings) < 0.5
    ex = wait_for(lambda: (lambda e: e if e["kv_used"] == 0 and e["running"] == 0 else None)(
        client.model_info(path)["executors"][0]), what="the pool to be empty")
    assert ex["kv_total"] == 2
