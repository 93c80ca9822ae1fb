"""``llmos spawn`` starts a process in the background and prints its pid; ``llmos logs`` is dmesg by its other name."""

import json
import os

from tests.e2e.test_cli_fs import llmos


def test_spawn_prints_the_pid_of_a_process_that_runs_on_and_wait_collects_it(kernel, client, tiny_model):
    r = llmos(kernel.env, "spawn", "--model", tiny_model, "--temperature", "0", "--max-new-tokens", "5",
              "--ignore-eos", "-p", "3", "Once")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.decode().strip())
    info = client.stat(pid)
    assert (info.owner, info.priority) == ("root", 3)
    waited = llmos(kernel.env, "wait", str(pid))
    assert waited.returncode == 0, waited.stderr
    ref = client.wait(client.spawn("Once", model=tiny_model, temperature=0, max_new_tokens=5, ignore_eos=True))
    assert waited.stdout.decode() == ref.text + "\n"


def test_spawn_json_and_chat(kernel, client, tiny_model):
    r = llmos(kernel.env, "spawn", "--json", "--chat", "--model", tiny_model, "--max-new-tokens", "2", "Hi")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["pid"]
    assert client.wait(pid).finish_reason in ("length", "stop")


def test_spawn_with_no_kernel_running_says_so_and_starts_none(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}, "LLMOS_HOME": str(tmp_path / "h")}
    r = llmos(env, "spawn", "hello")
    assert r.returncode == 1 and "no kernel running" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "h" / "run" / "kernel.sock").exists()


def test_logs_is_dmesg(kernel):
    a, b = llmos(kernel.env, "logs", "-n", "3", "--json"), llmos(kernel.env, "dmesg", "-n", "3", "--json")
    assert a.returncode == b.returncode == 0 and len(a.stdout.splitlines()) == 3
    assert all(json.loads(line)["seq"] for line in a.stdout.splitlines())
