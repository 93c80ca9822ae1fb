"""Shared fixtures: a tiny real model, and one real kernel subprocess shared by the e2e tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.tinymodel import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
# the native CPU kernels build once per test session into a private directory (kernel and worker
# subprocesses inherit it), not into the user's ~/.cache
_KERNEL_CACHE = tempfile.mkdtemp(prefix="llmos-test-kernels-")
os.environ["LLMOS_KERNEL_CACHE"] = _KERNEL_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama"))


class KernelProc:
    """A real kernel in a subprocess, with its own $LLMOS_HOME (short path: ipc paths are bounded)."""

    def __init__(self, max_batch: int = 16, extra: list[str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
        self.address = f"ipc://{self.home}/run/kernel.sock"
        self.env = {**os.environ, "LLMOS_HOME": str(self.home), "LLMOS_ADDRESS": self.address}
        self.log = open(self.home / "kernel.out", "wb")
        self.proc = subprocess.Popen(
            # --parent-pid: a test run that dies never leaves its kernels behind
            [sys.executable, "-m", "llmos.kernel.main", "--max-batch", str(max_batch), "--parent-pid",
             str(os.getpid()), *(extra or [])],
            env=self.env, stdout=self.log, stderr=self.log, cwd=ROOT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        from llmos.client import Client
        from llmos.syscalls.errors import KernelUnavailable

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"kernel exited: {self.logs()}"
            try:
                Client(self.address, connect_timeout=1.0).close()
                return
            except KernelUnavailable:
                time.sleep(0.05)
        raise AssertionError("kernel did not come up")

    def client(self):
        from llmos.client import Client

        return Client(self.address)

    def worker_pids(self) -> list[int]:
        with self.client() as c:
            return [m["worker_pid"] for m in c.kernel_info()["models"]]

    def logs(self) -> str:
        return (self.home / "kernel.out").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def kernel(tiny_model: str):
    k = KernelProc(max_batch=4)
    yield k
    try:
        workers = k.worker_pids() if k.proc.poll() is None else []
    finally:
        k.stop()
    assert k.proc.returncode == 0, k.logs()
    for pid in workers:
        assert not _alive(pid), f"worker {pid} outlived its kernel"


@pytest.fixture
def client(kernel: KernelProc):
    c = kernel.client()
    yield c
    c.close()


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            if open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z":
                return False
        except OSError:
            return False
        time.sleep(0.05)
    return True


alive = _alive
