"""Kernel addresses are checked in one place: every party refuses the same bad ones with the same clear error."""

import asyncio

import pytest

from llmos import AsyncClient, Client, InvalidArgument, LLMOS
from llmos.syscalls.address import check_address, connect_address, resolve_address
from llmos.embedded import launch

GOOD = ["ipc:///tmp/k.sock", "ipc:///home/u/.llmos/run/kernel.sock", "tcp://127.0.0.1:5555", "tcp://localhost:1",
        "tcp://kernel-host.example.org:65535", "tcp://[::1]:5555", "tcp://*:5555", "tcp://eth0:7000"]
BAD = {
    "": "empty", "garbage": "no transport", "foo": "no transport", "localhost:5555": "no transport",
    "ipc://": "absolute", "ipc://relative/k.sock": "absolute", "ipc:///" + "x" * 120: "longer than a unix socket",
    "tcp://localhost": "port", "tcp://localhost:0": "port", "tcp://localhost:65536": "port",
    "tcp://localhost:http": "port", "tcp://:5555": "not a host", "tcp://a b:5555": "not a host",
    "tcp://1.2.3.4:5;x": "port", "udp://1.2.3.4:5": "unknown transport 'udp'", "inproc://x": "unknown transport",
    "http://localhost:80": "unknown transport",
}


@pytest.mark.parametrize("address", GOOD)
def test_addresses_the_bus_can_use_are_accepted_unchanged(address):
    assert check_address(address) == address


@pytest.mark.parametrize("address, why", BAD.items())
def test_every_kind_of_bad_address_is_refused_saying_why_and_what_is_expected(address, why):
    with pytest.raises(InvalidArgument) as exc:
        check_address(address, "$LLMOS_ADDRESS")
    msg = exc.value.message
    assert why in msg and "($LLMOS_ADDRESS)" in msg and "expected ipc:///absolute/path or tcp://HOST:PORT" in msg
    assert len(msg) < 600  # a long address is quoted by a prefix only


def test_the_address_comes_from_the_flag_then_the_home_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "envhome"))
    monkeypatch.delenv("LLMOS_ADDRESS", raising=False)
    assert resolve_address() == f"ipc://{tmp_path}/envhome/run/kernel.sock"
    monkeypatch.setenv("LLMOS_ADDRESS", "tcp://127.0.0.1:7001")
    assert resolve_address() == "tcp://127.0.0.1:7001"
    assert resolve_address(home=tmp_path / "flag") == f"ipc://{tmp_path}/flag/run/kernel.sock"  # --home beats env
    assert resolve_address("tcp://127.0.0.1:7002", tmp_path / "flag") == "tcp://127.0.0.1:7002"
    monkeypatch.setenv("LLMOS_ADDRESS", "foo")
    with pytest.raises(InvalidArgument, match=r"'foo' \(\$LLMOS_ADDRESS\)"):
        resolve_address()
    with pytest.raises(InvalidArgument, match="a tcp address needs a port"):
        resolve_address("tcp://x")


def test_a_kernel_listening_everywhere_is_reached_on_the_loopback():
    assert connect_address("tcp://*:5555") == "tcp://127.0.0.1:5555"
    assert connect_address("tcp://10.0.0.1:5555") == "tcp://10.0.0.1:5555"
    assert connect_address("ipc:///tmp/k.sock") == "ipc:///tmp/k.sock"


def test_every_entry_point_refuses_a_bad_address_with_invalid_argument_before_any_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    for make in (lambda a: Client(a), lambda a: AsyncClient(a), lambda a: LLMOS(address=a),
                 lambda a: launch(a, tmp_path / "home", embedded=True)):
        with pytest.raises(InvalidArgument, match="invalid kernel address 'garbage'"):
            make("garbage")
    monkeypatch.setenv("LLMOS_ADDRESS", "tcp://nowhere")
    with pytest.raises(InvalidArgument, match=r"\(\$LLMOS_ADDRESS\)"):
        LLMOS()
    with pytest.raises(InvalidArgument):
        asyncio.run(AsyncClient().connect())
    assert not (tmp_path / "home").exists()  # nothing was started or created
