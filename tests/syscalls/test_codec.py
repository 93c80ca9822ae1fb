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


@pytest.mark.parametrize("what, obj", [
    ("string", {"s": "x" * (protocol.MAX_STR_BYTES + 1)}),
    ("bin", {"b": b"x" * (protocol.MAX_STR_BYTES + 1)}),
    ("array", {"a": [0] * (protocol.MAX_ARRAY_LEN + 1)}),
    ("map", {"m": {i: 0 for i in range(protocol.MAX_MAP_LEN + 1)}}),
])
def test_a_string_array_or_map_over_its_bound_is_emsgsize_on_both_sides(what, obj):
    with pytest.raises(FrameTooLarge):
        codec.encode(obj)
    with pytest.raises(FrameTooLarge) as exc:
        codec.decode(msgpack.packb(obj, use_bin_type=True))
    assert exc.value.errno is Errno.EMSGSIZE, what


@pytest.mark.parametrize("obj", [
    {"s": "x" * protocol.MAX_STR_BYTES}, {"a": [0] * protocol.MAX_ARRAY_LEN},
    {"m": {i: 0 for i in range(protocol.MAX_MAP_LEN)}},
])
def test_values_at_their_bound_pass_both_ways(obj):
    assert codec.decode(codec.encode(obj)) == obj


def test_the_id_of_a_refused_frame_is_read_without_decoding_the_rest():
    big = {"args": {"x": "y" * (protocol.MAX_FRAME_BYTES + 10), "z": [[1, {"id": 3}]] * 5}, "id": 99, "v": 1}
    assert codec.peek_id(msgpack.packb(big)) == 99
    assert codec.peek_id(msgpack.packb({"v": 1, "id": -2**63, "call": "ping"})[:-3]) == -2**63
    for no_id in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"id": "7"}), msgpack.packb({"id": True}),
                  msgpack.packb({"id": 1.0}), msgpack.packb({"ids": 5}), b"\x81\xa2id", b"\x82\xa1v\x01"):
        assert codec.peek_id(no_id) is None, no_id


def test_an_error_frame_is_always_encodable_and_its_message_bounded():
    msg = codec.decode(codec.error(5, Errno.EINVAL, None, "x" * 20_000_000))
    assert msg["error"] == "EINVAL" and msg["errno"] == 22 and len(msg["message"]) <= 1000


def test_a_request_whose_arguments_cannot_be_encoded_is_the_callers_einval():
    from llmos.syscalls.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="64 bits"):
        codec.request(1, "spawn", {"prompt": "x", "max_new_tokens": 2**64})
    with pytest.raises(InvalidArgument):
        codec.request(1, "spawn", {"prompt": object()})
