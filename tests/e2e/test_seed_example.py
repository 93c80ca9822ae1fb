"""The seed example, exactly as written, in a fresh program: embedded kernel, no process left behind."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from llmos.drivers.model.registry import DEFAULT_MODEL_DIR
from tests.e2e.test_lifecycle import processes_mentioning
from tests.tinymodel import byte_level_tokenizer, make_chain_llama

SEED_PROMPT = "这是一个关于"
STORY = " story."  # what the chain model below writes after the seed prompt

SEED = """
from llmos import LLMOS
llmos = LLMOS(model_path="{path}")
text = llmos.generate_text(prompt="这是一个关于")
print(text)
"""

DEFAULT = """
from llmos import LLMOS
with LLMOS() as llmos:
    assert llmos.embedded
    print(llmos.generate_text(prompt="Return the", max_new_tokens=24))
"""


@pytest.fixture
def fresh_home():
    """A $LLMOS_HOME of the program's own, removed afterwards; the environment that points at it."""
    home = tempfile.mkdtemp(prefix="llmos-s-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_ADDRESS"}
    env["LLMOS_HOME"] = home
    yield home, env
    for p in processes_mentioning(home):
        p.kill()
    shutil.rmtree(home, ignore_errors=True)


def run_program(code: str, env: dict, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.fixture(scope="module")
def story_model(tmp_path_factory):
    """A model whose every continuation of the seed prompt is " story." then end-of-sequence: the greedy
    token has logit 30 and every other 0, so the default sampling (temperature 0.8, top_p 0.95) keeps
    only the greedy token, and the example, written without a temperature, prints a known text."""
    tok = byte_level_tokenizer()
    last = tok(SEED_PROMPT)["input_ids"][-1]
    story = tok(STORY)["input_ids"]
    assert len(set(story)) == len(story) and last not in story
    chain = dict(zip([last, *story], [*story, tok.eos_token_id]))
    return str(make_chain_llama(tmp_path_factory.mktemp("seed") / "story", tok, chain))


def greedy_reference(model: str, prompt: str) -> str:
    """What transformers' own greedy generate writes (no LLMOS involved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(model).generate(ids, do_sample=False, max_new_tokens=32)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_seed_example_prints_the_generated_text_and_leaves_nothing(story_model, fresh_home):
    home, env = fresh_home
    parent, name = os.path.split(story_model)
    # "path/to/model" in the example is relative to the program's working directory
    r = run_program(SEED.format(path=name), env, cwd=parent)
    assert r.returncode == 0, r.stderr
    reference = greedy_reference(story_model, SEED_PROMPT)
    assert reference == STORY and r.stdout == reference + "\n"
    assert processes_mentioning(home) == []


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="default model not built")
def test_llmos_with_no_model_uses_the_shipped_default_model(fresh_home):
    home, env = fresh_home
    r = run_program(DEFAULT, env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 10 and any(c.isalpha() for c in r.stdout)
    assert processes_mentioning(home) == []


CTRL_C = """
import signal, sys, time
from llmos import LLMOS
signal.signal(signal.SIGINT, lambda *a: print("program got SIGINT", flush=True))
with LLMOS(model_path=sys.argv[1]) as os_:
    pid = os_.spawn(prompt="x", max_new_tokens=3)
    print("ready", flush=True)
    time.sleep(1.5)  # the test sends SIGINT to this whole process group now
    print("result", os_.wait(pid).finish_reason, flush=True)
"""


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_ctrl_c_in_the_programs_terminal_does_not_reach_its_embedded_kernel(tiny_model, fresh_home):
    import signal

    home, env = fresh_home
    p = subprocess.Popen([sys.executable, "-c", CTRL_C, tiny_model], env=env, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    os.killpg(p.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    out, _ = p.communicate(timeout=60)
    assert "program got SIGINT" in out and "result length" in out
    assert processes_mentioning(home) == []
