"""The namespace, read side: stat, read (byte ranges), list, walk and zero-copy extents.

Pure functions over read transactions, usable in any process that opened the store. Directories
are implied by the paths of files (as in an object store): a listing collapses each subdirectory
to one entry and skips its subtree with one cursor seek.
"""

from __future__ import annotations

from typing import Iterator

import lmdb

from llmos.drivers.storage.errors import StorageError
from llmos.drivers.storage.layout import Inode, Stat, data_key, dir_stat
from llmos.drivers.storage.paths import dir_prefix, key, normpath, past_subtree
from llmos.syscalls.errors import InvalidArgument, NotFound, quote, quote_path

WALK_BATCH = 1000  # files per read transaction in walk (a reader held open pins pages the writer would reuse)


class FS:
    """The store's files and implied directories, read-only. Every method raises NotFound (ENOENT),
    InvalidArgument (EINVAL) or StorageError (EIO); paths go through ``normpath``."""

    def __init__(self, store) -> None:
        self.store = store

    def stat(self, path: str) -> Stat:
        """The file at ``path``, or the implied directory (size = number of immediate entries)."""
        path = normpath(path)
        with self.store.read() as txn:
            inode = self._inode(txn, path)
            if inode is not None:
                return inode.stat(path)
            entries = self._children(txn, path, limit=None)
        if not entries and path != "/":
            raise NotFound(f"no such file or directory: {quote_path(path)}")
        return dir_stat(path, len(entries))

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` of the file (to its end when ``length`` is None; short at
        the end of the file). NotFound; InvalidArgument for a directory or a negative offset or length."""
        path = normpath(path)
        for name, value in (("offset", offset), ("length", length)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidArgument(f"{name} must be an int >= 0, not {quote(value)}")
        with self.store.read() as txn:
            views = self._extents(txn, path)
            end = sum(len(v) for v in views) if length is None else offset + length
            out, base = [], 0
            for view in views:
                lo, hi = max(offset - base, 0), min(end - base, len(view))
                if lo < hi:
                    out.append(view[lo:hi])
                base += len(view)
                if base >= end:
                    break
            return b"".join(out)

    def list(self, path: str, limit: int = 10_000) -> list[Stat]:
        """The immediate entries of directory ``path``, sorted by name, at most ``limit``; for a file,
        the file itself. A subdirectory is one entry (kind "dir", size 0). NotFound if neither."""
        path = normpath(path)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidArgument(f"limit must be an int >= 0, not {quote(limit)}")
        with self.store.read() as txn:
            inode = self._inode(txn, path)
            if inode is not None:
                return [inode.stat(path)]
            entries = self._children(txn, path, limit)
        if not entries and path != "/":
            raise NotFound(f"no such file or directory: {quote_path(path)}")
        return sorted(entries, key=lambda s: s.path)

    def walk(self, prefix: str = "/") -> Iterator[Stat]:
        """Every file under directory ``prefix`` (and ``prefix`` itself if it is a file), in key order.
        Reads WALK_BATCH files per transaction, so a slow consumer pins no old pages."""
        path = normpath(prefix)
        with self.store.read() as txn:
            inode = self._inode(txn, path)
        if inode is not None:
            yield inode.stat(path)
        start = want = dir_prefix(path)
        while True:
            batch: list[Stat] = []
            with self.store.read() as txn, txn.cursor(db=self.store.db("meta")) as cur:
                ok = cur.set_range(start)
                while ok and len(batch) < WALK_BATCH:
                    k = bytes(cur.key())
                    if not k.startswith(want):
                        break
                    batch.append(Inode.unpack(cur.value()).stat(k.decode()))
                    ok = cur.next()
            yield from batch
            if len(batch) < WALK_BATCH:
                return
            start = key(batch[-1].path) + b"\0"

    def extents(self, txn: lmdb.Transaction, path: str) -> list[memoryview]:
        """The file's extents as read-only memoryviews into the map, zero-copy, in order; valid while
        ``txn`` (from ``store.read()``) lives. NotFound; InvalidArgument for a directory."""
        return self._extents(txn, normpath(path))

    # -- helpers over one transaction ----------------------------------------------------------------
    def _inode(self, txn: lmdb.Transaction, path: str) -> Inode | None:
        raw = txn.get(key(path), db=self.store.db("meta")) if path != "/" else None
        return Inode.unpack(raw) if raw is not None else None

    def _extents(self, txn: lmdb.Transaction, path: str) -> list[memoryview]:
        inode = self._inode(txn, path)
        if inode is None:
            if path == "/" or self._children(txn, path, limit=1):
                raise InvalidArgument(f"{quote_path(path)} is a directory (EISDIR)")
            raise NotFound(f"no such file: {quote_path(path)}")
        data, views = self.store.db("data"), []
        for i, size in enumerate(inode.extents):
            view = txn.get(data_key(inode.ino, i), db=data)
            if view is None or len(view) != size:
                raise StorageError(f"store {str(self.store.path)!r}: extent {i} of {quote_path(path)} is "
                                   f"{'missing' if view is None else f'{len(view)} bytes, not {size}'}")
            views.append(view)
        return views

    def _children(self, txn: lmdb.Transaction, path: str, limit: int | None) -> list[Stat]:
        prefix = dir_prefix(path)
        out: list[Stat] = []
        with txn.cursor(db=self.store.db("meta")) as cur:
            ok = cur.set_range(prefix)
            while ok and (limit is None or len(out) < limit):
                k = bytes(cur.key())
                if not k.startswith(prefix):
                    break
                name, sep, _ = k[len(prefix):].partition(b"/")
                child = (prefix + name).decode()
                if sep:  # a file deeper down: the child is a directory; skip all of it
                    out.append(dir_stat(child))
                    ok = cur.set_range(past_subtree(prefix, name))
                else:
                    out.append(Inode.unpack(cur.value()).stat(child))
                    ok = cur.next()
        return out
