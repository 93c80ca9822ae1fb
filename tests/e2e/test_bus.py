"""The bus under abuse: huge inputs, frames over the limits, slow readers, bad user names, zombies, bye.

Every test talks to a real kernel through raw ZeroMQ DEALER sockets, as a client written from
docs/protocol.md would, so what is checked is what goes over the wire. A raw client over ipc is whoever
its uid is (this test process); one that must be another user is that user for real: a DEALER with
CURVE keys on the kernel's tcp listener (``raw_as``), the key authorised by the admin.
"""

from __future__ import annotations

import os
import pwd
import signal
import time

import msgpack
import psutil
import pytest
import zmq
import zmq.auth

from llmos import Client, NoSuchProcess
from llmos._wire import Calls
from llmos.syscalls import protocol
from llmos.syscalls.errors import KernelGone
from tests.conftest import KernelProc

MiB = 2**20


class RawClient:
    """A DEALER socket that speaks the protocol by hand: any bytes out, decoded frames in."""

    def __init__(self, address: str, *, rcvhwm: int | None = None, rcvbuf: int | None = None,
                 curve: tuple[str, str] | None = None) -> None:
        """``curve``: (the kernel's public key file, the client's secret key file), for a CURVE tcp listener."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            server, _ = zmq.auth.load_certificate(curve[0])
            public, secret = zmq.auth.load_certificate(curve[1])
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = server, public, secret
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if rcvbuf is not None:
            self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.sock.setsockopt(zmq.MAXMSGSIZE, -1)
        self.sock.connect(address)

    def send(self, frame: bytes | dict, *more: bytes) -> None:
        data = frame if isinstance(frame, bytes) else msgpack.packb(frame, use_bin_type=True)
        self.sock.send_multipart([data, *more])

    def request(self, rid: int, call, args=None, **extra) -> None:
        self.send({"v": 1, "id": rid, "call": call, "args": {} if args is None else args, **extra})

    def recv(self, timeout: float = 60.0) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no frame from the kernel within {timeout} s")
        return msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)

    def final(self, rid: int, timeout: float = 60.0) -> dict:
        """The final frame (ok or err) of request ``rid``, skipping its chunks."""
        while True:
            f = self.recv(timeout)
            if f.get("id") == rid and f["t"] in ("ok", "err"):
                return f

    def call(self, rid: int, call, args=None, timeout: float = 60.0) -> dict:
        self.request(rid, call, args)
        return self.final(rid, timeout)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warm(k: KernelProc, model: str) -> None:
    """Load ``model`` in ``k`` (a raw call: loading may take long on a busy machine)."""
    with RawClient(k.address) as raw:
        pid = raw.call(1, "spawn", {"prompt": "warm", "model": model, "max_new_tokens": 1}, timeout=300)
        assert pid["t"] == "ok", pid
        raw.call(2, "wait", {"pid": pid["result"]["pid"]}, timeout=300)


def raw_as(k: KernelProc, user: str, **kwargs) -> RawClient:
    """A raw client that ``k`` knows as ``user``: CURVE on its tcp listener, with a key authorised for ``user``."""
    return RawClient(k.tcp, curve=k._keys_of(user), **kwargs)


def hello(raw: RawClient, user: str, rid: int = 1) -> dict:
    return raw.call(rid, "hello", {"version": 1, "client": "raw", "user": user})


ME = pwd.getpwuid(os.getuid()).pw_name  # who a raw client over ipc is: this process's uid (root in CI)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finished(client: Client, pid: int) -> bool:
    """A ZOMBIE, or already reaped (by retention)."""
    try:
        return client.stat(pid).state == "ZOMBIE"
    except NoSuchProcess:
        return True


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# -- item 10: error replies quote at most a short prefix ------------------------------------------
HUGE = "\u00e9" * (2 * MiB)  # 4 MiB of UTF-8


@pytest.mark.parametrize("place, frame", [
    ("syscall name", {"v": 1, "id": 41, "call": HUGE, "args": {}}),
    ("signal", {"v": 1, "id": 41, "call": "kill", "args": {"pid": 1, "signal": HUGE}}),
    ("unknown field name", {"v": 1, "id": 41, "call": "ping", "args": {HUGE: 1}}),
    ("protocol version", {"v": HUGE, "id": 41, "call": "ping", "args": {}}),
    ("choice", {"v": 1, "id": 41, "call": "model_load", "args": {"kv_policy": HUGE}}),
    ("hello version", {"v": 1, "id": 41, "call": "hello", "args": {"version": HUGE}}),
])
def test_an_error_about_a_huge_input_quotes_a_short_prefix_and_is_answered(kernel, place, frame):
    with RawClient(kernel.address) as raw:
        raw.send(frame)
        r = raw.final(41)
    assert r["t"] == "err" and r["error"] in ("ENOSYS", "EINVAL", "EPROTO"), (place, r)
    assert len(r["message"]) < 1000, place


# -- item 11: frames over the limit ---------------------------------------------------------------
def test_a_frame_over_the_limit_gets_emsgsize_with_its_id_and_keeps_the_connection(kernel, tiny_model):
    warm(kernel, tiny_model)
    with raw_as(kernel, "bus-alice") as raw:
        assert hello(raw, "bus-alice")["t"] == "ok"
        for rid, size in ((7, protocol.MAX_FRAME_BYTES + 100), (8, 3 * protocol.MAX_FRAME_BYTES // 2)):
            raw.send({"v": 1, "id": rid, "call": "ping", "args": {"pad": [b"x" * (size // 4)] * 4}})
            r = raw.final(rid, timeout=30)
            assert (r["t"], r["error"], r["errno"]) == ("err", "EMSGSIZE", 90), r
        # same connection, same identity: the connection's (CURVE) user still owns what it spawns
        r = raw.call(10, "spawn", {"prompt": "mine", "model": tiny_model, "max_new_tokens": 1})
        pid = r["result"]["pid"]
        assert raw.call(11, "stat", {"pid": pid})["result"]["owner"] == "bus-alice"
        assert raw.call(12, "wait", {"pid": pid})["t"] == "ok"


@pytest.mark.parametrize("what, args", [
    ("a string over MAX_STR_BYTES", {"prompt": "x" * (protocol.MAX_STR_BYTES + 1)}),
    ("an array over MAX_ARRAY_LEN", {"prompt_ids": [1] * (protocol.MAX_ARRAY_LEN + 1)}),
    ("a map over MAX_MAP_LEN", {"stop": {str(i): 0 for i in range(protocol.MAX_MAP_LEN + 1)}}),
    ("a bin over MAX_STR_BYTES", {"prompt": b"x" * (protocol.MAX_STR_BYTES + 1)}),
])
def test_a_string_array_or_map_over_its_limit_gets_emsgsize_with_the_id(kernel, what, args):
    with RawClient(kernel.address) as raw:
        r = raw.call(77, "spawn", args, timeout=30)
        assert (r["id"], r["t"], r["error"]) == (77, "err", "EMSGSIZE"), what
        assert raw.call(78, "ping")["t"] == "ok"


def test_a_truncated_frame_gets_eproto_with_the_id_when_the_id_can_be_read(kernel):
    whole = msgpack.packb({"id": 5, "v": 1, "call": "ping", "args": {"x": "y" * 100}})
    with RawClient(kernel.address) as raw:
        raw.send(whole[:-20])
        r = raw.recv()
        assert (r["id"], r["error"]) == (5, "EPROTO")
        raw.send(b"\x81\xa2id")  # a map whose id value is missing
        r = raw.recv()
        assert (r["id"], r["error"]) == (None, "EPROTO")
        raw.send(whole, b"second part")
        r = raw.recv()
        assert (r["id"], r["error"]) == (5, "EPROTO") and "frame" in r["message"]


# -- item 13: user names -------------------------------------------------------------------------
@pytest.mark.parametrize("user", ["u" * 8_000_000, "a b", "../etc", "x\n{", "", "-rf", "é" * 3, "u" * 65])
def test_hello_refuses_a_bad_user_name_and_records_nothing(kernel, client, tiny_model, user):
    warm(kernel, tiny_model)
    with RawClient(kernel.address) as raw:
        r = hello(raw, user)
        assert (r["t"], r["error"]) == ("err", "EINVAL")  # a bad name is refused as such, before any EPERM
        assert len(r["message"]) < 1000
        pids = [raw.call(2 + i, "spawn", {"prompt": "hi", "model": tiny_model, "max_new_tokens": 1})
                ["result"]["pid"] for i in range(2)]
        # the connection is still its uid's user: the refused name left no trace in what it owns
        assert {raw.call(9, "stat", {"pid": p})["result"]["owner"] for p in pids} == {ME}
        assert len(client.ps()) >= 2  # ps still answers everyone
        for i, p in enumerate(pids):
            assert raw.call(20 + i, "wait", {"pid": p})["t"] == "ok"


def test_hello_accepts_ordinary_user_names(kernel):
    for user in ("alice", "bob_2", "svc-llm", "first.last", "x@example.org", "1000"):
        with raw_as(kernel, user) as raw:  # the name is valid: the kernel has a key for it
            r = hello(raw, user)
            assert r["t"] == "ok" and (r["result"]["user"], r["result"]["transport"]) == (user, "curve"), (user, r)
        with RawClient(kernel.address) as raw:  # and over ipc, which proves this process's uid, it is not ours
            r = hello(raw, user)
            assert (r["t"], r["error"]) == ("err", "EPERM"), (user, r)


# -- items 12 and 14: a kernel with a small client buffer and a short zombie retention ------------
class SmallKernel:
    """The module's kernel with a small client buffer and a short zombie retention. A test that
    shuts it down (the bye test) leaves the next one a fresh kernel, whatever the order."""

    FLAGS = ["--client-buffer", "1M", "--zombie-ttl", "2", "--max-zombies", "2"]

    def __init__(self, model: str) -> None:
        self.model, self.k = model, None

    def get(self) -> KernelProc:
        if self.k is None or self.k.proc.poll() is not None:
            self.stop()
            self.k = KernelProc(max_batch=8, extra=self.FLAGS, tcp=True)
            warm(self.k, self.model)
        return self.k

    def stop(self) -> None:
        if self.k is not None:
            self.k.stop()
            assert self.k.proc.returncode == 0, self.k.logs()
            self.k = None


@pytest.fixture(scope="module")
def kernels(tiny_model):
    holder = SmallKernel(tiny_model)
    yield holder
    holder.stop()


@pytest.fixture
def small_kernel(kernels) -> KernelProc:
    return kernels.get()


TOKENS, STREAMS_EACH = 150, 24  # 14,400 chunks: far more than ZeroMQ's queues and the OS buffer hold


def test_a_slow_reader_gets_every_stream_complete_with_its_final_frame(small_kernel, tiny_model):
    k = small_kernel
    before = rss(k.proc.pid)
    # RCVHWM 1 and a tiny OS buffer: the client holds almost nothing, the kernel must hold the rest
    with RawClient(k.address, rcvhwm=1, rcvbuf=4096) as raw, k.client() as watcher:
        assert hello(raw, ME)["t"] == "ok"
        pids = [raw.call(100 + i, "spawn", {"prompt": f"slow {i}", "model": tiny_model, "max_new_tokens": TOKENS,
                                            "temperature": 0, "ignore_eos": True})["result"]["pid"]
                for i in range(4)]
        streams = {}
        for n in range(4 * STREAMS_EACH):  # every stream in flight while the reader sleeps
            rid = 1000 + n
            raw.request(rid, "stream", {"pid": pids[n % len(pids)]})
            streams[rid] = pids[n % len(pids)]
        wait_for(lambda: all(finished(watcher, p) for p in pids), 120, "every process to finish")
        texts: dict[int, list[str]] = {rid: [] for rid in streams}
        ids: dict[int, list[int]] = {rid: [] for rid in streams}
        finals: dict[int, dict] = {}
        while len(finals) < len(streams):
            f = raw.recv(timeout=20)
            rid = f["id"]
            assert rid in streams and rid not in finals, f
            if f["t"] == "chunk":
                texts[rid].append(f["data"]["text"])
                ids[rid].extend(f["data"]["token_ids"])
            else:
                assert f["t"] == "ok", f
                finals[rid] = f["result"]
        for rid, result in finals.items():
            assert result["finish_reason"] == "length" and len(result["token_ids"]) == TOKENS
            assert "".join(texts[rid]) == result["text"] and ids[rid] == result["token_ids"]
    assert rss(k.proc.pid) - before < 64 * MiB


def test_a_client_over_its_buffer_gets_eagain_and_every_earlier_reply(small_kernel):
    k = small_kernel
    n = 6000
    with RawClient(k.address, rcvhwm=1, rcvbuf=4096) as raw:
        size = len(msgpack.packb(raw.call(1, "models")))
        assert size * n > 3 * MiB, "the replies must overflow a 1 MiB buffer"
        for rid in range(2, n + 2):
            raw.request(rid, "models")
        finals = {}
        while len(finals) < n:
            f = raw.recv(timeout=30)
            assert f["id"] not in finals
            finals[f["id"]] = f
        kinds = [finals[rid]["t"] if finals[rid]["t"] == "ok" else finals[rid]["error"] for rid in range(2, n + 2)]
        assert set(kinds) == {"ok", "EAGAIN"}, set(kinds)
        assert kinds.index("EAGAIN") > 100  # the buffer held many replies before it refused
        assert raw.call(n + 5, "ping")["t"] == "ok"  # read: the buffer drained, calls are served again


def test_zombies_nobody_waits_for_are_reaped_past_the_count_cap_and_the_retention(small_kernel, tiny_model):
    k = small_kernel
    with raw_as(k, "forgetful") as raw:  # spawns, then goes away without waiting
        assert hello(raw, "forgetful")["t"] == "ok"
        pids = [raw.call(10 + i, "spawn", {"prompt": "z", "model": tiny_model, "max_new_tokens": 3})
                ["result"]["pid"] for i in range(5)]
    watcher = k.client()

    def mine():
        return [p for p in watcher.ps() if p.owner == "forgetful"]

    def done():
        rows = mine()
        assert sum(p.state == "ZOMBIE" for p in rows) <= 2  # never more than the cap, even for a moment
        return all(p.state == "ZOMBIE" for p in rows)

    wait_for(done, 60, "the processes to finish")
    assert len(mine()) <= 2
    t0 = time.monotonic()
    wait_for(lambda: not mine(), 30, "the retention period to reap the rest")
    assert time.monotonic() - t0 < 10
    assert not [p for p in watcher.ps() if p.pid in pids]
    watcher.close()


# -- uncaught behaviour: the bye frame reaches a call in flight ----------------------------------
def test_a_wait_in_flight_learns_promptly_that_another_client_shut_the_kernel_down(small_kernel, tiny_model):
    k = small_kernel
    [worker] = k.worker_pids()
    try:
        with RawClient(k.address) as raw:
            pid = raw.call(1, "spawn", {"prompt": "long", "model": tiny_model, "max_new_tokens": 100000,
                                        "ignore_eos": True})["result"]["pid"]
            os.kill(worker, signal.SIGSTOP)  # the process stays RUNNING for as long as this test needs
            raw.request(2, "wait", {"pid": pid})
            assert raw.call(3, "ping")["t"] == "ok"  # requests are served in order: the wait is in flight
            with k.client() as other:
                other.shutdown()
            t0 = time.monotonic()
            with pytest.raises(KernelGone):
                Calls.interpret(raw.sock.recv() if raw.sock.poll(protocol.DEAD_AFTER_S * 1000) else b"\x80")
            assert time.monotonic() - t0 < protocol.DEAD_AFTER_S / 3
    finally:
        try:
            os.kill(worker, signal.SIGCONT)
        except ProcessLookupError:
            pass
    k.proc.wait(30)
    assert k.proc.returncode == 0


# -- the kernel's loop is never held by one request's size ------------------------------------------
def test_million_item_prompts_neither_hold_the_loop_nor_stay_in_the_kernels_memory(kernel, tiny_model):
    # rounds of five pipelined spawns whose prompt_ids hold 1,000,000 ids each (the table's bound; E2BIG on
    # this model): decoding and checking them must not hold the loop that answers everyone else, and what
    # they leave (reference cycles included) must not pile up in the kernel
    ids = {"prompt_ids": [5] * 1_000_000, "model": tiny_model, "max_new_tokens": 2}
    worst = 0.0
    with RawClient(kernel.address) as big, RawClient(kernel.address) as pinger:
        assert big.call(1, "spawn", {"prompt": "warm", "model": tiny_model, "max_new_tokens": 1})["t"] == "ok"
        before = rss(kernel.proc.pid)
        for round_ in range(3):
            for rid in range(10, 15):
                big.request(rid, "spawn", ids)
            answered = 0
            deadline = time.monotonic() + 60
            while answered < 5 and time.monotonic() < deadline:
                t = time.monotonic()
                assert pinger.call(100 + answered, "ping", timeout=30)["t"] == "ok"
                worst = max(worst, time.monotonic() - t)
                while big.sock.poll(0):
                    f = big.recv()
                    if f["t"] in ("ok", "err"):
                        assert f["error"] == "E2BIG", f
                        answered += 1
                time.sleep(0.02)
            assert answered == 5, round_
    assert worst < 0.5, f"a ping waited {worst:.2f} s behind the big requests"
    # 15 such requests held ~16 MB each when they leaked
    wait_for(lambda: rss(kernel.proc.pid) < before + 48 * MiB, 10, "the kernel to free the big requests")
