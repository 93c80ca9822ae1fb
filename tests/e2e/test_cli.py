"""The llmos CLI and llmos-shell as a user runs them, against the shared kernel."""

import json
import subprocess
import sys

BIN = [sys.executable, "-m", "llmos"]


def llmos(kernel, *args, input=None, timeout=120):
    return subprocess.run([*BIN, *args], env=kernel.env, capture_output=True, text=True, input=input,
                          timeout=timeout)


def test_run_streams_the_generation_to_stdout(kernel, tiny_model):
    r = llmos(kernel, "run", "--model", tiny_model, "--max-new-tokens", "6", "--temperature", "0", "-v", "hi")
    assert r.returncode == 0, r.stderr
    assert "length, 6 tokens" in r.stderr


def test_ps_and_kill_act_on_processes(kernel, client, tiny_model):
    pid = client.spawn(prompt="x", model=tiny_model, max_new_tokens=5000, ignore_eos=True)
    ps = llmos(kernel, "ps")
    assert ps.returncode == 0 and any(line.split()[0] == str(pid) for line in ps.stdout.splitlines()[1:])
    rows = json.loads(llmos(kernel, "ps", "--json").stdout)
    assert any(r["pid"] == pid and r["state"] in ("READY", "RUNNING") for r in rows)
    k = llmos(kernel, "kill", str(pid), "SIGKILL")
    assert k.returncode == 0 and f"pid {pid}: ZOMBIE" in k.stdout
    assert client.wait(pid).signal == "KILL"


def test_errors_are_reported_with_their_errno_and_a_failing_exit_code(kernel):
    r = llmos(kernel, "kill", "987654")
    assert r.returncode == 1 and "ESRCH" in r.stderr


def test_kernel_status_json_has_pid_address_uptime_and_version(kernel):
    r = llmos(kernel, "kernel", "status", "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["pid"] == kernel.proc.pid and info["address"] == kernel.address
    assert info["uptime_s"] > 0 and info["version"]


def test_the_shell_runs_commands_and_survives_mistakes(kernel, tiny_model):
    script = "\n".join([
        f"spawn --model {tiny_model} -n 3000 first",
        "ps",
        "bogus",
        "kill notapid",
        "kill 999999",
        f"run --model {tiny_model} -n 4 --temperature 0 hello there",
        "help",
        "exit",
    ]) + "\n"
    r = subprocess.run([sys.executable, "-m", "llmos.shell"], env=kernel.env, input=script,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert r.returncode == 0, r.stderr
    pid = int(out.split("pid ", 1)[1].split()[0])
    assert "unknown command 'bogus'" in out and "usage error" in out and "ESRCH" in out
    assert "exit                leave the shell" in out and ("RUNNING" in out or "READY" in out)
    with kernel.client() as c:
        c.kill(pid, "KILL")
        c.wait(pid)
