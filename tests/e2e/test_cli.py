"""The llmos CLI and llmos-shell as a user runs them, against the shared kernel."""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmos import AsyncClient, NoSuchProcess
from llmos.cli import main as cli_main
from llmos.shell import main as shell_main
from tests.conftest import wait_for

BIN = [sys.executable, "-m", "llmos"]
LONG = ["--max-new-tokens", "100000", "--ignore-eos"]


def llmos(kernel, *args, input=None, timeout=120, env=None):
    return subprocess.run([*BIN, *args], env=env or kernel.env, capture_output=True, text=True, input=input,
                          timeout=timeout)


def greedy_text(client, model, prompt, n):
    return client.wait(client.spawn(prompt=prompt, model=model, max_new_tokens=n, temperature=0.0)).text


def test_run_prints_the_generated_text_on_stdout(kernel, client, tiny_model):
    r = llmos(kernel, "run", "--model", tiny_model, "--max-new-tokens", "6", "--temperature", "0", "-v", "hi")
    assert r.returncode == 0, r.stderr
    expected = greedy_text(client, tiny_model, "hi", 6)
    assert expected and r.stdout == expected + "\n"  # the same process, run by a client: the same text
    pid = int(r.stderr.split("[pid ", 1)[1].split("]")[0])
    assert f"[pid {pid}: " in r.stderr and "6 tokens" in r.stderr
    with pytest.raises(NoSuchProcess):
        client.stat(pid)  # run reaped its process


def test_run_says_on_stderr_when_max_new_tokens_was_cut_to_the_context(kernel, tiny_model):
    # the tiny model's context is 1024 tokens and its tokenizer gives one token per byte
    r = llmos(kernel, "run", "--model", tiny_model, "--max-new-tokens", "500", "--temperature", "0", "--ignore-eos",
              "w" * 1000)
    assert r.returncode == 0, r.stderr
    assert "warning: max_new_tokens" in r.stderr and "500" in r.stderr


def test_ps_and_kill_act_on_processes_and_kill_says_what_happens_next(kernel, client, long_model):
    pid = client.spawn(prompt="x", model=long_model, max_new_tokens=100000, ignore_eos=True)
    other = client.spawn(prompt="y", model=long_model, max_new_tokens=100000, ignore_eos=True)
    ps = llmos(kernel, "ps")
    assert ps.returncode == 0 and any(line.split()[0] == str(pid) for line in ps.stdout.splitlines()[1:])
    rows = json.loads(llmos(kernel, "ps", "--json").stdout)
    assert any(r["pid"] == pid and r["state"] in ("READY", "RUNNING") for r in rows)
    k = llmos(kernel, "kill", str(pid), "SIGKILL")
    assert k.returncode == 0 and k.stdout.strip() == f"sent KILL to pid {pid}: it has ended at once; " \
                                                     f"`llmos wait {pid}` collects it"
    assert client.wait(pid).signal == "KILL"
    t = llmos(kernel, "kill", str(other))
    assert t.returncode == 0 and f"sent TERM to pid {other}:" in t.stdout and "keeping its output" in t.stdout
    assert f"`llmos wait {other}` collects it" in t.stdout
    w = llmos(kernel, "wait", str(other))  # wait collects it: the text, and the signal in the exit status
    assert w.returncode == 143 and f"[pid {other} killed by SIGTERM]" in w.stderr and w.stdout.endswith("\n")
    with pytest.raises(NoSuchProcess):
        client.stat(other)
    bad = llmos(kernel, "kill", "1", "HUP")
    assert bad.returncode == 2 and "must be one of TERM, KILL" in bad.stderr


def test_errors_are_reported_with_their_errno_and_a_failing_exit_code(kernel):
    r = llmos(kernel, "kill", "987654")
    assert r.returncode == 1 and "ESRCH" in r.stderr


def test_kernel_status_json_has_pid_address_uptime_and_version(kernel):
    r = llmos(kernel, "kernel", "status", "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["pid"] == kernel.proc.pid and info["address"] == kernel.address
    assert info["uptime_s"] > 0 and info["version"]


def test_the_shell_runs_commands_and_says_what_each_command_expects(kernel, long_model, tiny_model):
    script = "\n".join([
        f"spawn --model {long_model} -n 100000 --ignore-eos first",
        "ps",
        "bogus",
        "kill",
        "kill notapid",
        "kill 999999",
        "kill 3 HUP",
        "wait",
        "stat x",
        "ps now",
        f"run --model {tiny_model} -n 4 --temperature 0 hello there",
        "help",
        "exit",
    ]) + "\n"
    r = subprocess.run([sys.executable, "-m", "llmos.shell"], env=kernel.env, input=script,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert r.returncode == 0 and "Traceback" not in out + r.stderr, r.stderr
    pid = int(out.split("pid ", 1)[1].split()[0])
    assert "unknown command 'bogus'" in out and "ESRCH" in out
    assert out.count("usage: kill PID [TERM|KILL|STOP|CONT]") == 3 and "argument PID: must be an integer, got 'notapid'" in out
    assert "usage: wait PID" in out and "usage: stat PID" in out and "usage: ps (unrecognized arguments: now)" in out
    assert "exit                leave the shell" in out and ("RUNNING" in out or "READY" in out)
    with kernel.client() as c:
        c.kill(pid, "KILL")
        c.wait(pid)


def blockers(client, model, n=4):
    """Fill the shared kernel's batch (max_batch 4) on ``model`` with processes that run until killed."""
    pids = [client.spawn(prompt="b", model=model, max_new_tokens=100000, ignore_eos=True) for _ in range(n)]
    wait_for(lambda: all(client.stat(p).state == "RUNNING" for p in pids), 20, "the blockers to run")
    return pids


def kill_all(client, pids, sig="KILL"):
    for p in pids:
        client.kill(p, sig)
        client.wait(p)


def as_in_a_terminal() -> None:
    """A command started from a terminal has Ctrl-C's default disposition; a test run launched in the background by a
    non-interactive shell has SIGINT ignored, and its children would inherit that (Python keeps an ignored SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(kernel, *args):
    """``llmos run -v ...`` in the background; returns (process, its LLMOS pid from the -v line)."""
    p = subprocess.Popen([*BIN, "run", "-v", *args], env=kernel.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    line = p.stderr.readline()
    assert line.startswith("[pid "), line + p.stderr.read()
    return p, int(line[5:].split("]")[0])


def test_run_takes_its_result_from_the_stream_when_another_client_reaped_the_process(kernel, client, long_model):
    blocking = blockers(client, long_model)
    run, pid = start_run(kernel, "--model", long_model, "--temperature", "0", "--max-new-tokens", "12",
                         "--ignore-eos", "reaped elsewhere")

    async def reap_it_elsewhere():
        async with AsyncClient(kernel.address) as other:
            waiting = asyncio.ensure_future(other.wait(pid))
            # queued behind the blockers; this reply comes after the wait sent before it is registered
            assert (await other.stat(pid)).state == "READY"
            for b in blocking:
                await other.kill(b, "KILL")
                await other.wait(b)
            return await waiting

    reaped = asyncio.run(reap_it_elsewhere())  # the other client reaped it when it finished: run could not
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert reaped.stats.output_tokens == 12 and out == reaped.text + "\n"


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("KILL", 137)])
def test_a_run_killed_from_outside_exits_128_plus_the_signal_and_says_so(kernel, client, long_model, sig, code):
    run, pid = start_run(kernel, "--model", long_model, *LONG, "killed from outside")
    wait_for(lambda: client.stat(pid).output_tokens > 0, 20, "tokens")
    client.kill(pid, sig)
    out, err = run.communicate(timeout=60)
    assert run.returncode == code and f"[pid {pid} killed by SIG{sig}]" in err, err
    with pytest.raises(NoSuchProcess):
        client.stat(pid)  # and run reaped it


def test_ctrl_c_stops_and_reaps_the_process_in_run_and_in_the_shell(kernel, client, long_model):
    run, pid = start_run(kernel, "--model", long_model, *LONG, "interrupted")
    wait_for(lambda: client.stat(pid).output_tokens > 0, 20, "tokens")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130 and f"[pid {pid} stopped by Ctrl-C]" in err and "Traceback" not in err, err
    with pytest.raises(NoSuchProcess):
        client.stat(pid)  # not left a ZOMBIE

    shell = subprocess.Popen([sys.executable, "-m", "llmos.shell"], env=kernel.env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    before = {p.pid for p in client.ps()}
    shell.stdin.write(f"run --model {long_model} -n 100000 --ignore-eos in the shell\n")
    shell.stdin.flush()
    [spid] = wait_for(lambda: [p.pid for p in client.ps() if p.pid not in before and p.output_tokens > 0], 20,
                      "the shell's run")
    shell.send_signal(signal.SIGINT)
    wait_for(lambda: spid not in {p.pid for p in client.ps()}, 20, "the shell to reap its run")
    out, err = shell.communicate("ps\nexit\n", timeout=60)
    assert shell.returncode == 0 and f"[pid {spid} stopped by Ctrl-C]" in out and "PID  STATE" in out, err


def test_a_closed_stdout_ends_a_command_quietly_and_stops_its_run(kernel, client, long_model, tiny_model):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: `llmos ... | head` at its worst
    try:
        for args in (["model-info", tiny_model], ["ps"], ["run", "-v", "--model", long_model, *LONG, "piped"]):
            r = subprocess.run([*BIN, *args], env=kernel.env, stdout=write_end, stderr=subprocess.PIPE, text=True,
                               timeout=60)
            assert r.returncode == 141 and "Traceback" not in r.stderr and "Error" not in r.stderr, (args, r.stderr)
        pid = int(r.stderr.split("[pid ", 1)[1].split("]")[0])
        with pytest.raises(NoSuchProcess):
            client.stat(pid)  # the run stopped its process and reaped it
        before = {p.pid for p in client.ps()}
        shell = subprocess.run([sys.executable, "-m", "llmos.shell"], env=kernel.env, stdout=write_end,
                               stderr=subprocess.PIPE, text=True, timeout=60,
                               input=f"run --model {long_model} -n 100000 --ignore-eos piped\nps\n")
        assert shell.returncode == 141 and "Traceback" not in shell.stderr, shell.stderr
        assert [p.pid for p in client.ps() if p.pid not in before] == []  # the shell's run was stopped and reaped
    finally:
        os.close(write_end)


def test_bad_addresses_are_a_usage_error_with_a_message_not_a_traceback(kernel, monkeypatch, capsys):
    r = llmos(kernel, "--address", "garbage", "ps")
    assert r.returncode == 2 and "invalid kernel address 'garbage'" in r.stderr and "Traceback" not in r.stderr
    env = {**kernel.env, "LLMOS_ADDRESS": "foo"}
    r = llmos(kernel, "run", "hi", env=env)
    assert r.returncode == 2 and "'foo' ($LLMOS_ADDRESS)" in r.stderr and "Traceback" not in r.stderr
    monkeypatch.setenv("LLMOS_ADDRESS", "tcp://localhost")
    for argv in (["ps"], ["kernel", "status"], ["kernel", "start"], ["model-info"]):
        assert cli_main(argv) == 2
        assert "a tcp address needs a port" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("exit\n"))
    assert shell_main([]) == 1 and "invalid kernel address" in capsys.readouterr().err


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An environment that points away from the shared kernel: only --home or --address can reach it."""
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("LLMOS_ADDRESS", f"ipc://{tmp_path}/nowhere.sock")
    return tmp_path / "elsewhere"


def test_every_subcommand_honours_home_and_address(kernel, client, long_model, tiny_model, tmp_path, elsewhere,
                                                   capsys, monkeypatch):
    from tests.tinymodel import make_tiny_llama

    spare = str(make_tiny_llama(tmp_path / "spare", seed=11))  # never loaded here
    pid = client.spawn(prompt="p", model=long_model, max_new_tokens=100000, ignore_eos=True)
    reference = greedy_text(client, tiny_model, "home", 5)
    by = {"home": ["--home", str(kernel.home)], "address": ["--address", kernel.address]}

    def cli(how, *argv, code=0):
        got = cli_main([*by[how], *argv])
        out = capsys.readouterr()
        assert got == code, (how, argv, out.err)
        return out.out if code == 0 else out.err

    for how in by:  # (kernel start and stop: test_lifecycle; a real load and unload: test_models)
        assert json.loads(cli(how, "kernel", "status", "--json"))["pid"] == kernel.proc.pid
        assert cli(how, "run", "--model", tiny_model, "--temperature", "0", "--max-new-tokens", "5", "home") \
            == reference + "\n"
        assert str(pid) in cli(how, "ps")
        assert json.loads(cli(how, "stat", str(pid), "--json"))["pid"] == pid
        assert any(d["kind"] == "cpu" for d in json.loads(cli(how, "devices", "--json")))
        assert "finished" in json.loads(cli(how, "metrics", "--json"))
        assert json.loads(cli(how, "load", tiny_model, "--json"))["loaded"] is True  # loaded already, same options
        assert tiny_model[-48:] in cli(how, "models")
        assert json.loads(cli(how, "model-info", tiny_model, "--json"))["loaded"] is True
        assert "is not loaded" in cli(how, "unload", spare, code=1)  # the kernel's answer, not "no kernel"
        monkeypatch.setattr(sys, "stdin", io.StringIO("status\nexit\n"))
        assert shell_main(by[how]) == 0 and f"pid {kernel.proc.pid}" in capsys.readouterr().out
    assert "sent TERM" in cli("address", "kill", str(pid))
    assert cli("home", "wait", str(pid), code=143).splitlines()[-1] == f"[pid {pid} killed by SIGTERM]"
    assert not elsewhere.exists()  # nothing looked for (or started) a kernel where the environment points


def test_run_help_says_the_default_temperature_varies_and_how_to_repeat_a_run(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "temperature 0.8" in text and "--temperature 0 repeats a run" in text
    with pytest.raises(SystemExit):
        shell_main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "interactive REPL" in out and "--home" in out


def test_llmos_joins_a_running_kernel_instead_of_starting_one(kernel, monkeypatch):
    from llmos import LLMOS

    launched = kernel.home / "log" / "kernel.log"  # where a launch (even one that finds the kernel) writes
    before = launched.stat().st_size if launched.exists() else -1
    monkeypatch.setenv("LLMOS_ADDRESS", kernel.address)
    with LLMOS() as os_:
        assert os_.embedded is False and os_.client.kernel["pid"] == kernel.proc.pid
    assert kernel.proc.poll() is None  # closing a handle that joined leaves the kernel running
    with LLMOS(home=Path(kernel.home), address=None) as os_:
        assert os_.embedded is False and os_.client.kernel["pid"] == kernel.proc.pid
    assert (launched.stat().st_size if launched.exists() else -1) == before  # no second kernel was even tried


def test_a_launch_that_loses_the_race_to_another_kernel_uses_it_and_never_claims_it(kernel):
    from llmos import embedded

    proc, c = embedded.launch(kernel.address, kernel.home, embedded=True)
    with c:
        assert proc is None and c.kernel["pid"] == kernel.proc.pid  # so closing it can never stop the kernel
    assert kernel.proc.poll() is None


def test_stop_and_cont_say_what_the_process_state_shows_in_the_cli_and_the_shell(kernel, client, long_model,
                                                                                  tiny_model):
    pid = client.spawn(prompt="x", model=long_model, max_new_tokens=100000, ignore_eos=True)
    try:
        wait_for(lambda: client.stat(pid).state == "RUNNING", 20, "it to run")
        c = llmos(kernel, "cont", str(pid))  # never stopped: CONT does nothing, and says so
        assert c.returncode == 0 and c.stdout.strip() in (f"pid {pid} was not stopped; it is RUNNING",
                                                          f"pid {pid} was not stopped; it is READY"), c
        s = llmos(kernel, "stop", str(pid))
        assert s.returncode == 0 and "it is STOPPED, out of the batch with its context kept" in s.stdout, s
        again = llmos(kernel, "stop", str(pid))
        assert again.stdout.strip() == f"pid {pid} was already STOPPED; `llmos cont {pid}` resumes it", again
        r = llmos(kernel, "cont", str(pid))
        assert r.returncode == 0 and "resuming where it stopped" in r.stdout, r
    finally:
        client.kill(pid, "KILL")
        client.wait(pid)
    done = client.spawn(prompt="y", model=tiny_model, max_new_tokens=2)
    client.wait(done, reap=False)  # a ZOMBIE: it has ended, its result kept
    try:
        for sig in ("stop", "cont"):
            z = llmos(kernel, sig, str(done))
            # refused (EINVAL from a kernel that checks, or the CLI's own reading of the ZOMBIE state)
            assert z.returncode == 1 and "context kept" not in z.stdout + z.stderr, z
            assert "resuming" not in z.stdout + z.stderr and "Traceback" not in z.stderr, z
            assert "ZOMBIE" in z.stderr or "EINVAL" in z.stderr, z
        shell = subprocess.run([sys.executable, "-m", "llmos.shell"], env=kernel.env, input=f"stop {done}\nexit\n",
                               capture_output=True, text=True, timeout=60)
        assert "context kept" not in shell.stdout and ("ZOMBIE" in shell.stdout or "EINVAL" in shell.stdout), shell
    finally:
        client.wait(done)


def test_sigterm_to_run_or_chat_ends_and_reaps_its_process_and_exits_143(kernel, client, long_model):
    run, pid = start_run(kernel, "--model", long_model, *LONG, "terminated")
    wait_for(lambda: client.stat(pid).output_tokens > 0, 20, "tokens")
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 143 and f"[pid {pid} stopped by SIGTERM]" in err and "Traceback" not in err, err
    with pytest.raises(NoSuchProcess):
        client.stat(pid)  # neither left running nor a ZOMBIE holding its KV

    chat = subprocess.Popen([*BIN, "chat", "-v", "--model", long_model, *LONG], env=kernel.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = chat.stderr.readline()
    assert line.startswith("[session pid "), line + chat.stderr.read()
    spid = int(line[len("[session pid "):].split("]")[0])
    chat.stdin.write("a turn that runs until the chat is told to end\n")
    chat.stdin.flush()
    wait_for(lambda: client.stat(spid).output_tokens > 0, 20, "the turn's tokens")
    chat.send_signal(signal.SIGTERM)
    out, err = chat.communicate(timeout=60)
    assert chat.returncode == 143 and "Traceback" not in err, err
    with pytest.raises(NoSuchProcess):
        client.stat(spid)  # the session was closed and reaped
