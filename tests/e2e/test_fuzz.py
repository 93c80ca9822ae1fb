"""A bounded, seeded fuzzer on the bus, run against a real kernel while a well-behaved client works.

Frames: random bytes, truncated and deeply nested MessagePack, wrong types, extreme numbers,
strings, arrays and maps near every bound (and just over), calls before ``hello``, bad user
names, multipart messages. Checked: every well-formed request (a map with an integer id) gets
exactly one final frame, no id gets two, the kernel stays alive and its RSS grows by less than
50 MB, and the well-behaved client's greedy generations stay exactly what they were.

The fuzzing connections use both transports: CURVE on the kernel's tcp listener as the ordinary user
"fuzzer" (its calls on the reference user's processes are refused, EPERM, as any other user's would be),
and ipc, where this process's uid makes them the admin; those send no call that acts on another user's
process or is the admin's alone (an admin may kill or reap the reference's processes, as root may on Unix).

``run_fuzz`` is shared with the soak (tests/soak/test_fuzz_soak.py: 100k frames).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import psutil
import pytest
import zmq
import zmq.auth

from llmos import Client
from llmos.syscalls import protocol
from llmos.syscalls.table import ADMIN, OWNER, SYSCALLS
from tests.conftest import KernelProc
from tests.e2e.test_bus import warm

# calls that would change the kernel for everyone (stop it, unload the model under the reference run)
UNSAFE = {"shutdown", "model_load", "model_unload"}
SAFE_NAMES = [s.name for s in SYSCALLS if s.name not in UNSAFE]
UNSAFE_NRS = {s.nr for s in SYSCALLS if s.name in UNSAFE}
# what an admin connection does not send: calls on a process (its owner's or the admin's) and the admin's own
NOT_AS_ADMIN = {s.name for s in SYSCALLS if s.access.who in (OWNER, ADMIN)} | UNSAFE
NOT_AS_ADMIN_NRS = {s.nr for s in SYSCALLS if s.name in NOT_AS_ADMIN}
REFERENCE_USER = "fuzz-reference"
FUZZ_USER = "fuzzer"
PIPELINE = 32  # most requests one fuzzing connection leaves unanswered before it reads
PROMPTS = ("The kernel", "once upon", "x = 1\n")
GREEDY = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 12}
EXTREME_INTS = [0, 1, -1, 2**31 - 1, -2**31, 2**32, 2**53 + 1, 2**63 - 1, -2**63, 2**64 - 1]
EXTREME_FLOATS = [0.0, -0.0, 1e-308, 5e-324, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 1e-38]


class Endpoint(NamedTuple):
    """Where a fuzzing connection goes and who the kernel will know it as."""

    address: str
    curve: tuple[str, str] | None = None  # (the kernel's public key file, the client's secret key file)
    admin: bool = False  # the kernel knows it as the admin: it keeps away from NOT_AS_ADMIN


@dataclass
class Peer:
    """One fuzzing connection and the ids it expects answers for."""

    sock: zmq.Socket
    admin: bool = False
    next_id: int = 1
    expected: dict[int, str] = field(default_factory=dict)  # id of a request not yet answered -> what it was
    used: set[int] = field(default_factory=set)
    finals: dict[int, int] = field(default_factory=dict)  # id -> final frames seen


@dataclass
class Report:
    frames: int = 0
    replies: int = 0
    finals_checked: int = 0
    seconds: float = 0.0
    rss_before: int = 0
    rss_peak: int = 0  # sampled while frames were in flight (ZeroMQ and the kernel hold the big ones)
    rss_after: int = 0
    reference_runs: int = 0
    errors: list[str] = field(default_factory=list)


class Fuzzer:
    def __init__(self, endpoints: list[Endpoint], model: str, seed: int) -> None:
        self.endpoints, self.model = endpoints, model
        self.rng = random.Random(seed)
        self.ctx = zmq.Context()
        self.peers: list[Peer] = []
        self.retired: list[Peer] = []
        self.report = Report()
        for i in range(3):
            self.new_peer(endpoints[i % len(endpoints)])  # every transport from the start

    # -- connections -------------------------------------------------------------------------
    def new_peer(self, endpoint: Endpoint | None = None) -> Peer:
        endpoint = endpoint or self.rng.choice(self.endpoints)
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, -1)
        if endpoint.curve is not None:
            s.curve_serverkey = zmq.auth.load_certificate(endpoint.curve[0])[0]
            s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(endpoint.curve[1])
        s.connect(endpoint.address)
        peer = Peer(s, admin=endpoint.admin)
        self.peers.append(peer)
        if len(self.peers) > 6:  # keep a few; an old one sends no more and is closed once answered
            self.retired.append(self.peers.pop(0))
        for old in list(self.retired):
            self.settle(old, 0)
            self.retire(old)
        return peer

    def settle(self, peer: Peer, most: int, patience_s: float = 30.0) -> None:
        """Read until at most ``most`` of ``peer``'s requests are unanswered (a client's pipeline depth)."""
        deadline = time.monotonic() + patience_s
        while len(peer.expected) > most and time.monotonic() < deadline:
            self.drain(peer, 50)
        if len(peer.expected) > most:
            self.report.errors.append(f"{len(peer.expected)} requests unanswered for {patience_s} s: "
                                      f"{list(peer.expected.values())[:3]}")
            peer.expected.clear()

    def retire(self, peer: Peer) -> None:
        self.report.finals_checked += sum(peer.finals.values())
        self.retired.remove(peer)
        peer.sock.close(0)

    def close(self) -> None:
        for p in self.peers + self.retired:
            p.sock.close(0)
        self.ctx.term()

    # -- values --------------------------------------------------------------------------------
    def text(self, n: int | None = None) -> str:
        r = self.rng
        n = r.choice([0, 1, 3, 10, 64, 300]) if n is None else n
        alphabet = r.choice(["abc xyz", "\u00e9\u4e2d\U0001F600", "\x00\n\t\\\"'{}", "<|im_end|>"])
        return "".join(r.choice(alphabet) for _ in range(n))

    def value(self, depth: int = 0):
        r = self.rng
        kind = r.randrange(11 if depth < 3 else 7)
        if kind == 0:
            return r.choice(EXTREME_INTS)
        if kind == 1:
            return r.choice(EXTREME_FLOATS)
        if kind == 2:
            return self.text()
        if kind == 3:
            return r.choice([None, True, False])
        if kind == 4:
            return bytes(r.randrange(256) for _ in range(r.choice([0, 5, 40])))
        if kind == 5:
            return r.randint(-5, 50)
        if kind == 6:
            return r.random() * 2
        if kind in (7, 8):
            return [self.value(depth + 1) for _ in range(r.randrange(5))]
        return {self.text(r.choice([1, 5])): self.value(depth + 1) for _ in range(r.randrange(4))}

    def call_name(self, admin: bool = False):
        r = self.rng
        c = r.randrange(10)
        if c < 6:
            name = r.choice(SAFE_NAMES)
            return "ping" if admin and name in NOT_AS_ADMIN else name
        if c < 8:
            n = r.choice([r.randrange(-3, 30), r.choice(EXTREME_INTS)])
            return 1 if n in (NOT_AS_ADMIN_NRS if admin else UNSAFE_NRS) else n
        return r.choice([self.text(), None, 1.5, True, [1], {"a": 1}, b"spawn"])

    def args_for(self, name) -> dict:
        r = self.rng
        spec = next((s for s in SYSCALLS if s.name == name), None)
        args: dict = {}
        if spec is not None:
            for f in spec.request:
                if r.random() < 0.5:
                    args[f.name] = self.plausible(f) if r.random() < 0.6 else self.value()
        if r.random() < 0.1:
            args[self.text(r.choice([1, 8]))] = self.value()
        if name == "spawn":  # keep what the model does small and fair: every process ends within seconds
            args["model"] = self.model if r.random() < 0.7 else self.text()
            args["max_new_tokens"] = r.randint(1, 6)
            if isinstance(args.get("priority"), int):  # a nice-19 process may wait behind every later spawn
                args["priority"] = 0
        if name == "dmesg" and args.get("follow") is True:  # a follow streams until its client goes: no final frame
            args["follow"] = False
        return args  # a hello naming anyone but the connection's own user is EPERM: fuzzed, not avoided

    def plausible(self, f):
        r = self.rng
        t = f.type
        if f.choices:
            return r.choice(list(f.choices))
        if t == "int":
            lo = int(f.min) if f.min is not None else -5
            hi = int(f.max) if f.max is not None and f.max < 1000 else 1000
            return r.randint(lo - 1, hi + 1)
        if t == "float":
            return r.choice([0.0, 0.5, 1.0, -1.0, 2, 1e-9, 150.0])
        if t == "bool":
            return r.random() < 0.5
        if t == "str":
            if f.name == "user":
                return r.choice(["alice", "bob_2", "x@y", "bad name", "", "-x", "u" * 65, "f" + self.text(3), "root",
                                 REFERENCE_USER, FUZZ_USER])
            return self.text()
        if t == "list[int]":
            return [r.randrange(300) for _ in range(r.choice([0, 1, 3, 20]))]
        if t == "list[str]":
            return [self.text() for _ in range(r.choice([0, 1, 2, 17]))]
        if t == "list[map]":
            return [{"role": r.choice(["user", "system", "x"]), "content": self.text()}
                    for _ in range(r.choice([0, 1, 2]))]
        return self.value()

    # -- frames --------------------------------------------------------------------------------
    def fresh_id(self, peer: Peer) -> int:
        r = self.rng
        while True:
            if r.random() < 0.05:
                rid = r.choice(EXTREME_INTS + [peer.next_id * 1_000_003])
            else:
                rid = peer.next_id
                peer.next_id += 1
            if rid not in peer.used:
                peer.used.add(rid)
                return rid

    def request(self, peer: Peer) -> tuple[list[bytes], int | None]:
        """One message to send, and the id whose one final frame is owed (None: none is)."""
        r = self.rng
        rid = self.fresh_id(peer)
        k = r.randrange(100)
        if k < 6:  # random bytes
            return [bytes(r.randrange(256) for _ in range(r.randrange(300)))], None
        if k < 14:  # truncated request: the id may still be readable, but no answer is owed
            whole = msgpack.packb({"id": rid, "v": 1, "call": self.call_name(peer.admin),
                                   "args": self.args_for("ping")}, use_bin_type=True)
            return [whole[: r.randrange(max(1, len(whole)))]], None
        if k < 18:  # nested deeper than the unpacker goes, or just within
            depth = r.choice([10, 500, 1023, 1100, 5000])
            head = r.choice([b"\x91", b"\x81\xa1a"])
            return [head * depth + b"\x00"], None
        if k < 21:  # several frames in one message
            return [msgpack.packb({"v": 1, "id": rid, "call": "ping", "args": {}}), b"more"], rid
        if k < 22:  # near a bound: just within or just over
            return [self.near_bound(rid)], rid
        envelope: dict = {"v": 1, "id": rid}
        name = self.call_name(peer.admin)
        envelope["call"] = name
        envelope["args"] = self.args_for(name) if r.random() < 0.9 else self.value()
        if r.random() < 0.05:
            envelope["v"] = r.choice([0, 2, "1", None, 1.0])
        if r.random() < 0.03:
            del envelope["call"]
        if r.random() < 0.03:
            envelope[self.text(4)] = self.value()
        try:
            data = msgpack.packb(envelope, use_bin_type=True)
        except (ValueError, OverflowError):
            return [b"\xc1"], None
        return [data], rid

    def near_bound(self, rid: int) -> bytes:
        r = self.rng
        d = r.choice([-1, 0, 1])
        which = r.randrange(4)
        name = r.choice(["ping", "spawn", "stat", "hello", "kill"])
        if which == 0:
            big = "s" * (protocol.MAX_STR_BYTES + d)
            args = {"prompt": big} if name == "spawn" else {"pad": big}
        elif which == 1:
            args = {"prompt_ids": [7] * (protocol.MAX_ARRAY_LEN + d)}
        elif which == 2:
            args = {str(i): 0 for i in range(protocol.MAX_MAP_LEN + d)}
        else:
            args = {"a": b"x" * (protocol.MAX_STR_BYTES - 100), "b": b"y" * (protocol.MAX_STR_BYTES - 100),
                    "c": b"z" * (r.choice([0, 300]) + d)}
        if name == "spawn":
            args["model"] = "/nonexistent/model"  # nothing big ever reaches a worker from here
        return msgpack.packb({"v": 1, "id": rid, "call": name, "args": args}, use_bin_type=True)

    # -- replies -------------------------------------------------------------------------------
    def drain(self, peer: Peer, timeout_ms: int = 0) -> None:
        while peer.sock.poll(timeout_ms):
            timeout_ms = 0
            raw = peer.sock.recv()
            self.report.replies += 1
            f = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if f.get("t") in ("ok", "err"):
                rid = f.get("id")
                if rid is None:
                    continue
                peer.finals[rid] = peer.finals.get(rid, 0) + 1
                if rid not in peer.used:
                    self.report.errors.append(f"a final frame for id {rid} that was never sent")
                elif peer.finals[rid] > 1:
                    self.report.errors.append(f"id {rid} got {peer.finals[rid]} final frames")
                peer.expected.pop(rid, None)
            elif f.get("t") == "bye":
                self.report.errors.append("the kernel said bye")

    def step(self) -> None:
        r = self.rng
        if r.random() < 0.01:
            self.new_peer()  # its first calls come before any hello
        peer = r.choice(self.peers)
        frames, owed = self.request(peer)
        peer.sock.send_multipart(frames)
        self.report.frames += 1
        if owed is not None:
            peer.expected[owed] = (f"<{len(frames[0])} bytes>" if len(frames[0]) > 100_000 else
                                   repr(msgpack.unpackb(frames[0], raw=False, strict_map_key=False))[:300])
        self.drain(peer)
        if len(peer.expected) > PIPELINE:
            self.settle(peer, PIPELINE // 2)

    def finish(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        everyone = self.peers + self.retired
        while time.monotonic() < deadline and any(p.expected for p in everyone):
            for p in everyone:
                self.drain(p, 20)
        for p in everyone:
            self.drain(p, 50)
            if p in self.retired:
                self.retire(p)
            else:
                self.report.finals_checked += sum(p.finals.values())
            if p.expected:
                self.report.errors.append(f"{len(p.expected)} well-formed requests got no final frame, "
                                          f"e.g. {list(p.expected.values())[:3]}")


def reference(client: Client, model: str) -> list[list[int]]:
    return [client.wait(client.spawn(prompt=p, model=model, **GREEDY)).token_ids for p in PROMPTS]


def run_fuzz(kernel: KernelProc, model: str, frames: int, seed: int, progress: bool = False) -> Report:
    """Fuzz ``kernel`` (a KernelProc(tcp=True)) with ``frames`` messages while a well-behaved client, another
    user than the fuzzer, checks its generations."""
    proc = psutil.Process(kernel.proc.pid)
    warm(kernel, model)
    with kernel.client_as(REFERENCE_USER) as good:
        expected = reference(good, model)
        endpoints = [Endpoint(kernel.tcp, kernel._keys_of(FUZZ_USER)), Endpoint(kernel.address, admin=True)]
        fuzzer = Fuzzer(endpoints, model, seed)
        stop = threading.Event()
        runs: list[bool] = []

        report = fuzzer.report

        def behave() -> None:
            try:
                with kernel.client_as(REFERENCE_USER) as c:
                    while not stop.is_set():
                        runs.append(reference(c, model) == expected)
            except Exception as exc:  # reported, not lost in the thread
                report.errors.append(f"the well-behaved client failed: {exc!r}")

        report.rss_before = proc.memory_info().rss
        t0 = time.monotonic()
        worker = threading.Thread(target=behave, daemon=True)
        worker.start()
        try:
            for i in range(frames):
                fuzzer.step()
                if i % 500 == 0:
                    report.rss_peak = max(report.rss_peak, proc.memory_info().rss)
                if progress and i % 10_000 == 0:
                    print(f"{i} frames, {time.monotonic() - t0:.0f} s, rss {proc.memory_info().rss >> 20} MiB",
                          flush=True)
            fuzzer.finish(60)
            # the well-behaved client's runs overlap the fuzz; on a loaded machine one run can outlast a short
            # fuzz: let it finish a second run (the fuzzer's last requests are still draining meanwhile)
            deadline = time.monotonic() + 60
            while len(runs) < 2 and not report.errors and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join(120)
            fuzzer.close()
        report.seconds = time.monotonic() - t0
        assert kernel.proc.poll() is None, "the kernel died"
        assert good.ping()["time"]
        report.rss_after = proc.memory_info().rss
        report.reference_runs = len(runs)
        if not all(runs):
            report.errors.append(f"{runs.count(False)} of {len(runs)} reference runs differed")
    return report


@pytest.mark.slow  # a private kernel and 1,200 frames: ~25 s; the soak step runs 100,000
def test_the_bus_survives_a_seeded_fuzz_and_answers_every_well_formed_request_once(tiny_model):
    k = KernelProc(extra=["--zombie-ttl", "30", "--max-zombies", "8"], tcp=True)
    try:
        report = run_fuzz(k, tiny_model, frames=1200, seed=7)  # the soak step runs 100,000
    finally:
        k.stop()
    assert report.errors == []
    assert report.finals_checked > 850 and report.reference_runs >= 2
    assert report.rss_after - report.rss_before < 50 * 2**20, report
    assert k.proc.returncode == 0, k.logs()
