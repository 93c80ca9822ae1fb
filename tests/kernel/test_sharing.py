"""Sharing a kernel (kernel/sharing.py): how each address is served, the keys made on a start, and a real
ipc socket opened to a real OS group (made for the test with groupadd)."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import zmq

from llmos.kernel.config import KernelConfig
from llmos.kernel.identity import CURVE, INSECURE, IPC, account_name
from llmos.kernel.sharing import ensure_keys, listen_plan, share_socket
from llmos.syscalls.errors import InvalidArgument
from llmos.syscalls.keys import authorized_dir, keys_dir, read_key_pair, read_public_key


@pytest.fixture
def home():
    d = Path(tempfile.mkdtemp(prefix="llmos-share-", dir="/tmp"))  # 0700, short: ipc paths are bounded
    yield d
    shutil.rmtree(d, ignore_errors=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- listen_plan ----------------------------------------------------------------------------------------
def test_ipc_is_served_as_ipc_and_tcp_with_curve_unless_insecure():
    plan = listen_plan("ipc:///tmp/k/run/kernel.sock",
                       KernelConfig(listen="tcp://127.0.0.1:5556, tcp://0.0.0.0:5557,tcp://*:5558,ipc:///tmp/k2.sock"))
    assert plan == [("ipc:///tmp/k/run/kernel.sock", IPC), ("tcp://127.0.0.1:5556", CURVE),
                    ("tcp://0.0.0.0:5557", CURVE), ("tcp://*:5558", CURVE), ("ipc:///tmp/k2.sock", IPC)]
    assert listen_plan("tcp://gpu-box.lan:5556", KernelConfig()) == [("tcp://gpu-box.lan:5556", CURVE)]


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5556", "tcp://127.0.0.53:5556", "tcp://localhost:5556",
                                     "tcp://[::1]:5556"])
def test_insecure_tcp_is_allowed_on_loopback_addresses(address):
    config = KernelConfig(listen=address, insecure=True)
    assert listen_plan("ipc:///tmp/k.sock", config) == [("ipc:///tmp/k.sock", IPC), (address, INSECURE)]
    assert listen_plan(address, KernelConfig(insecure=True)) == [(address, INSECURE)]


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://gpu-box.lan:5556",
                                     "tcp://192.168.1.20:5556", "tcp://[::]:5556", "tcp://localhost.evil.com:5556",
                                     "tcp://127.evil.com:5556"])
def test_insecure_tcp_on_any_other_address_is_einval_naming_insecure(address):
    for given, config in ((address, KernelConfig(insecure=True)),
                          ("ipc:///tmp/k.sock", KernelConfig(listen=address, insecure=True))):
        with pytest.raises(InvalidArgument) as exc:
            listen_plan(given, config)
        assert "--insecure" in exc.value.message and address in exc.value.message


def test_the_same_address_given_twice_is_refused():
    with pytest.raises(InvalidArgument, match="given twice"):
        listen_plan("tcp://127.0.0.1:5556", KernelConfig(listen="tcp://127.0.0.1:5556"))
    with pytest.raises(InvalidArgument, match="given twice"):
        listen_plan("ipc:///tmp/k.sock", KernelConfig(listen="tcp://127.0.0.1:5556,tcp://127.0.0.1:5556"))


def test_a_malformed_address_is_einval_naming_its_flag():
    with pytest.raises(InvalidArgument, match="--address"):
        listen_plan("tcp://127.0.0.1", KernelConfig())
    with pytest.raises(ValueError, match="--listen"):  # the config's own check, before any plan
        KernelConfig(listen="tcp://127.0.0.1")


# -- ensure_keys ----------------------------------------------------------------------------------------
def test_the_first_start_makes_the_kernels_key_pair_and_authorises_the_owners_client_key(home):
    public, secret, keyring = ensure_keys(home, "alice")
    keys = keys_dir(home)
    assert read_key_pair(keys / "kernel.key_secret") == (public, secret)
    assert read_public_key(keys / "kernel.key") == public
    for f in ("kernel.key_secret", "client.key_secret"):
        assert mode(keys / f) == 0o600, f
    assert mode(keys) == 0o700 and mode(authorized_dir(home)) == 0o700
    client_public, _ = read_key_pair(keys / "client.key_secret")
    assert [(e.user, e.key) for e in keyring.entries()] == [("alice", client_public.decode())]
    assert keyring.user_of(client_public.decode()) == "alice"


def test_a_second_start_keeps_the_keys_and_authorises_nothing_more(home):
    public, secret, _ = ensure_keys(home, "alice")
    files = sorted(p.name for p in authorized_dir(home).iterdir())
    client = read_key_pair(keys_dir(home) / "client.key_secret")
    again_public, again_secret, keyring = ensure_keys(home, "alice")
    assert (again_public, again_secret) == (public, secret)
    assert read_key_pair(keys_dir(home) / "client.key_secret") == client
    assert sorted(p.name for p in authorized_dir(home).iterdir()) == files and len(keyring.entries()) == 1


def test_the_owners_key_withdrawn_by_the_admin_stays_withdrawn_after_a_restart(home):
    """Regression: every start authorised the owner's key again, so withdrawing a leaked key did not hold."""
    _, _, keyring = ensure_keys(home, "alice")
    keyring.remove("alice")
    _, _, keyring = ensure_keys(home, "alice")
    assert keyring.entries() == []
    for f in keys_dir(home).glob("client.key*"):  # the documented rotation: a new pair, authorised at the start
        f.unlink()
    _, _, keyring = ensure_keys(home, "alice")
    assert [e.user for e in keyring.entries()] == ["alice"]


# -- share_socket ---------------------------------------------------------------------------------------
@pytest.fixture
def group():
    """(name, gid) of an OS group made for this test and deleted after."""
    if os.geteuid() != 0:
        pytest.skip("making an OS group (groupadd) needs root; this test runs as " + account_name(os.geteuid()))
    if shutil.which("groupadd") is None or shutil.which("groupdel") is None:
        pytest.skip("groupadd/groupdel are not installed")
    name = f"llmos-t{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def bound_socket():
    """``bind(home)``: a real ROUTER bound at ipc://HOME/run/kernel.sock (as the kernel binds it); its address."""
    ctx = zmq.Context()
    sockets = []

    def bind(home: Path) -> str:
        (home / "run").mkdir(mode=0o700)
        s = ctx.socket(zmq.ROUTER)
        s.bind(address := f"ipc://{home}/run/kernel.sock")
        sockets.append(s)
        return address

    yield bind
    for s in sockets:
        s.close(0)
    ctx.term()


def test_group_opens_the_socket_its_directory_and_the_home_to_the_group_and_nothing_else(home, group, bound_socket,
                                                                                       capsys):
    name, gid = group
    for d in ("keys", "store", "log"):
        (home / d).mkdir(mode=0o700)
    (home / "keys" / "kernel.key_secret").write_text("secret")
    os.chmod(home / "keys" / "kernel.key_secret", 0o600)
    address = bound_socket(home)
    share_socket(address, name, home)
    sock = home / "run" / "kernel.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert (mode(sock), sock.stat().st_gid) == (0o660, gid)
    assert (mode(home / "run"), (home / "run").stat().st_gid) == (0o750, gid)
    assert (mode(home), home.stat().st_gid) == (0o710, gid)  # members pass through it, cannot list it
    for d in ("keys", "store", "log"):
        assert mode(home / d) == 0o700 and (home / d).stat().st_gid != gid, d
    assert mode(home / "keys" / "kernel.key_secret") == 0o600
    assert "group_cannot_reach_socket" not in capsys.readouterr().err  # /tmp is o+x: the way is open


def test_group_warns_naming_a_directory_above_the_home_that_keeps_the_members_out_and_leaves_it_alone(
        home, group, bound_socket, capsys):
    name, gid = group
    inner = home / "h"
    inner.mkdir(mode=0o700)
    address = bound_socket(inner)
    share_socket(address, name, inner)
    assert (mode(inner / "run" / "kernel.sock"), mode(inner / "run"), mode(inner)) == (0o660, 0o750, 0o710)
    assert mode(home) == 0o700 and home.stat().st_gid != gid  # not the kernel's to open
    err = capsys.readouterr().err
    assert "group_cannot_reach_socket" in err and str(home) in err and name in err


def test_group_opens_no_directory_but_the_homes_own_for_a_socket_elsewhere(home, group, capsys):
    """Regression: with --address ipc:///home/alice/k.sock, --group opened alice's login home to the group."""
    import zmq

    name, gid = group
    elsewhere = home / "alice-login-home"
    elsewhere.mkdir(mode=0o700)
    kernel_home = home / "kernel-home"
    (kernel_home / "run").mkdir(mode=0o700, parents=True)
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(address := f"ipc://{elsewhere}/k.sock")
    try:
        os.chmod(home, 0o755)
        share_socket(address, name, kernel_home)
        assert mode(elsewhere / "k.sock") == 0o660 and mode(elsewhere) == 0o700 and elsewhere.stat().st_gid != gid
        assert "group_cannot_reach_socket" in capsys.readouterr().err
    finally:
        s.close(0)
        ctx.term()


def test_without_a_group_or_for_a_tcp_address_nothing_is_opened(home, bound_socket):
    address = bound_socket(home)
    before = {p: (mode(p), p.stat().st_gid) for p in (home, home / "run", home / "run" / "kernel.sock")}
    share_socket(address, None, home)
    share_socket("tcp://127.0.0.1:5556", "root", home)
    assert {p: (mode(p), p.stat().st_gid) for p in before} == before
