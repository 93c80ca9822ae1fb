"""Identity from the transport (kernel/identity.py): the peer's uid over a real ipc socket, nothing over plain
tcp, the CURVE key over a real CURVE handshake with the keyring's ZAP handler, account names, and the
keyring directory (add, entries, remove, hand edits, broken files)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from llmos.kernel import identity
from llmos.kernel.identity import CURVE, IPC, ZAP_DOMAIN, KeyAuthenticator, Keyring, account_name, proof, uid_in
from llmos.syscalls.errors import Errno, Exists, InvalidArgument, NotFound
from llmos.syscalls.keys import fingerprint, read_key_pair, read_public_key, write_public_key


@pytest.fixture
def tmp():
    d = Path(tempfile.mkdtemp(prefix="llmos-id-", dir="/tmp"))  # short: ipc paths are bounded
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def certs(tmp):
    """A function: ``certs(name)`` -> (public file, secret file, public Z85 text) of a fresh CURVE key pair."""
    def make(name: str) -> tuple[Path, Path, str]:
        (tmp / "certs").mkdir(exist_ok=True)
        public, secret = zmq.auth.create_certificates(tmp / "certs", name)
        return Path(public), Path(secret), read_public_key(public).decode("ascii")
    return make


def _first_message(router: zmq.Socket, dealer: zmq.Socket) -> list[zmq.Frame]:
    dealer.send(b"hello")
    assert router.poll(5000), "no message within 5 s"
    return router.recv_multipart(copy=False)


# -- the transport --------------------------------------------------------------------------------------
def test_the_ipc_proof_holds_the_sending_processs_uid_and_no_curve_key(tmp):
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(f"ipc://{tmp}/s.sock")
        dealer.connect(f"ipc://{tmp}/s.sock")
        frames = _first_message(router, dealer)
        assert [uid_in(proof(f, IPC)) for f in frames] == [os.getuid()] * len(frames)
        assert not proof(frames[-1], CURVE)  # no CURVE on ipc: no key claimed
    finally:
        dealer.close(0), router.close(0), ctx.term()


def test_a_plain_tcp_frame_proves_neither_a_uid_nor_a_curve_key():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        frames = _first_message(router, dealer)
        assert [(uid_in(proof(f, IPC)), proof(f, CURVE)) for f in frames] == [(None, "")] * len(frames)
    finally:
        dealer.close(0), router.close(0), ctx.term()


def test_over_curve_the_zap_handler_lets_in_an_authorised_key_whose_frames_carry_it_and_refuses_others(tmp, certs):
    server_public, server_secret = read_key_pair(certs("kernel")[1])
    _, alice_secret, alice = certs("alice")
    _, eve_secret, eve = certs("eve")
    keyring = Keyring(tmp / "authorized")
    keyring.add("alice", alice)
    refused: list[str] = []

    async def scenario() -> tuple[list[zmq.Frame], bool]:
        ctx = zmq.asyncio.Context()
        auth = KeyAuthenticator(ctx, keyring, on_refused=refused.append)
        auth.start()
        server = ctx.socket(zmq.ROUTER)
        server.curve_secretkey, server.curve_publickey, server.curve_server = server_secret, server_public, True
        server.zap_domain = ZAP_DOMAIN.encode()
        port = server.bind_to_random_port("tcp://127.0.0.1")
        clients = []
        try:
            for secret in (eve_secret, alice_secret):
                public_key, secret_key = read_key_pair(secret)
                c = ctx.socket(zmq.DEALER)
                c.curve_serverkey, c.curve_publickey, c.curve_secretkey = server_public, public_key, secret_key
                c.connect(f"tcp://127.0.0.1:{port}")
                await c.send(b"hello")
                clients.append(c)
            frames = await asyncio.wait_for(server.recv_multipart(copy=False), 5)
            # eve's handshake was refused: nothing else arrives (alice's message was the only one)
            more = await server.poll(200)
            return frames, bool(more)
        finally:
            for c in clients:
                c.close(0)
            server.close(0)
            auth.stop()
            ctx.term()

    frames, more = asyncio.run(scenario())
    assert not more
    assert proof(frames[-1], CURVE) == alice and keyring.user_of(proof(frames[-1], CURVE)) == "alice"
    assert uid_in(proof(frames[-1], IPC)) is None  # tcp: no uid to trust
    assert refused and set(refused) == {fingerprint(eve.encode())}


def test_account_name_is_the_accounts_name_or_the_uid_in_digits():
    assert account_name(0) == "root"
    assert account_name(4_000_000_000) == "4000000000"


# -- the keyring ----------------------------------------------------------------------------------------
def test_a_key_added_stands_for_its_user_and_is_listed_with_its_fingerprint(tmp, certs):
    public_file, _, alice = certs("alice")
    _, _, bob = certs("bob")
    ring = Keyring(tmp / "authorized")
    assert ring.entries() == [] and ring.user_of(alice) is None  # no directory yet: nobody
    with pytest.raises(InvalidArgument):  # a path is never read on the kernel's machine: the key's text only
        ring.add("alice", str(public_file))
    entry = ring.add("alice", alice)
    assert (entry.user, entry.key, entry.fingerprint) == ("alice", alice, fingerprint(alice.encode()))
    assert entry.path == tmp / "authorized" / f"alice.{entry.fingerprint}.key"
    ring.add("bob", bob)
    assert ring.user_of(alice) == "alice" and ring.user_of(bob) == "bob"
    assert [(e.user, e.key) for e in ring.entries()] == [("alice", alice), ("bob", bob)]
    wire = ring.entries()[0].to_wire()
    assert set(wire) == {"user", "key", "fingerprint", "added"} and wire["added"] > 0
    # what was written is read by a keyring that starts afresh (the kernel restarted)
    assert Keyring(tmp / "authorized").user_of(bob) == "bob"


def test_a_key_already_authorised_is_eexist_even_for_another_user(tmp, certs):
    public_file, secret_file, alice = certs("alice")
    ring = Keyring(tmp / "authorized")
    ring.add("alice", alice)
    for user, key in (("alice", alice), ("mallory", alice)):
        with pytest.raises(Exists) as exc:
            ring.add(user, key)
        assert exc.value.errno == Errno.EEXIST and "alice" in exc.value.message
    assert ring.user_of(alice) == "alice" and len(ring.entries()) == 1


def test_a_key_that_is_neither_a_certificate_nor_z85_is_einval(tmp):
    ring = Keyring(tmp / "authorized")
    with pytest.raises(InvalidArgument):
        ring.add("alice", "not-a-key")
    assert ring.entries() == []


def test_remove_withdraws_one_key_or_all_of_a_users_and_enoent_for_what_is_not_there(tmp, certs):
    _, _, k1 = certs("a1")
    _, _, k2 = certs("a2")
    _, _, k3 = certs("a3")
    ring = Keyring(tmp / "authorized")
    ring.add("alice", k1), ring.add("alice", k2), ring.add("bob", k3)
    with pytest.raises(NotFound) as exc:
        ring.remove("carol")
    assert exc.value.errno == Errno.ENOENT
    with pytest.raises(NotFound):
        ring.remove("bob", k1)  # alice's key, not bob's
    assert ring.remove("alice", fingerprint(k1.encode())) == 1  # by fingerprint
    assert ring.user_of(k1) is None and ring.user_of(k2) == "alice"
    assert ring.remove("alice") == 1
    assert [e.user for e in ring.entries()] == ["bob"]
    assert sorted(p.name for p in (tmp / "authorized").iterdir()) == [f"bob.{fingerprint(k3.encode())}.key"]
    with pytest.raises(NotFound):
        ring.remove("alice")


def test_a_broken_or_stray_file_in_the_directory_authorises_nobody_and_spoils_no_other_key(tmp, certs):
    _, _, alice = certs("alice")
    _, _, bob = certs("bob")
    ring = Keyring(tmp / "authorized")
    ring.add("alice", alice)
    # named to sort before alice's: a bad file must not end the reading of the rest
    (tmp / "authorized" / "aaron.0123456789abcdef.key").write_text("public-key = \"short\"\n")
    (tmp / "authorized" / "abe.fedcba9876543210.key").write_bytes(os.urandom(200))
    write_public_key(tmp / "authorized" / "nouser.key", bob.encode(), "no user in the name")
    assert [e.user for e in ring.entries()] == ["alice"]
    assert ring.user_of(alice) == "alice" and ring.user_of(bob) is None


def test_a_key_file_removed_by_hand_stops_working_at_the_next_reload(tmp, certs, monkeypatch):
    monkeypatch.setattr(identity, "RELOAD_S", 0.0)
    _, _, alice = certs("alice")
    ring = Keyring(tmp / "authorized")
    entry = ring.add("alice", alice)
    assert ring.user_of(alice) == "alice"
    entry.path.unlink()
    assert ring.user_of(alice) is None


def test_a_key_file_added_by_hand_works_at_the_next_reload(tmp, certs, monkeypatch):
    monkeypatch.setattr(identity, "RELOAD_S", 0.0)
    public_file, _, alice = certs("alice")
    ring = Keyring(tmp / "authorized")
    assert ring.user_of(alice) is None
    (tmp / "authorized").mkdir()
    shutil.copy(public_file, tmp / "authorized" / f"alice.{fingerprint(alice.encode())}.key")
    assert ring.user_of(alice) == "alice"


def test_a_key_file_rewritten_in_place_by_hand_stands_for_the_new_key_only(tmp, certs, monkeypatch):
    """An admin who replaces the key inside a file (``cat new.key > authorized/alice.FP.key``) withdraws the
    old key: writing into a file leaves the directory's mtime as it was, so a cache keyed on it alone misses it."""
    monkeypatch.setattr(identity, "RELOAD_S", 0.0)
    _, _, old = certs("old")
    _, _, new = certs("new")
    ring = Keyring(tmp / "authorized")
    entry = ring.add("alice", old)
    assert ring.user_of(old) == "alice"
    write_public_key(entry.path, new.encode(), "rewritten by hand")
    assert ring.user_of(old) is None
    assert ring.user_of(new) == "alice"


def test_between_reloads_the_keyring_answers_from_memory(tmp, certs, monkeypatch):
    monkeypatch.setattr(identity, "RELOAD_S", 3600.0)
    _, _, alice = certs("alice")
    ring = Keyring(tmp / "authorized")
    entry = ring.add("alice", alice)
    entry.path.unlink()
    assert ring.user_of(alice) == "alice"  # RELOAD_S not passed: no directory read per message
    assert ring.entries() == []  # a listing always rereads
    assert ring.user_of(alice) is None
