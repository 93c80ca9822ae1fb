"""The bus's table of connections, without a kernel: who a connection is comes from each message's proof, a
routing id reused by another user starts afresh, and idle connections are forgotten in bulk."""

import asyncio

import pytest
import zmq
import zmq.asyncio

from llmos.kernel import bus as busmod
from llmos.kernel.bus import Bus, Listener, _Client
from llmos.kernel.handlers import Caller
from llmos.kernel.identity import CURVE, IPC, Keyring


class Handlers:
    audit = None


@pytest.fixture
def buses():
    made: list[Bus] = []
    yield made
    for b in made:
        for s in b.socks:
            s.close(0)


@pytest.fixture
def make_bus(buses, tmp_path):
    def make(listener: Listener | None = None, **kwargs) -> Bus:
        b = Bus(zmq.asyncio.Context.instance(), [listener or Listener(f"ipc://{tmp_path}/k.sock", IPC)], Handlers(),
                admins=frozenset({"root"}), **kwargs)
        buses.append(b)
        return b

    return make


def test_a_peer_address_is_its_uids_account_and_root_is_the_admin(make_bus):
    b = make_bus()
    root = b.identify(0, b"\x00id", "localhost:0:0:4242")
    assert (root.user, root.admin, root.transport) == ("root", True, IPC)
    other = b.identify(0, b"\x00id", "localhost:4000000000:0:4242")
    assert (other.user, other.admin) == ("4000000000", False)  # a uid with no account: its digits, not the admin
    assert b.identify(0, b"\x00id", "").user == "anonymous"


def test_idle_connections_are_forgotten_in_bulk_and_busy_ones_kept(make_bus, monkeypatch):
    monkeypatch.setattr(busmod, "IDLE_CLIENTS", 8)
    b = make_bus()
    b._prune_at = 8
    busy = _Client(b, Caller(b"\x00busy", "alice", False, IPC), "p")
    busy.tasks.add(asyncio.Future(loop=asyncio.new_event_loop()))
    b.clients[b"\x00busy"] = busy
    for i in range(20):
        b.clients[b"\x00%d" % i] = _Client(b, Caller(b"\x00%d" % i, "bob", False, IPC), "p")
    b._prune()
    assert list(b.clients) == [b"\x00busy"] and b._prune_at == 8


def test_a_curve_connection_whose_key_is_withdrawn_is_no_one(make_bus, tmp_path):
    carol, other = (zmq.curve_keypair()[0].decode() for _ in range(2))
    ring = Keyring(tmp_path / "authorized")
    ring.add("carol", carol)
    b = make_bus(Listener("tcp://127.0.0.1:1", CURVE, b"p" * 40, b"s" * 40), keyring=ring)
    assert b.identify(0, b"\x00id", carol).user == "carol"
    assert b.identify(0, b"\x00id", other) is None and b.identify(0, b"\x00id", "") is None
    ring.remove("carol")
    assert b.identify(0, b"\x00id", carol) is None
