"""Perplexity through a real kernel: the score syscall (sliding window past the context) and `llmos eval` over a
stored data set, equal to the same computation made directly with transformers on the same tiny model."""

import functools
import json
import math
import subprocess
import sys
import uuid

import pytest

from llmos import InvalidArgument, NotFound

BIN = [sys.executable, "-m", "llmos"]
TEXTS = ["The kernel runs the model.", "Hello world, I said.", "a", "x" * 40 + " the end",
         " ".join(f"word{i}" for i in range(250))]  # the last is 1,889 tokens: three windows of a 1,024-token context


@functools.lru_cache(maxsize=1)
def hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir,
                                                                                         dtype=torch.float32).eval()


def direct_nll(model_dir: str, text: str) -> tuple[float, int]:
    """(nll in nats, tokens scored) of ``text`` computed with transformers alone: Hugging Face's sliding window
    (stride half the context), each token scored once, counted after the label shift."""
    import torch

    tok, model = hf_model(model_dir)
    ids = torch.tensor([tok(text)["input_ids"]])
    ctx = model.config.max_position_embeddings
    nll, n, prev = 0.0, 0, 0
    for begin in range(0, ids.size(1), ctx // 2):
        end = min(begin + ctx, ids.size(1))
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :-(end - prev)] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())
        if k:
            nll, n = nll + loss.item() * k, n + k
        prev = end
        if end == ids.size(1):
            break
    return nll, n


@pytest.fixture
def dataset(client, tmp_path):
    name = f"e{uuid.uuid4().hex[:10]}"
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    client.data.import_file(src, name, "jsonl")
    yield name
    client.fs.rm(f"/data/{name}", recursive=True)


def test_llmos_eval_equals_the_perplexity_transformers_gives(kernel, client, tiny_model, dataset):
    r = subprocess.run([*BIN, "eval", tiny_model, "--data", dataset, "--json"], env=kernel.env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    want = [direct_nll(tiny_model, t) for t in TEXTS]
    nll, scored = sum(w[0] for w in want), sum(w[1] for w in want)
    assert report["records"] == len(TEXTS) and report["scored"] == scored
    assert math.isclose(report["perplexity"], math.exp(nll / scored), rel_tol=1e-4)
    assert report["path"].startswith(f"/home/{client.user}/eval/dir-tiny-llama-{dataset}-")
    stored = json.loads(client.fs.get(report["path"]))
    assert stored["perplexity"] == report["perplexity"] and stored["model"] == tiny_model
    assert {"tokens", "nll", "seconds", "tokens_per_s"} <= set(stored)
    client.fs.rm(report["path"])
    text = subprocess.run([*BIN, "eval", tiny_model, "--data", dataset, "--limit", "2"], env=kernel.env,
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and text.stdout.startswith("perplexity ") and "2 records" in text.stdout
    client.fs.rm(text.stdout.split("report: ")[1].strip())


def test_score_gives_each_tokens_logprob_with_a_sliding_window_past_the_context(client, tiny_model):
    long = TEXTS[-1]
    r = client.score(long, tiny_model)
    nll, n = direct_nll(tiny_model, long)
    assert r["tokens"] == len(r["token_ids"]) == n + 1 and len(r["logprobs"]) == n
    assert r["windows"] == 3 and r["stride"] == 512
    assert math.isclose(r["nll"], nll, rel_tol=1e-4) and math.isclose(-sum(r["logprobs"]), r["nll"], rel_tol=1e-9)
    ids = client.score(prompt_ids=r["token_ids"][:10], model=tiny_model)
    assert ids["logprobs"] == pytest.approx(r["logprobs"][:9], rel=1e-4)
    one = client.score("a", tiny_model)
    assert one["tokens"] == 1 and one["logprobs"] == [] and one["nll"] == 0


def test_score_refuses_bad_input_clearly(client, tiny_model):
    with pytest.raises(InvalidArgument, match="exactly one of 'text' and 'prompt_ids'"):
        client.score(None, tiny_model)
    with pytest.raises(InvalidArgument, match="exactly one of 'text' and 'prompt_ids'"):
        client.score("x", tiny_model, prompt_ids=[1])
    with pytest.raises(InvalidArgument, match="token ids in"):
        client.score(prompt_ids=[10**9], model=tiny_model)
    with pytest.raises(NotFound, match="no model"):
        client.score("x", f"no-such-model-{uuid.uuid4().hex[:6]}")
    assert client.ping()  # the kernel keeps serving


def test_eval_of_a_data_set_that_is_not_there_is_enoent(kernel, tiny_model):
    r = subprocess.run([*BIN, "eval", tiny_model, "--data", "no-such-data"], env=kernel.env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "[ENOENT]" in r.stderr and "no data set 'no-such-data'" in r.stderr


@pytest.mark.slow
def test_an_eval_survives_its_worker_crashing_midway_and_reports_never_overwrite_each_other(tiny_model, tmp_path):
    import os
    import signal

    from llmos import evaluate as ev
    from tests.conftest import KernelProc

    k = KernelProc()  # its own kernel: the worker it kills must not be the shared kernel's
    try:
        with k.client() as c:
            src = tmp_path / "eval.jsonl"
            src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
            c.data.import_file(src, "crash", "jsonl")
            clean = ev.evaluate(c, tiny_model, "crash")
            killed: list[int] = []

            def kill_once(done, todo, scored):  # after the first record: the next ones meet the crash
                if not killed:
                    [worker] = k.worker_pids()
                    os.kill(worker, signal.SIGKILL)
                    killed.append(worker)

            crashed = ev.evaluate(c, tiny_model, "crash", progress=kill_once)
            assert killed and crashed["records"] == len(TEXTS) and crashed["scored"] == clean["scored"]
            assert math.isclose(crashed["perplexity"], clean["perplexity"], rel_tol=1e-4)
            assert crashed["path"] != clean["path"] and c.fs.exists(clean["path"])
            assert clean["path"].startswith(f"/home/{c.user}/eval/dir-tiny-llama-crash-")
            assert ev.model_label("store:/models/default") == "store-default"
            assert ev.model_label("/some/where/default") == "dir-default"
    finally:
        k.stop()
