"""MessagePack frame codec with bounded sizes; both sides of the bus use it.

A request frame is a map ``{"v": version, "id": request_id, "call": name_or_number, "args": map}``, with
``"for": user`` when a delegate makes the call for another user.
A reply frame is a map ``{"id": request_id, "t": "ok" | "err" | "chunk", ...}``.
Only plain MessagePack types cross the bus: no pickle, no extension types.

The bounds (protocol.py) hold both ways: ``encode`` refuses what ``decode`` would refuse, and a
frame over a bound is FrameTooLarge (EMSGSIZE); a frame that is not MessagePack is EPROTO.
"""

from __future__ import annotations

from typing import Any

import msgpack

from llmos.syscalls import protocol
from llmos.syscalls.errors import Errno, FrameTooLarge, InvalidArgument, ProtocolError, wire_error

_LIMITS = dict(max_str_len=protocol.MAX_STR_BYTES, max_bin_len=protocol.MAX_STR_BYTES,
               max_array_len=protocol.MAX_ARRAY_LEN, max_map_len=protocol.MAX_MAP_LEN, max_ext_len=0)
# No smaller frame can hold a string, array or map over its bound (a map of MAX_MAP_LEN + 1 keys
# takes two bytes a key at least), so encode only re-checks frames at least this long.
_CHECK_FROM = min(protocol.MAX_STR_BYTES, protocol.MAX_ARRAY_LEN, 2 * protocol.MAX_MAP_LEN)


def encode(obj: Any) -> bytes:
    """Pack ``obj``; FrameTooLarge when the frame or any string, array or map in it is over its bound."""
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode frame: {exc}") from exc
    if len(data) > protocol.MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {protocol.MAX_FRAME_BYTES}")
    if len(data) >= _CHECK_FROM:
        decode(data)  # the peer would refuse it: refuse it here, with the same error
    return data


def decode(data: bytes) -> Any:
    """Unpack one frame, bounded in total size and in every string, array and map.

    Raises FrameTooLarge (EMSGSIZE) for a bound exceeded, ProtocolError (EPROTO) for bytes that
    are not one MessagePack value.
    """
    if len(data) > protocol.MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {protocol.MAX_FRAME_BYTES}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, **_LIMITS)
    except ValueError as exc:
        if "exceeds max_" in str(exc) and "max_ext_len" not in str(exc):
            raise FrameTooLarge(f"frame holds a string, array or map over its bound: {exc}") from exc
        raise ProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # msgpack raises several unrelated classes for bad input
        raise ProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from exc


def peek_id(data: bytes) -> int | None:
    """The integer ``id`` of a request frame that ``decode`` refused, when it can be read.

    Reads the top-level map entry by entry and skips every value but the id's, so a frame over
    the bounds costs no more memory than its bytes.
    """
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1),
                                    max_str_len=len(data), max_bin_len=len(data), max_array_len=len(data),
                                    max_map_len=len(data), max_ext_len=len(data))
        unpacker.feed(data)
        for _ in range(unpacker.read_map_header()):
            key_at = unpacker.tell()
            unpacker.skip()
            if data[key_at:unpacker.tell()] == b"\xa2id":
                value_at = unpacker.tell()
                if not _is_int_header(data[value_at]):
                    return None
                value = unpacker.unpack()
                return value if isinstance(value, int) and not isinstance(value, bool) else None
            unpacker.skip()
    except Exception:
        return None
    return None


def _is_int_header(byte: int) -> bool:
    return byte <= 0x7F or byte >= 0xE0 or 0xCC <= byte <= 0xD3


def request(request_id: int, call: str | int, args: dict, act_for: str | None = None) -> bytes:
    """A request frame (``act_for``: the user the call is made for, by a delegate: the envelope's ``for``,
    kernel/delegation.py). Arguments MessagePack cannot carry (an integer beyond 64 bits, an object) are the
    caller's fault: InvalidArgument (EINVAL), not a protocol error; FrameTooLarge for one over the bounds."""
    try:
        msg = {"v": protocol.PROTOCOL_VERSION, "id": request_id, "call": call, "args": args}
        if act_for is not None:
            msg["for"] = act_for
        return encode(msg)
    except FrameTooLarge:
        raise
    except ProtocolError as exc:
        raise InvalidArgument(f"the arguments of {call!r} cannot be sent: {exc.message.removeprefix('cannot encode frame: ')}"
                              " (integers must fit 64 bits; values must be numbers, strings, lists or maps)") from None


def ok(request_id: int | None, result: Any) -> bytes:
    return encode({"id": request_id, "t": protocol.OK, "result": result})


def chunk(request_id: int | None, data: Any) -> bytes:
    return encode({"id": request_id, "t": protocol.CHUNK, "data": data})


def error(request_id: int | None, errno: Errno | int, name: str | None = None, message: str = "") -> bytes:
    """An error frame; never fails: the message is cut to fit (``name`` is derived from ``errno``)."""
    return encode({"id": request_id, "t": protocol.ERR, **wire_error(errno, message)})


def bye(reason: str) -> bytes:
    return encode({"id": None, "t": protocol.BYE, "reason": reason[:200]})
