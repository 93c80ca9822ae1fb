"""Dispatch without sockets: frames in, frames out."""

import asyncio

import msgpack

from llmos.kernel.dispatch import dispatch
from llmos.kernel.handlers import Caller, Handlers
from llmos.syscalls import codec, protocol


def call(frame: bytes) -> list[dict]:
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    asyncio.run(dispatch(Handlers(kernel=None), Caller(b"id", "ann"), frame, send))
    return [codec.decode(s) for s in sent]


def test_ping_answers_ok_with_the_request_id():
    [reply] = call(codec.request(5, "ping", {}))
    assert reply["id"] == 5 and reply["t"] == "ok" and "time" in reply["result"]


def test_syscalls_may_be_called_by_number():
    [reply] = call(codec.request(6, 1, {}))
    assert reply["t"] == "ok"


def test_hello_with_another_protocol_version_is_eproto():
    [reply] = call(codec.request(1, "hello", {"version": 99}))
    assert reply["t"] == "err" and reply["error"] == "EPROTO"


def test_an_unknown_syscall_is_enosys():
    [reply] = call(codec.request(2, "fork_bomb", {}))
    assert (reply["id"], reply["error"]) == (2, "ENOSYS")


def test_wrong_argument_types_are_einval_with_the_request_id():
    [reply] = call(codec.request(3, "wait", {"pid": "one"}))
    assert (reply["id"], reply["error"], reply["errno"]) == (3, "EINVAL", 22)


def test_undecodable_bytes_get_an_eproto_reply_without_an_id():
    [reply] = call(b"\xc1\xc1\xc1")
    assert reply["id"] is None and reply["error"] == "EPROTO"


def test_a_frame_that_is_not_a_map_is_eproto():
    [reply] = call(msgpack.packb([1, 2, 3]))
    assert reply["error"] == "EPROTO"


def test_a_request_with_the_wrong_envelope_version_keeps_its_id():
    [reply] = call(msgpack.packb({"v": 42, "id": 9, "call": "ping", "args": {}}))
    assert (reply["id"], reply["error"]) == (9, "EPROTO")


def test_a_handler_that_crashes_becomes_eio_not_a_dead_bus():
    # kernel=None makes kernel_info fail inside the handler
    [reply] = call(codec.request(4, "kernel_info", {}))
    assert reply["error"] == "EIO" and "internal kernel error" in reply["message"]


def test_protocol_version_is_one():
    assert protocol.PROTOCOL_VERSION == 1
