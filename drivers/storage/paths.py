"""Path rules of the store's namespace: ``normpath`` and the byte keys paths become."""

from __future__ import annotations

from typing import Any

from llmos.syscalls.errors import InvalidArgument, quote_path

MAX_PART_BYTES = 255  # one name, UTF-8 bytes (as NAME_MAX)
MAX_PATH_BYTES = 4096  # a whole path, UTF-8 bytes (as PATH_MAX)


def normpath(path: Any) -> str:
    """The canonical form of a store path: absolute, ``//`` and ``.`` collapsed, no trailing ``/``.

    Raises InvalidArgument (EINVAL) for a non-string, a relative path, a ``..`` part, a NUL,
    text that is not valid Unicode, a part over 255 UTF-8 bytes or a path over 4096 bytes.
    ``normpath("/a//b/./c/") == "/a/b/c"``; ``"/"`` stays ``"/"``.
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"a path must be a string, not {type(path).__name__}")
    if not path.startswith("/"):
        raise InvalidArgument(f"path {quote_path(path)} is relative: store paths start with /")
    if "\0" in path:
        raise InvalidArgument(f"path {quote_path(path)} holds a NUL character")
    try:
        whole = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"path {quote_path(path)} is not valid Unicode") from None
    if whole > MAX_PATH_BYTES:
        raise InvalidArgument(f"path {quote_path(path)} is {whole} bytes long; the limit is {MAX_PATH_BYTES}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidArgument(f"path {quote_path(path)} holds '..': store paths never climb")
        if len(part.encode("utf-8")) > MAX_PART_BYTES:
            raise InvalidArgument(f"a name in path {quote_path(path)} is over {MAX_PART_BYTES} bytes")
    return "/" + "/".join(parts)


def key(path: str) -> bytes:
    """The meta database's key of a normalised path."""
    return path.encode("utf-8")


def dir_prefix(path: str) -> bytes:
    """The key prefix every path under the directory ``path`` starts with (``b"/"`` for the root)."""
    return b"/" if path == "/" else key(path) + b"/"


def past_subtree(prefix: bytes, name: bytes) -> bytes:
    """The smallest key after every key under ``prefix + name + b"/"``: a cursor set there skips the
    whole subtree ('0' is the byte after '/')."""
    return prefix + name + b"0"


def parents(path: str) -> list[str]:
    """The ancestors of ``path`` that could be files, nearest last: ``/a/b/c`` -> ``["/a", "/a/b"]``."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]
