"""The kernel's life: daemon start/stop/status, one kernel per address, worker crashes, no orphans."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from llmos import Client, DeviceError
from tests.conftest import KernelProc, alive, wait_for


def llmos(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "llmos", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def processes_mentioning(text: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture
def home_env():
    home = tempfile.mkdtemp(prefix="llmos-d-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "LLMOS_ADDRESS"}
    env["LLMOS_HOME"] = home
    yield home, env
    for p in processes_mentioning(home):
        p.kill()
    shutil.rmtree(home, ignore_errors=True)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_the_daemon_starts_once_reports_itself_and_stop_ends_it_and_its_workers(home_env, kernel, tiny_model):
    parent, env = home_env
    env["LLMOS_HOME"] = f"{parent}/elsewhere"  # only --home (then --address) leads to this kernel
    home = f"{parent}/h"
    # what an older LLMOS left: a 0755 home and log/, a 0644 log, and the sockets of a kernel that was killed
    os.makedirs(f"{home}/log")
    os.makedirs(f"{home}/run", mode=0o700)
    os.chmod(home, 0o755)
    os.chmod(f"{home}/log", 0o755)
    Path(f"{home}/log/worker-w1.log").write_text("old\n")
    os.chmod(f"{home}/log/worker-w1.log", 0o644)
    stale = Path(f"{home}/run/worker-{dead_pid()}-w1.sock")
    live = Path(f"{home}/run/worker-{kernel.proc.pid}-w9.sock")  # a running kernel's: not ours to remove
    stale.touch()
    live.touch()
    assert llmos(env, "--home", home, "kernel", "status").returncode == 1
    first = llmos(env, "--home", home, "kernel", "start")
    assert first.returncode == 0 and "started" in first.stdout, first.stderr
    status = json.loads(llmos(env, "--home", home, "kernel", "status", "--json").stdout)
    pid, address = status["pid"], status["address"]
    assert address == f"ipc://{home}/run/kernel.sock"
    assert not stale.exists() and live.exists()
    # everything LLMOS made, or made before, is owner-only: it holds prompts, logs and the kernel's socket
    assert {p: mode(p) for p in (home, f"{home}/run", f"{home}/log")} == dict.fromkeys(
        (home, f"{home}/run", f"{home}/log"), 0o700)
    assert {p: mode(f"{home}/{p}") for p in ("log/kernel.log", "log/worker-w1.log", "run/kernel.pid")} == {
        "log/kernel.log": 0o600, "log/worker-w1.log": 0o600, "run/kernel.pid": 0o600}
    again = llmos(env, "--home", home, "kernel", "start")
    assert again.returncode == 0 and f"already running: pid {pid}" in again.stdout
    rival = subprocess.run([sys.executable, "-m", "llmos.kernel.main", "--home", home], env=env,
                           capture_output=True, text=True, timeout=60)
    assert rival.returncode == 3 and f"(pid {pid}) already serves" in rival.stderr
    with Client(address) as c:
        assert c.kernel["pid"] == pid  # the first kernel still owns the socket
        c.wait(c.spawn(prompt="warm", model=tiny_model, max_new_tokens=2))
        [worker] = [m["worker_pid"] for m in c.kernel_info()["models"]]
    new_logs = [p for p in Path(f"{home}/log").iterdir() if p.name.startswith("worker-w") and p.name != "worker-w1.log"]
    assert all(mode(p) == 0o600 for p in new_logs)
    stop = llmos(env, "--address", address, "kernel", "stop")
    assert stop.returncode == 0 and f"stopped: pid {pid}" in stop.stdout
    assert not alive(pid) and not alive(worker)
    assert not Path(f"{home}/run/kernel.sock").exists() and not Path(f"{parent}/elsewhere").exists()
    live.unlink()


def test_kernel_start_refuses_bad_flags_with_exit_code_2_naming_the_flag(home_env):
    _, env = home_env
    for args, flag in ((["--max-batch", "0"], "--max-batch"), (["--memory-limit", "banana"], "--memory-limit"),
                       (["--zombie-ttl", "nan"], "--zombie-ttl")):
        r = llmos(env, "kernel", "start", *args)
        assert r.returncode == 2 and f"argument {flag}:" in r.stderr and "Traceback" not in r.stderr, r.stderr
        direct = subprocess.run([sys.executable, "-m", "llmos.kernel.main", *args], env=env, capture_output=True,
                                text=True, timeout=60)
        assert direct.returncode == 2 and f"argument {flag}:" in direct.stderr
    assert processes_mentioning(env["LLMOS_HOME"]) == []


def test_kernel_start_reports_a_taken_tcp_port_in_the_kernels_own_words(home_env):
    _, env = home_env
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        r = llmos(env, "--address", address, "kernel", "start")
        # the kernel exited before answering; start quotes its message and passes its exit code on
        assert r.returncode == 4 and f"{address} is in use by another program (EADDRINUSE)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "kernel exited with code 4" in r.stderr


def test_sigint_and_sighup_stop_the_kernel_cleanly_and_kernel_start_foreground_runs_it_attached(home_env):
    parent, env = home_env
    k = KernelProc()
    try:
        k.proc.send_signal(signal.SIGHUP)
        assert k.proc.wait(30) == 0
        assert not Path(f"{k.home}/run/kernel.sock").exists() and "signal SIGHUP" in k.logs()
    finally:
        k.stop()
    fg = subprocess.Popen([sys.executable, "-m", "llmos", "--home", f"{parent}/fg", "kernel", "start",
                           "--foreground", "--max-batch", "2"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        sock = Path(f"{parent}/fg/run/kernel.sock")
        wait_for(lambda: sock.exists() or fg.poll() is not None, 30, "the foreground kernel's socket")
        with Client(f"ipc://{sock}") as c:
            assert c.kernel["pid"] == fg.pid  # the command itself is the kernel
        fg.send_signal(signal.SIGINT)  # Ctrl-C in its terminal
        out, err = fg.communicate(timeout=30)
        assert fg.returncode == 0 and "signal SIGINT" in err and "Traceback" not in err
        assert not sock.exists()
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()


EMBEDDER = """
import sys, time
from llmos import LLMOS
os_ = LLMOS(home=sys.argv[1])
print(os_.client.kernel["pid"], os_.embedded, flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_an_embedded_kernel_stops_when_its_program_is_killed(home_env):
    parent, env = home_env
    prog = subprocess.Popen([sys.executable, "-c", EMBEDDER, f"{parent}/emb"], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        pid, embedded = prog.stdout.readline().split()
        assert embedded == "True" and alive(int(pid))
        prog.kill()  # SIGKILL: no atexit, no finalizer; the kernel learns it from the OS
        prog.wait()
        wait_for(lambda: not alive(int(pid)), 20, "the embedded kernel to stop")
    finally:
        if prog.poll() is None:
            prog.kill()


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_workers_die_with_a_killed_kernel(tiny_model):
    k = KernelProc()
    try:
        with k.client() as c:
            c.wait(c.spawn(prompt="warm", model=tiny_model, max_new_tokens=2))
        [worker] = k.worker_pids()
        k.proc.kill()
        k.proc.wait()
        assert not alive(worker)
    finally:
        k.stop()


@pytest.mark.slow
def test_a_crashed_worker_is_restarted_and_its_processes_resume_token_for_token(tiny_model):
    k = KernelProc()
    try:
        with k.client() as c:
            greedy = dict(model=tiny_model, max_new_tokens=300, temperature=0.0, ignore_eos=True)
            prompts = ["first survivor", "second survivor", "third"]
            pids = [c.spawn(prompt=p, **greedy) for p in prompts]
            wait_for(lambda: c.stat(pids[0]).output_tokens > 5, what="the processes to generate")
            [worker] = k.worker_pids()
            os.kill(worker, signal.SIGKILL)
            results = [c.wait(pid, timeout=60) for pid in pids]
            new_workers = k.worker_pids()
            refs = [c.wait(c.spawn(prompt=p, **greedy)) for p in prompts]
            for r, ref in zip(results, refs):
                assert r.finish_reason == "length" and r.error is None
                assert r.token_ids == ref.token_ids and r.text == ref.text
            assert any(r.sched["recomputed_tokens"] > 0 for r in results)
            assert new_workers != [worker] and len(new_workers) == 1
            assert "worker_restarting" in k.logs() or "worker_restarting" in (k.home / "kernel.out").read_text()
    finally:
        k.stop()


@pytest.mark.slow
def test_a_worker_that_keeps_crashing_ends_its_processes_with_eio_and_the_model_reloads(tiny_model):
    k = KernelProc()
    try:
        with k.client() as c:
            pid = c.spawn(prompt="doomed", model=tiny_model, max_new_tokens=100000, ignore_eos=True)
            c.kill(pid, "STOP")  # it waits, STOPPED, through every restart
            killed = set()
            for _ in range(4):  # three restarts are allowed in a minute; the fourth crash unloads the model
                worker = wait_for(lambda: [w for w in k.worker_pids() if w and w not in killed],
                                  what="a (restarted) worker")[0]
                wait_for(lambda: any(m["worker_pid"] == worker and m.get("engine") for m in c.kernel_info()["models"]),
                         what="the worker to load")
                os.kill(worker, signal.SIGKILL)
                killed.add(worker)
            r = c.wait(pid, timeout=30)
            assert r.finish_reason == "error" and r.error["error"] == "EIO"
            assert r.error["errno"] == DeviceError.errno_default == 5
            assert "failed 4 times" in r.error["message"] and "exited with code -9" in r.error["message"]
            again = c.wait(c.spawn(prompt="again", model=tiny_model, max_new_tokens=3))
            assert again.stats.output_tokens == 3
            assert not set(k.worker_pids()) & killed
    finally:
        k.stop()

@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_a_pending_wait_learns_that_the_kernel_stopped(tiny_model):
    k = KernelProc()
    try:
        c = k.client()
        pid = c.spawn(prompt="x", model=tiny_model, max_new_tokens=100000, ignore_eos=True)
        with k.client() as other:
            other.shutdown()
        from llmos import KernelGone
        with pytest.raises(KernelGone):
            c.wait(pid)
        c.close()
    finally:
        k.stop()
