"""MessagePack frame codec with bounded sizes; both sides of the bus use it.

A request frame is a map ``{"v": version, "id": request_id, "call": name_or_number, "args": map}``.
A reply frame is a map ``{"id": request_id, "t": "ok" | "err" | "chunk", ...}``.
Only plain MessagePack types cross the bus: no pickle, no extension types.
"""

from __future__ import annotations

from typing import Any

import msgpack

from llmos.syscalls import protocol
from llmos.syscalls.errors import FrameTooLarge, ProtocolError


def encode(obj: Any) -> bytes:
    """Pack ``obj``; refuse frames larger than the bound."""
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode frame: {exc}") from exc
    if len(data) > protocol.MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {protocol.MAX_FRAME_BYTES}")
    return data


def decode(data: bytes) -> Any:
    """Unpack one frame, bounded in total size and in every string, array and map."""
    if len(data) > protocol.MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {protocol.MAX_FRAME_BYTES}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_str_len=protocol.MAX_STR_BYTES,
            max_bin_len=protocol.MAX_STR_BYTES,
            max_array_len=protocol.MAX_ARRAY_LEN,
            max_map_len=protocol.MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated classes for bad input
        raise ProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from exc


def request(request_id: int, call: str | int, args: dict) -> bytes:
    return encode({"v": protocol.PROTOCOL_VERSION, "id": request_id, "call": call, "args": args})


def ok(request_id: int | None, result: Any) -> bytes:
    return encode({"id": request_id, "t": protocol.OK, "result": result})


def chunk(request_id: int | None, data: Any) -> bytes:
    return encode({"id": request_id, "t": protocol.CHUNK, "data": data})


def error(request_id: int | None, errno: int, name: str, message: str) -> bytes:
    return encode({"id": request_id, "t": protocol.ERR, "errno": errno, "error": name, "message": message})


def bye(reason: str) -> bytes:
    return encode({"id": None, "t": protocol.BYE, "reason": reason})
