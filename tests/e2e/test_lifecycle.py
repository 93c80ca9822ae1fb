"""The kernel's life: daemon start/stop/status, one kernel per address, worker crashes, no orphans."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from llmos import Client, DeviceError
from tests.conftest import KernelProc, alive


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


def test_the_daemon_starts_once_reports_itself_and_stop_ends_it_and_its_workers(home_env, tiny_model):
    home, env = home_env
    assert llmos(env, "kernel", "status").returncode == 1
    first = llmos(env, "kernel", "start")
    assert first.returncode == 0 and "started" in first.stdout, first.stderr
    status = json.loads(llmos(env, "kernel", "status", "--json").stdout)
    pid, address = status["pid"], status["address"]
    assert address == f"ipc://{home}/run/kernel.sock" and oct(os.stat(f"{home}/run").st_mode)[-3:] == "700"
    again = llmos(env, "kernel", "start")
    assert again.returncode == 0 and f"already running: pid {pid}" in again.stdout
    rival = subprocess.run([sys.executable, "-m", "llmos.kernel.main"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert rival.returncode == 3 and f"(pid {pid}) already serves" in rival.stderr
    with Client(address) as c:
        assert c.kernel["pid"] == pid  # the first kernel still owns the socket
        c.wait(c.spawn(prompt="warm", model=tiny_model, max_new_tokens=2))
        [worker] = [m["worker_pid"] for m in c.kernel_info()["models"]]
    stop = llmos(env, "kernel", "stop")
    assert stop.returncode == 0 and f"stopped: pid {pid}" in stop.stdout
    assert not alive(pid) and not alive(worker)
    assert not Path(f"{home}/run/kernel.sock").exists()


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


def test_a_crashed_worker_ends_its_processes_with_eio_and_the_model_reloads(tiny_model):
    k = KernelProc()
    try:
        with k.client() as c:
            pid = c.spawn(prompt="doomed", model=tiny_model, max_new_tokens=100000, ignore_eos=True)
            [worker] = k.worker_pids()
            os.kill(worker, signal.SIGKILL)
            r = c.wait(pid, timeout=30)
            assert r.finish_reason == "error" and r.error["error"] == "EIO"
            assert r.error["errno"] == DeviceError.errno_default == 5
            assert "exited with code -9" in r.error["message"]
            again = c.wait(c.spawn(prompt="again", model=tiny_model, max_new_tokens=3))
            assert again.stats.output_tokens == 3
            assert k.worker_pids() != [worker]
    finally:
        k.stop()
    assert k.proc.returncode == 0


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
