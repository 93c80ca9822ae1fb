"""Typed fields for request and reply schemas, and the validator the kernel runs on every request.

A schema is a tuple of :class:`Field`. ``validate`` checks names, types and ranges and fills in
defaults; any fault raises InvalidArgument naming the field, so the caller learns what to fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from llmos.syscalls.errors import InvalidArgument, quote

_MISSING = object()

# Wire types: "int", "float", "str", "bytes" (MessagePack bin), "bool", "map", "any", "list[str]", "list[int]",
# "list[map]".
_SCALARS = {"int", "float", "str", "bytes", "bool", "map", "any"}


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    doc: str = ""
    default: Any = _MISSING  # _MISSING: required (unless nullable)
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    max_len: int | None = None  # characters of a string, bytes of a bytes value, items of a list
    item_max_len: int | None = None  # characters of each string in a list[str]
    max_bytes: int | None = None  # the value's size as MessagePack (strings as UTF-8), all of it
    pattern: str | None = None  # a string must match this regular expression whole
    pattern_doc: str = ""  # the pattern in words, for errors and docs

    @property
    def required(self) -> bool:
        return self.default is _MISSING and not self.nullable

    def default_value(self) -> Any:
        if self.default is _MISSING:
            return None
        return list(self.default) if isinstance(self.default, (list, tuple)) else self.default

    def describe(self) -> str:
        parts = [self.type + ("?" if self.nullable else "")]
        if self.choices:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.min is not None or self.max is not None:
            lo = "-inf" if self.min is None else str(self.min)
            hi = "inf" if self.max is None else str(self.max)
            parts.append(f"range [{lo}, {hi}]")
        if self.max_len is not None:
            unit = "items" if self.type.startswith("list[") else "bytes" if self.type == "bytes" else "characters"
            parts.append(f"at most {self.max_len:,} {unit}")
        if self.item_max_len is not None:
            parts.append(f"each at most {self.item_max_len:,} characters")
        if self.max_bytes is not None:
            parts.append(f"at most {_size(self.max_bytes)} in all (as MessagePack)")
        if self.pattern_doc:
            parts.append(self.pattern_doc)
        if self.default is not _MISSING:
            parts.append(f"default {self.default!r}")
        elif self.nullable:
            parts.append("default null")
        else:
            parts.append("required")
        return "; ".join(parts)


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} bytes"


def _check_scalar(field: Field, kind: str, value: Any, where: str) -> Any:
    if kind == "any":
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where} must be a bool, got {type(value).__name__}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{where} must be an int, got {type(value).__name__}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{where} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise InvalidArgument(f"{where} must be finite")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise InvalidArgument(f"{where} must be a string, got {type(value).__name__}")
        return value
    if kind == "bytes":
        # a string is not bytes: it would be stored UTF-8-encoded without the caller saying so
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"{where} must be bytes (MessagePack bin), got {type(value).__name__}")
        return bytes(value) if not isinstance(value, bytes) else value
    if kind == "map":
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where} must be a map, got {type(value).__name__}")
        return value
    raise AssertionError(f"unknown schema type {kind}")


_EXACT = {"int": int, "str": str, "map": dict, "bool": bool}  # item types a list can be checked for in one pass


def _check_items(field: Field, item: str, value: list | tuple) -> list:
    """The items of a list field, checked. A list of a million ids is checked in one pass at C speed
    (the kernel's loop serves everyone meanwhile); only a list with a bad item is walked item by item,
    to name the first one."""
    exact = _EXACT.get(item)
    if exact is not None and set(map(type, value)) <= {exact}:
        return list(value)
    return [_check_scalar(field, item, v, f"item {i} of '{field.name}'") for i, v in enumerate(value)]


def check(field: Field, value: Any) -> Any:
    """Validate one value against its field; return the normalised value."""
    if value is None:
        if field.nullable:
            return None
        raise InvalidArgument(f"field '{field.name}' must not be null")
    if field.type.startswith("list["):
        item = field.type[5:-1]
        if not isinstance(value, (list, tuple)):
            raise InvalidArgument(f"field '{field.name}' must be a list, got {type(value).__name__}")
        if field.max_len is not None and len(value) > field.max_len:
            raise InvalidArgument(f"field '{field.name}' has {len(value)} items, at most {field.max_len} allowed")
        out = _check_items(field, item, value)
        if field.item_max_len is not None:
            for i, v in enumerate(out):
                if isinstance(v, str) and len(v) > field.item_max_len:
                    raise InvalidArgument(f"item {i} of '{field.name}' has {len(v)} characters, "
                                          f"at most {field.item_max_len} allowed")
        _check_bytes(field, out)
        return out
    value = _check_scalar(field, field.type, value, f"field '{field.name}'")
    if field.max_len is not None and isinstance(value, str) and len(value) > field.max_len:
        raise InvalidArgument(f"field '{field.name}' has {len(value)} characters, at most {field.max_len} allowed")
    if field.max_len is not None and isinstance(value, bytes) and len(value) > field.max_len:
        raise InvalidArgument(f"field '{field.name}' has {len(value):,} bytes, at most {field.max_len:,} allowed")
    if field.choices is not None and value not in field.choices:
        raise InvalidArgument(f"field '{field.name}' must be one of {', '.join(map(str, field.choices))}; "
                              f"got {quote(value)}")
    if field.min is not None and value < field.min:
        raise InvalidArgument(f"field '{field.name}' must be >= {field.min}; got {quote(value)}")
    if field.max is not None and value > field.max:
        raise InvalidArgument(f"field '{field.name}' must be <= {field.max}; got {quote(value)}")
    if field.pattern is not None and isinstance(value, str) and not re.fullmatch(field.pattern, value):
        raise InvalidArgument(f"field '{field.name}' must be {field.pattern_doc or 'of the form ' + field.pattern}; "
                              f"got {quote(value)}")
    _check_bytes(field, value)
    return value


def _check_bytes(field: Field, value: Any) -> None:
    if field.max_bytes is None:
        return
    try:
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):  # nested deeper than MessagePack's packer goes
        raise InvalidArgument(f"field '{field.name}' is nested too deeply") from None
    if size > field.max_bytes:
        raise InvalidArgument(f"field '{field.name}' takes {size:,} bytes, at most {field.max_bytes:,} allowed")


def validate(fields: tuple[Field, ...], args: Any) -> dict[str, Any]:
    """Validate a request's ``args`` map against ``fields``; unknown names are refused."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidArgument(f"'args' must be a map, got {type(args).__name__}")
    known = {f.name: f for f in fields}
    unknown = [k for k in args if k not in known]
    if unknown:
        shown = ", ".join(quote(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InvalidArgument(f"unknown field(s): {shown}; known: {', '.join(known) or 'none'}")
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in args:
            out[f.name] = check(f, args[f.name])
        elif f.required:
            raise InvalidArgument(f"missing required field '{f.name}'")
        else:
            out[f.name] = f.default_value()
    return out
