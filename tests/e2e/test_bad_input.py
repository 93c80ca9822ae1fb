"""Bad input gets an error reply to its sender; the kernel keeps serving everyone else."""

import socket

import msgpack
import pytest
import zmq

from llmos import InvalidArgument, NoSuchProcess, NotFound, TooBig
from llmos.syscalls import codec
from llmos.syscalls.address import ipc_path


@pytest.fixture
def raw(kernel):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(kernel.address)
    yield sock
    sock.close()
    ctx.term()


def reply(sock, *frames):
    sock.send_multipart(list(frames))
    return codec.decode(sock.recv())


def test_garbage_bytes_get_an_eproto_reply(raw):
    r = reply(raw, b"\x93\x01\xc1 not msgpack")
    assert r["t"] == "err" and r["error"] == "EPROTO" and r["id"] is None


def test_a_multipart_request_gets_an_eproto_reply(raw):
    r = reply(raw, codec.request(1, "ping", {}), b"extra")
    assert r["error"] == "EPROTO"


def test_an_unknown_syscall_gets_enosys(raw):
    r = reply(raw, codec.request(11, "reboot", {}))
    assert (r["id"], r["error"]) == (11, "ENOSYS")


def test_a_request_without_an_id_gets_eproto(raw):
    r = reply(raw, msgpack.packb({"v": 1, "call": "ping"}))
    assert r["error"] == "EPROTO"


def test_a_wrong_protocol_version_gets_eproto(raw):
    r = reply(raw, msgpack.packb({"v": 2, "id": 4, "call": "ping", "args": {}}))
    assert (r["id"], r["error"]) == (4, "EPROTO")


def test_random_bytes_on_the_raw_socket_are_dropped_and_the_kernel_serves_on(kernel, client):
    path = ipc_path(kernel.address)
    for payload in (b"\x00" * 64, bytes(range(256)) * 8, b"GET / HTTP/1.1\r\n\r\n"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(payload)
        s.close()
    assert "time" in client.ping()


@pytest.mark.parametrize("kwargs, error", [
    ({"prompt": "x", "max_new_tokens": -5}, InvalidArgument),
    ({"prompt": "x", "temperature": -1.0}, InvalidArgument),
    ({"prompt": "x", "priority": 99}, InvalidArgument),
    ({"prompt": "x", "model": "/no/such/model"}, NotFound),
    ({"prompt": "x", "model": "relative/name"}, NotFound),
    ({"messages": [{"role": "user"}]}, InvalidArgument),
    ({}, InvalidArgument),
])
def test_bad_spawn_arguments_raise_llmos_errors(client, tiny_model, kwargs, error):
    kwargs.setdefault("model", tiny_model)
    with pytest.raises(error) as exc:
        client.spawn(**kwargs)
    assert exc.value.errno == error.errno_default


def test_a_prompt_longer_than_the_context_is_e2big(client, tiny_model):
    with pytest.raises(TooBig, match="context"):
        client.spawn(prompt="word " * 400, model=tiny_model)


def test_bad_prompt_ids_are_einval_and_too_many_are_e2big(client, tiny_model):
    for ids in ([], [-1], [10**6], [3, 400000]):
        with pytest.raises(InvalidArgument, match="prompt_ids"):
            client.spawn(prompt_ids=ids, model=tiny_model)
    with pytest.raises(TooBig, match="context"):
        client.spawn(prompt_ids=[5] * 1024, model=tiny_model)
    assert client.wait(client.spawn(prompt_ids=[5, 6, 7], model=tiny_model, max_new_tokens=2)).token_ids


def test_unknown_pids_are_esrch_for_every_call(client):
    for call in (lambda: client.wait(424242), lambda: client.kill(424242), lambda: client.stat(424242),
                 lambda: list(client.stream(424242))):
        with pytest.raises(NoSuchProcess):
            call()


def test_a_wrong_type_through_the_client_is_einval(client):
    with pytest.raises(InvalidArgument, match="pid"):
        client.call("wait", {"pid": "seven"})


def test_after_all_that_the_kernel_still_generates(client, tiny_model):
    assert client.wait(client.spawn(prompt="ok", model=tiny_model, max_new_tokens=3)).stats.output_tokens == 3
