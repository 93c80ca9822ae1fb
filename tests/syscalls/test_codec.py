import msgpack
import pytest

from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import Errno, FrameTooLarge, ProtocolError


def test_a_request_round_trips_through_the_codec():
    frame = codec.request(7, "spawn", {"prompt": "héllo 这是", "max_new_tokens": 3})
    assert codec.decode(frame) == {"v": protocol.PROTOCOL_VERSION, "id": 7, "call": "spawn",
                                   "args": {"prompt": "héllo 这是", "max_new_tokens": 3}}


def test_error_frames_carry_errno_name_and_message():
    msg = codec.decode(codec.error(3, int(Errno.ESRCH), "ESRCH", "no process 3"))
    assert msg == {"id": 3, "t": "err", "errno": 3, "error": "ESRCH", "message": "no process 3"}


def test_random_bytes_are_a_protocol_error_not_a_crash():
    with pytest.raises(ProtocolError):
        codec.decode(b"\xc1\xff\x00garbage")


def test_frames_over_the_size_bound_are_refused_on_both_sides():
    with pytest.raises(FrameTooLarge):
        codec.decode(b"\x00" * (protocol.MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameTooLarge):
        codec.encode({"x": "a" * (protocol.MAX_FRAME_BYTES + 10)})


def test_extension_types_are_refused():
    data = msgpack.packb(msgpack.ExtType(5, b"pickle?"))
    with pytest.raises(ProtocolError):
        codec.decode(data)


def test_unencodable_objects_raise_protocol_error():
    with pytest.raises(ProtocolError):
        codec.encode({"x": object()})
