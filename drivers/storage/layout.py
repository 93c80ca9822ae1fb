"""What the store holds and how: database names, extent sizes, key and inode encodings, Stat."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from llmos.drivers.storage.errors import StorageError

CHUNK = 1 << 20  # extent size of a generic file (Put, and uploads without new_extent)
MAX_EXTENT = 1 << 30  # one extent, bytes
UPLOAD_IDLE_S = 300.0  # an upload with no Append for this long is aborted by the writer

# Named databases (storage-api.md says who owns each). "uploads" holds open uploads: key ino (8 bytes)
# -> msgpack record, key ino (8) + piece (4) -> staged bytes of the extent being built.
DBS = ("meta", "data", "journal", "sys", "log", "uploads")
MAX_DBS = 16

_INO = struct.Struct(">Q")
_EXTENT = struct.Struct(">QI")


def data_key(ino: int, index: int) -> bytes:
    """The data database's key of extent ``index`` of inode ``ino``: 8 + 4 bytes big-endian."""
    return _EXTENT.pack(ino, index)


def ino_key(ino: int) -> bytes:
    """8 bytes big-endian: the prefix of every data key of ``ino``, and its uploads record key."""
    return _INO.pack(ino)


def key_ino(key: bytes | memoryview) -> int:
    """The inode number a data or uploads key starts with."""
    return _INO.unpack_from(key)[0]


@dataclass
class Stat:
    """One entry of the namespace. ``size``: bytes for a file; for a directory from ``FS.stat`` the
    number of immediate entries, in a listing 0 (a listing skips subtrees, it does not count them).
    ``mtime``: unix seconds (0.0 for a directory). ``extents``: sizes in bytes, in order (files)."""

    path: str
    size: int
    owner: str
    mtime: float
    extents: list[int] = field(default_factory=list)
    kind: str = "file"  # "file" | "dir"


@dataclass
class Inode:
    """The meta record of one file (msgpack map on disk)."""

    ino: int
    size: int
    owner: str
    mtime: float
    extents: list[int]

    def pack(self) -> bytes:
        return msgpack.packb({"ino": self.ino, "size": self.size, "owner": self.owner, "mtime": self.mtime,
                              "extents": self.extents, "kind": "file"})

    @classmethod
    def unpack(cls, raw: Any) -> "Inode":
        """Decode a meta record; StorageError (EIO) if it is not one (a corrupt or foreign value)."""
        try:
            m = msgpack.unpackb(raw)
            return cls(int(m["ino"]), int(m["size"]), str(m["owner"]), float(m["mtime"]),
                       [int(e) for e in m["extents"]])
        except Exception as exc:  # msgpack's, KeyError, TypeError...: all say "not an inode record"
            raise StorageError(f"a file's record in the store is corrupt ({type(exc).__name__}: {exc})") from None

    def stat(self, path: str) -> Stat:
        return Stat(path, self.size, self.owner, self.mtime, list(self.extents), "file")


def new_inode(ino: int, owner: str, extents: list[int]) -> Inode:
    return Inode(ino, sum(extents), owner, time.time(), extents)


def dir_stat(path: str, entries: int = 0) -> Stat:
    return Stat(path, entries, "", 0.0, [], "dir")
