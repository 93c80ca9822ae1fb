"""What the kernel holds for one client until its socket takes it: frames in order, bounded in bytes.

Pure and synchronous (no sockets): the Bus puts frames in and flushes with a ``send`` callable
that says whether the socket took the frame. While a client reads slowly, the stream chunks of
one request that wait here merge into one (text concatenates, token ids extend), so a lagging
reader costs the kernel the bytes of the text it has not read, not a frame per token. Final
frames are never merged or dropped: each request gets exactly one, in order after its chunks.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from llmos.syscalls import codec

# A merged chunk stops growing here and a new one starts, so every chunk frame stays far below
# the frame limit whatever a reader's lag.
MAX_CHUNK_BYTES = 1 << 20
_ENTRY_OVERHEAD = 48  # frame envelope and bookkeeping, counted once per entry


class _Entry:
    """A final frame (``frame``), or a chunk whose fields are lists of parts joined when it is sent."""

    __slots__ = ("rid", "frame", "parts", "size")

    def __init__(self, rid: Any, frame: bytes | None, parts: dict[str, tuple[type, list]] | None,
                 size: int) -> None:
        self.rid, self.frame, self.parts, self.size = rid, frame, parts, size

    def merge(self, data: dict) -> bool:
        """Append ``data`` field by field; False (nothing changed) when its fields do not match."""
        if self.parts is None or self.parts.keys() != data.keys():
            return False
        if any(not isinstance(v, kind) for v, (kind, _) in zip(map(data.get, self.parts), self.parts.values())):
            return False
        for k, (kind, parts) in self.parts.items():
            if kind is str:
                parts.append(data[k])
            else:
                parts.extend(data[k])
        return True

    def encode(self) -> bytes:
        if self.frame is not None:
            return self.frame
        assert self.parts is not None
        return codec.chunk(self.rid, {k: "".join(p) if kind is str else p for k, (kind, p) in self.parts.items()})


def data_size(data: Any) -> int:
    """Bytes a chunk's data takes on the wire, near enough to account for it (an upper bound for text)."""
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, (list, tuple)):
        return 5 + 9 * len(data) if all(isinstance(x, int) for x in data) else 5 + sum(map(data_size, data))
    if isinstance(data, dict):
        return 5 + sum(data_size(k) + data_size(v) for k, v in data.items())
    return 9


def _mergeable(data: dict) -> bool:
    return all(isinstance(v, (str, list)) for v in data.values())


def _split(data: dict, limit: int) -> list[dict]:
    """Cut a chunk bigger than ``limit`` into pieces in order (a stream's text and ids only concatenate)."""
    share = max(limit // (len(data) + 1), 36)  # each field's part of a piece, with room for the envelope
    step = {k: max(1, share // (4 if isinstance(v, str) else 9)) for k, v in data.items()}
    n = max(-(-len(v) // step[k]) for k, v in data.items())
    return [{k: v[i * step[k]:(i + 1) * step[k]] for k, v in data.items()} for i in range(n)]


class Outbox:
    """The frames waiting for one client. ``bytes`` is what they take; the Bus enforces the budget."""

    def __init__(self, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self._queue: deque[_Entry] = deque()
        self._open: dict[Any, _Entry] = {}  # rid -> its newest chunk still queued (chunks merge into it)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._queue)

    def chunk(self, rid: Any, data: dict) -> None:
        """Queue one chunk of request ``rid``'s stream, merged into its queued chunk when there is one.

        Chunk data is a map of strings and lists (``{"text", "token_ids"}``); other data is queued
        as it is, unmerged."""
        size = data_size(data)
        if not data or not _mergeable(data):
            self._open.pop(rid, None)
            self.frame(codec.chunk(rid, data))
            return
        if size > self.max_chunk_bytes:
            for piece in _split(data, self.max_chunk_bytes):
                self._queue_chunk(rid, piece, data_size(piece))
        else:
            self._queue_chunk(rid, data, size)

    def _queue_chunk(self, rid: Any, data: dict, size: int) -> None:
        entry = self._open.get(rid)
        if entry is not None and entry.size + size <= self.max_chunk_bytes and entry.merge(data):
            entry.size += size
            self.bytes += size
            return
        parts = {k: (str, [v]) if isinstance(v, str) else (list, list(v)) for k, v in data.items()}
        entry = _Entry(rid, None, parts, size + _ENTRY_OVERHEAD)
        self._queue.append(entry)
        self._open[rid] = entry
        self.bytes += entry.size

    def final(self, rid: Any, frame: bytes) -> None:
        """Queue the final frame of request ``rid`` (after all its chunks); its stream is closed."""
        self._open.pop(rid, None)
        self.frame(frame)

    def frame(self, frame: bytes) -> None:
        """Queue a frame that merges with nothing (an error without an id, a bye)."""
        entry = _Entry(None, frame, None, len(frame) + _ENTRY_OVERHEAD)
        self._queue.append(entry)
        self.bytes += entry.size

    def flush(self, send: Callable[[bytes], bool]) -> int:
        """Hand frames to ``send`` in order until it returns False (the socket is full: the frame
        stays first in line); returns how many it took. ``send`` may raise to say the client is gone."""
        sent = 0
        while self._queue:
            entry = self._queue[0]
            if entry.frame is None:  # freeze the chunk: what merges from now on starts a new one
                entry.frame, entry.parts = entry.encode(), None
                if self._open.get(entry.rid) is entry:
                    del self._open[entry.rid]
                self.bytes += len(entry.frame) + _ENTRY_OVERHEAD - entry.size
                entry.size = len(entry.frame) + _ENTRY_OVERHEAD
            if not send(entry.frame):
                return sent
            self._queue.popleft()
            self.bytes -= entry.size
            sent += 1
        return sent

    def clear(self) -> None:
        self._queue.clear()
        self._open.clear()
        self.bytes = 0
