"""The seed example, exactly as written, in a fresh program: embedded kernel, no process left behind."""

import os
import subprocess
import sys
import tempfile

import pytest

from llmos.drivers.model.registry import DEFAULT_MODEL_DIR
from tests.e2e.test_lifecycle import processes_mentioning

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


def run_program(code: str, cwd: str | None = None) -> tuple[subprocess.CompletedProcess, str]:
    home = tempfile.mkdtemp(prefix="llmos-s-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_ADDRESS"}
    env["LLMOS_HOME"] = home
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, cwd=cwd)
    return r, home


def test_the_seed_example_prints_text_from_a_hugging_face_directory_and_leaves_nothing(tiny_model):
    parent, name = os.path.split(tiny_model)
    # "path/to/model" in the example is relative to the program's working directory
    r, home = run_program(SEED.format(path=name), cwd=parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")  # print(text) ran; a random tiny model may well produce blank text
    assert processes_mentioning(home) == []


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="default model not built")
def test_llmos_with_no_model_uses_the_shipped_default_model(tiny_model):
    r, home = run_program(DEFAULT)
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


def test_ctrl_c_in_the_programs_terminal_does_not_reach_its_embedded_kernel(tiny_model):
    import signal

    home = tempfile.mkdtemp(prefix="llmos-c-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_ADDRESS"}
    env["LLMOS_HOME"] = home
    p = subprocess.Popen([sys.executable, "-c", CTRL_C, tiny_model], env=env, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    os.killpg(p.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    out, _ = p.communicate(timeout=60)
    assert "program got SIGINT" in out and "result length" in out
    assert processes_mentioning(home) == []
