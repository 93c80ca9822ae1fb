"""The namespace from a program: ``client.fs`` / ``LLMOS(...).fs`` (and ``AsyncClient.fs``), over the fs_* syscalls.

Paths are absolute, under /models, /data, /proc, /home/<user> and /var/log. Values of any size go in
frames of FRAME bytes: a value that fits one frame is one atomic ``fs_put``; a bigger one is an upload
(nothing visible until its last frame commits it). Reads come back in pieces of at most 1 MiB.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from llmos.syscalls.errors import DeviceError, NotFound

if TYPE_CHECKING:
    from llmos.aclient import AsyncClient
    from llmos.client import Client

FRAME = 4 * 2**20  # bytes of data per fs_put frame (the table allows 8 MiB)
WINDOW = 4 * 2**20  # bytes an open() reader asks for at a time
Progress = Callable[[int, "int | None"], None]  # (bytes sent so far, total bytes or None when unknown)


@dataclass(frozen=True)
class FileStat:
    """A file's or directory's stat: ``kind`` "file" or "dir"; ``size`` in bytes (a directory: its number of
    entries); ``mtime`` unix time; ``extents`` the file's extent sizes in bytes."""

    path: str
    kind: str
    size: int
    owner: str = ""
    mtime: float = 0.0
    extents: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1] or "/"

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "FileStat":
        return cls(path=d["path"], kind=d["kind"], size=d["size"], owner=d.get("owner", ""),
                   mtime=d.get("mtime", 0.0), extents=list(d.get("extents") or []))


def frames(data: Any, frame: int = FRAME) -> tuple[Iterator[bytes | memoryview], int | None]:
    """(the data's frames in order, its total size or None): bytes-likes are sliced without copying, a string is
    UTF-8, a file-like is read ``frame`` bytes at a time. At least one frame (b"" for no data)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        n = len(view)
        return (iter([view[i:i + frame] for i in range(0, n, frame)] or [b""])), n
    if not hasattr(data, "read"):
        raise TypeError(f"put takes bytes, str or a binary file object, not {type(data).__name__}")
    total: int | None = None
    try:
        total = os.fstat(data.fileno()).st_size - data.tell()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        pass

    def read() -> Iterator[bytes]:
        first = True
        while True:
            piece = data.read(frame)
            if isinstance(piece, str):
                piece = piece.encode("utf-8")
            if not piece:
                if first:
                    yield b""
                return
            first = False
            yield piece

    return read(), total


def _with_last(pieces: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    it = iter(pieces)
    prev = next(it)
    for piece in it:
        yield prev, False
        prev = piece
    yield prev, True


class FS:
    """The namespace over one synchronous Client (``client.fs``)."""

    def __init__(self, client: "Client") -> None:
        self.client = client

    def put(self, path: str, data: Any, progress: Progress | None = None) -> FileStat:
        """Write ``data`` (bytes, str as UTF-8, or a binary file object read to its end) to ``path``, replacing
        what was there atomically; returns the new stat. ``progress(sent, total)`` is called after each
        frame (total None when a stream's size is unknown). Raises NotPermitted (EPERM), InvalidArgument
        (EINVAL: a bad path), TryAgain (EAGAIN: too many of your uploads are open), NoSpace (ENOSPC),
        DeviceError (EIO)."""
        pieces, total = frames(data)
        sent, upload, reply = 0, None, {}
        for piece, last in _with_last(pieces):
            reply = self.client.fs_put(path, piece, upload=upload, last=last)
            upload = reply.get("upload")
            sent += len(piece)
            if progress is not None:
                progress(sent, total)
        return FileStat.from_wire(reply)

    def get(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes of ``path`` from ``offset`` (``length`` of them; None: to the end), read from one snapshot.
        Raises NotFound (ENOENT), NotPermitted (EPERM), InvalidArgument (EINVAL: a directory, a bad path)."""
        return self.client.fs_get(path, offset, length)

    def open(self, path: str) -> "Reader":
        """A streaming reader of ``path`` (``read(n)``, iteration by pieces, ``with``): it fetches WINDOW
        bytes at a time. DeviceError (EIO) if the file is replaced while it is being read."""
        return Reader(self.client, path)

    def ls(self, path: str = "/", limit: int = 1000) -> "Listing":
        """The entries of directory ``path``, sorted by name (a subdirectory is one entry, kind "dir"): at most
        ``limit`` of them; the list's ``truncated`` is true when there are more. Raises NotFound, NotPermitted,
        InvalidArgument."""
        reply = self.client.fs_list(path, limit)
        return Listing((FileStat.from_wire(e) for e in reply["entries"]), bool(reply.get("truncated")))

    def stat(self, path: str) -> FileStat:
        """The stat of a file or directory. Raises NotFound, NotPermitted, InvalidArgument."""
        return FileStat.from_wire(self.client.fs_stat(path))

    def rm(self, path: str, recursive: bool = False) -> int:
        """Remove a file (or, ``recursive``, everything under ``path``); returns how many files went.
        Raises NotFound, NotPermitted, InvalidArgument."""
        return self.client.fs_remove(path, recursive)["removed"]

    def exists(self, path: str) -> bool:
        """True when ``path`` names a file or a directory with something in it. Raises NotPermitted,
        InvalidArgument."""
        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def rename(self, src: str, dst: str, replace: bool = False) -> int:
        """Move the file or directory ``src`` to ``dst`` in one transaction (no data copied); returns the files
        moved. ``replace``: what ``dst`` holds is removed first, else Exists (EEXIST). Raises NotFound,
        NotPermitted, Busy (EBUSY: a loaded store model), InvalidArgument (one path inside the other)."""
        return self.client.call("fs_rename", {"src": src, "dst": dst, "replace": replace}, timeout=120.0)["moved"]


class Listing(list):
    """A directory's entries (FileStat), with ``truncated``: true when more exist than were asked for."""

    def __init__(self, entries: Iterable[FileStat] = (), truncated: bool = False) -> None:
        super().__init__(entries)
        self.truncated = truncated


class Reader(io.RawIOBase):
    """A read-only, forward file over ``fs_get`` windows; iterating yields pieces (bytes) to the end."""

    def __init__(self, client: "Client", path: str, window: int = WINDOW) -> None:
        super().__init__()
        self.client, self.path, self.window = client, path, window
        self.pos = 0
        self._buf = b""
        self._ident: tuple | None = None  # (size, mtime) of the file when reading began
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        reply, pieces = self.client.fs_get_pieces(self.path, self.pos + len(self._buf), self.window)
        data = b"".join(pieces)
        ident = (reply["size"], reply.get("mtime"))
        if self._ident is None:
            self._ident = ident
        elif ident != self._ident:
            raise DeviceError(f"{self.path} was replaced while being read (at byte {self.pos + len(self._buf)})")
        # the end is where the reply says the file ends: no extra request to find it (a synthesised file,
        # /var/log/kernel, is made anew on each request, so a second window would always look "replaced")
        if not data or reply.get("offset", 0) + len(data) >= reply["size"]:
            self._eof = True
        self._buf += data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        while len(self._buf) < n and not self._eof:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        self.pos += len(out)
        return out

    def readall(self) -> bytes:
        parts = [piece for piece in self]
        return b"".join(parts)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        while True:
            if not self._buf and not self._eof:
                self._fill()
            if not self._buf:
                return
            out, self._buf = self._buf, b""
            self.pos += len(out)
            yield out


class AsyncFS:
    """The namespace over an AsyncClient (``aclient.fs``): the same calls as FS, as coroutines."""

    def __init__(self, client: "AsyncClient") -> None:
        self.client = client

    async def put(self, path: str, data: Any, progress: Progress | None = None) -> FileStat:
        """As FS.put (a file object is read synchronously, a frame at a time)."""
        pieces, total = frames(data)
        sent, upload, reply = 0, None, {}
        for piece, last in _with_last(pieces):
            reply = await self.client.fs_put(path, piece, upload=upload, last=last)
            upload = reply.get("upload")
            sent += len(piece)
            if progress is not None:
                progress(sent, total)
        return FileStat.from_wire(reply)

    async def get(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """As FS.get."""
        return await self.client.fs_get(path, offset, length)

    async def ls(self, path: str = "/", limit: int = 1000) -> list[FileStat]:
        """As FS.ls."""
        return [FileStat.from_wire(e) for e in (await self.client.fs_list(path, limit))["entries"]]

    async def stat(self, path: str) -> FileStat:
        """As FS.stat."""
        return FileStat.from_wire(await self.client.fs_stat(path))

    async def rm(self, path: str, recursive: bool = False) -> int:
        """As FS.rm."""
        return (await self.client.fs_remove(path, recursive))["removed"]

    async def exists(self, path: str) -> bool:
        """As FS.exists."""
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def rename(self, src: str, dst: str, replace: bool = False) -> int:
        """As FS.rename."""
        return (await self.client.call("fs_rename", {"src": src, "dst": dst, "replace": replace},
                                       timeout=120.0))["moved"]


class LogLines:
    """``dmesg``'s lines: iterate for each line (a JSON string) as it comes; with ``follow`` the iteration goes
    on as the kernel logs. ``seq`` is the newest line's seq once the tail has been read (pass it as ``since``)."""

    def __init__(self, frames: Iterator[tuple[str, Any]]) -> None:
        self._frames = frames
        self.seq: int | None = None

    def __iter__(self) -> Iterator[str]:
        from llmos.syscalls import protocol

        for kind, payload in self._frames:
            yield from payload.get("lines", [])
            if kind == protocol.OK:
                self.seq = payload.get("seq")
                return

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close:
            close()

