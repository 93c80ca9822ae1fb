"""tcp with CURVE: an authorised key is its user, an unknown key, a wrong kernel key and a plain client are
refused at the handshake, a withdrawn key stops working at once, and the traffic is encrypted (a
man-in-the-middle relay reads no prompt; the same relay in front of an --insecure kernel does)."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import uuid

import msgpack
import pytest
import zmq
import zmq.auth

from llmos.client import Client
from llmos.syscalls.errors import NotPermitted, ProtocolError
from tests.conftest import KernelProc, free_port


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def kernel_key(kernel: KernelProc) -> str:
    return str(kernel.home / "keys" / "kernel.key")


def stranger_key(tmp_path) -> str:
    """A key pair nobody authorised."""
    _, secret = zmq.auth.create_certificates(tmp_path, "stranger")
    return str(secret)


def raw_curve(kernel: KernelProc, user: str, routing_id: bytes | None = None, address: str | None = None):
    """A plain ZeroMQ DEALER that is ``user`` to the kernel by its CURVE key (as any language's client would be)."""
    server, secret = kernel._keys_of(user)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey = zmq.auth.load_certificate(server)[0]
    s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(secret)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.connect(address or kernel.tcp)
    return ctx, s


def send(s, rid: int, call: str, **args) -> None:
    s.send(msgpack.packb({"v": 1, "id": rid, "call": call, "args": args}))


def recv(s, timeout: float = 30.0) -> dict | None:
    return msgpack.unpackb(s.recv()) if s.poll(int(timeout * 1000)) else None


def test_an_authorised_key_is_its_user_and_runs_processes(kernel, tiny_model):
    name = unique("carol")
    with kernel.client_as(name) as carol:
        assert (carol.kernel["user"], carol.kernel["transport"], carol.kernel["admin"]) == (name, "curve", False)
        pid = carol.spawn("over curve", model=tiny_model, max_new_tokens=3, temperature=0)
        assert carol.stat(pid).owner == name
        assert carol.wait(pid).finish_reason == "length"


def test_an_unknown_key_is_refused_at_the_handshake(kernel, tmp_path):
    with pytest.raises(NotPermitted, match="refused this client's key"):
        Client(kernel.tcp, server_key=kernel_key(kernel), client_key=stranger_key(tmp_path), connect_timeout=10)


def test_a_client_with_the_wrong_kernel_key_is_refused(kernel, tmp_path):
    _, secret = kernel._keys_of(unique("dora"))
    other_kernel, _ = zmq.auth.create_certificates(tmp_path, "impostor")
    with pytest.raises(ProtocolError, match="not that kernel's"):
        Client(kernel.tcp, server_key=str(other_kernel), client_key=secret, connect_timeout=10)


def test_a_plain_client_is_refused_and_gets_nothing(kernel):
    with pytest.raises(ProtocolError, match="disagree on encryption"):
        Client(kernel.tcp, insecure=True, connect_timeout=10)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(kernel.tcp)
    try:
        send(s, 1, "ping")
        assert recv(s, timeout=2) is None  # no handshake, no reply
    finally:
        s.close()
        ctx.term()
    with kernel.client() as c:
        assert c.ping()["pid"] == kernel.proc.pid  # still serving everyone


def test_a_withdrawn_key_stops_working_at_once_even_on_an_open_connection(kernel):
    name = unique("eve")
    c = kernel.client_as(name)
    try:
        assert c.ping()
        with kernel.client() as admin:
            assert admin.user_remove(name) == 1
        with pytest.raises(NotPermitted, match="no longer authorised"):
            c.ps()
    finally:
        c.close()


def test_a_routing_id_the_client_chose_is_refused_so_no_one_can_take_over_anothers(kernel):
    """Regression (reported): a client may set ZMQ_ROUTING_ID; a later connection of another user under the same
    id received the first one's pending replies, and could continue its upload. The kernel serves only the ids
    ZeroMQ assigns."""
    for chosen in (b"shared-id", b"\x01abcd", b"\x00toolong"):
        ctx, s = raw_curve(kernel, unique("dave"), routing_id=chosen)
        try:
            send(s, 1, "ping")
            r = recv(s)
            assert (r["t"], r["error"]) == ("err", "EPROTO") and "ZMQ_ROUTING_ID" in r["message"], chosen
        finally:
            s.close()
            ctx.term()
    ctx, s = raw_curve(kernel, unique("erin"))  # an id ZeroMQ assigns: served
    try:
        send(s, 1, "ping")
        assert recv(s)["t"] == "ok"
    finally:
        s.close()
        ctx.term()


def test_an_upload_is_continued_only_by_its_users_connection(kernel):
    """An upload id is a small number: another user's connection naming it is refused, whatever it sends."""
    alice, bob = unique("alice"), unique("bob")
    with kernel.client_as(alice) as a, kernel.client_as(bob) as b:
        up = a.call("fs_put", {"path": f"/data/{alice}.txt", "data": b"alice's ", "last": False})["upload"]
        with pytest.raises(NotPermitted):
            b.call("fs_put", {"path": f"/data/{alice}.txt", "upload": up, "data": b"FORGED", "last": True})
        a.call("fs_put", {"path": f"/data/{alice}.txt", "upload": up, "data": b"own", "last": True})
        assert a.fs.get(f"/data/{alice}.txt") == b"alice's own"
        a.fs.rm(f"/data/{alice}.txt")


class Relay:
    """A man in the middle: a tcp relay that keeps every byte it passes, both ways."""

    def __init__(self, target: str) -> None:
        host, _, port = target[len("tcp://"):].rpartition(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.seen = bytearray()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.server.settimeout(0.2)
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop:
            try:
                a, _ = self.server.accept()
                b = socket.create_connection(self.target)
                pairs[a], pairs[b] = b, a
            except (TimeoutError, socket.timeout):
                pass
            if not pairs:
                continue
            readable, _, _ = select.select(list(pairs), [], [], 0.05)
            for r in readable:
                try:
                    data = r.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    other = pairs.pop(r, None)
                    if other is not None:
                        pairs.pop(other, None)
                        other.close()
                    r.close()
                    continue
                self.seen += data
                pairs[r].sendall(data)
        for s in pairs:
            s.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.server.close()


SECRET = "purple-elephant-prompt-7361"


def test_the_traffic_is_encrypted_a_relay_in_the_middle_reads_no_prompt(kernel, tiny_model):
    relay = Relay(kernel.tcp)
    name = unique("frank")
    server, secret = kernel._keys_of(name)
    try:
        with Client(relay.address, server_key=server, client_key=secret) as c:
            result = c.wait(c.spawn(SECRET, model=tiny_model, max_new_tokens=8, temperature=0, ignore_eos=True))
            assert c.user == name and len(result.token_ids) == 8
        assert len(relay.seen) > 1000  # the whole conversation went through the relay
        assert SECRET.encode() not in relay.seen and tiny_model.encode() not in relay.seen
        assert b"spawn" not in relay.seen and name.encode() not in relay.seen
    finally:
        relay.close()


def test_the_same_relay_reads_everything_in_front_of_an_insecure_kernel():
    """The control: the relay does see plaintext, so the test above can fail."""
    port = free_port()
    k = KernelProc(extra=["--insecure", "--listen", f"tcp://127.0.0.1:{port}"])
    relay = Relay(f"tcp://127.0.0.1:{port}")
    try:
        with Client(relay.address, insecure=True) as c:
            assert (c.kernel["user"], c.kernel["transport"]) == ("anonymous", "insecure")
            with pytest.raises(Exception):
                c.spawn(SECRET, model="/no/such/model")
        assert SECRET.encode() in relay.seen and b"spawn" in relay.seen
    finally:
        relay.close()
        k.stop()


def test_insecure_is_refused_off_the_loopback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmos.kernel.main", "--home", str(tmp_path / "h"), "--insecure",
                        "--listen", f"tcp://0.0.0.0:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--insecure serves loopback addresses only" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_async_client_speaks_curve_too(kernel, tiny_model, tmp_path):
    import asyncio

    from llmos import AsyncClient

    name = unique("gina")
    server, secret = kernel._keys_of(name)

    async def main() -> tuple[str, str]:
        async with AsyncClient(kernel.tcp, server_key=server, client_key=secret) as c:
            result = await c.wait(await c.spawn("async curve", model=tiny_model, max_new_tokens=2, temperature=0))
            who = c.user
        try:
            await AsyncClient(kernel.tcp, server_key=server, client_key=stranger_key(tmp_path)).connect(timeout=10)
            refused = "connected"
        except NotPermitted:
            refused = "EPERM"
        return f"{who} {result.finish_reason}", refused

    assert asyncio.run(main()) == (f"{name} length", "EPERM")


@pytest.mark.slow  # starts, loads or kills kernels for 6-25 s: the slow step of .ci/run
def test_a_caller_that_goes_away_while_its_model_loads_does_not_hang_the_load_for_everyone(kernel, long_model,
                                                                                        tmp_path):
    """Regression (reported): a spawn cancelled while its model loaded (its client gone: the bus cancels that
    connection's calls when a send to it fails) cancelled the load's futures, which every caller shares: every
    later spawn on that model waited forever, for every user."""
    from tests.tinymodel import make_tiny_llama

    model = str(make_tiny_llama(tmp_path / "fresh", seed=11))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(kernel.address)
    send(s, 1, "spawn", prompt="busy", model=long_model, max_new_tokens=100000, ignore_eos=True)
    busy = recv(s)["result"]["pid"]
    send(s, 2, "stream", pid=busy)  # chunks keep coming: a send to this connection soon finds it gone
    assert recv(s)["t"] == "chunk"
    send(s, 3, "spawn", prompt="x", model=model, max_new_tokens=1)  # starts loading the fresh model
    s.close()
    ctx.term()
    try:
        with kernel.client() as c:
            pid = c.call("spawn", {"prompt": "y", "model": model, "max_new_tokens": 1, "temperature": 0.0},
                         timeout=120)["pid"]
            assert c.wait(pid, timeout=120).finish_reason == "length"
    finally:
        with kernel.client() as c:
            c.kill(busy, "KILL")
            c.wait(busy)
            c.model_unload(model, force=True)
