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
# models loaded without a dtype run in float32 on every machine (auto would be bfloat16 on one with AMX or
# AVX512-BF16, and the greedy comparisons with transformers' float32 would meet bfloat16's ties); the
# precision tests ask for bfloat16 by name
os.environ["LLMOS_AUTO_DTYPE"] = "float32"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def long_model(kernel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model with a 100,000-token context, loaded on the shared kernel with a small KV pool
    (4096 blocks of 8 tokens, 16 MiB): a process asked for many tokens is still running seconds later,
    instead of ending at a short context. Tests that start such processes kill and reap them."""
    path = str(make_tiny_llama(tmp_path_factory.mktemp("models") / "long-llama", seed=7, context=100_000))
    with kernel.client() as c:
        c.model_load(path, kv_blocks=4096, keep_alive=-1)
    return path


def wait_for(predicate, timeout: float = 20.0, what: str = "the condition"):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class KernelProc:
    """A real kernel in a subprocess, with its own $LLMOS_HOME (short path: ipc paths are bounded).

    ``home``: use this (existing or not) directory instead of a fresh one. ``stop()`` ends the kernel
    and removes the home (the log tail stays readable through ``logs()``).
    """

    def __init__(self, max_batch: int = 16, extra: list[str] | None = None, home: Path | None = None,
                 tcp: bool | str = False) -> None:
        self.home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.address = f"ipc://{self.home}/run/kernel.sock"
        # tcp: also a CURVE listener on a free loopback port (or the address given), for clients that are other
        # users (client_as)
        self.tcp = tcp if isinstance(tcp, str) else f"tcp://127.0.0.1:{free_port()}" if tcp else None
        extra = [*(extra or []), *(["--listen", self.tcp] if self.tcp else [])]
        self.env = {**os.environ, "LLMOS_HOME": str(self.home), "LLMOS_ADDRESS": self.address}
        self._out = self.home / "kernel.out"
        self._saved_logs: str | None = None
        self.log = open(self._out, "wb")
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

    def client_as(self, user: str, **kwargs):
        """A client that the kernel knows as ``user``: over the tcp listener, with a CURVE key pair made for
        ``user`` and authorised by the admin (this test process, the kernel's owner). Needs ``tcp=True``."""
        from llmos.client import Client

        server, secret = self._keys_of(user)
        return Client(self.tcp, server_key=server, client_key=secret, **kwargs)

    def env_as(self, user: str) -> dict[str, str]:
        """The environment in which ``llmos`` commands are ``user`` to this kernel (over tcp, as client_as)."""
        server, secret = self._keys_of(user)
        return {**self.env, "LLMOS_ADDRESS": self.tcp, "LLMOS_SERVER_KEY": server, "LLMOS_CLIENT_KEY": secret}

    def _keys_of(self, user: str) -> tuple[str, str]:
        assert self.tcp, "a client as another user needs a KernelProc(tcp=True)"
        keys = self.home / "test-keys"
        public, secret = keys / f"{user}.key", keys / f"{user}.key_secret"
        if not secret.exists():
            import zmq.auth

            keys.mkdir(mode=0o700, exist_ok=True)
            zmq.auth.create_certificates(keys, user)
            with self.client() as admin:
                admin.user_add(user, str(public))
        return str(self.home / "keys" / "kernel.key"), str(secret)

    def worker_pids(self) -> list[int]:
        with self.client() as c:
            return [m["worker_pid"] for m in c.kernel_info()["models"]]

    def logs(self) -> str:
        if self._saved_logs is not None:
            return self._saved_logs
        return self._out.read_text(errors="replace")[-3000:]

    def crash(self) -> None:
        """kill -9 the kernel (nothing is cleaned up: its home stays, for a new KernelProc(home=...))."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self._saved_logs is None:
            self._saved_logs = self.logs()
            shutil.rmtree(self.home, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kernel(tiny_model: str):
    # llmos-gw may act for dl-alice and dl-bob (tests/e2e/test_delegation.py); Prometheus on a port of its own
    # (tests/e2e/test_prometheus.py)
    port = free_port()
    k = KernelProc(max_batch=4, tcp=True, extra=["--delegate", "llmos-gw=dl-alice,dl-bob", "--metrics-port", str(port)])
    k.metrics_url = f"http://127.0.0.1:{port}/metrics"
    with k.client() as admin:  # loaded by the admin: users over tcp may run it (kernel/model_access.py)
        admin.model_load(tiny_model, keep_alive=-1)
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
