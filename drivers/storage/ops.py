"""The write operations the Writer applies, and the one function that applies any of them.

Each op is a plain dataclass; ``apply(op, txn, store)`` runs it inside the writer's (nested)
transaction and returns its result, or raises an LLMOSError that fails that op alone.
Ops act only through the transaction: a transaction rerun after the map grew runs them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import lmdb

from llmos.drivers.storage import inodes, uploads
from llmos.drivers.storage.layout import CHUNK, Stat
from llmos.drivers.storage.paths import dir_prefix, key, normpath
from llmos.syscalls.errors import Exists, InvalidArgument, NotFound, quote, quote_path


@dataclass
class Put:
    """Create or replace the whole file ``path`` with ``data`` (stored in extents of CHUNK) -> Stat."""

    path: str
    data: bytes
    owner: str


@dataclass
class Remove:
    """Remove the file ``path``, or with ``recursive`` every file under ``path/`` too -> files removed.
    ENOENT if there was nothing; EINVAL for a directory without ``recursive``."""

    path: str
    recursive: bool = False


@dataclass
class Rename:
    """Move the file ``src``, or every file under ``src/``, to ``dst`` (``src/a/b`` -> ``dst/a/b``) in one
    transaction, by re-keying the inode records (no data is copied; owners and mtimes stay) -> files moved.
    What ``dst`` holds (a file, or files under ``dst/``) is removed first and its data freed when
    ``replace``, else EEXIST. ENOENT if ``src`` holds nothing; EINVAL when one path is inside the other, or
    ``dst`` cannot be placed (a file as its ancestor)."""

    src: str
    dst: str
    replace: bool = False


@dataclass
class Begin:
    """Open an upload that will become ``path`` at Commit -> the upload id (int)."""

    path: str
    owner: str


@dataclass
class Append:
    """Add ``data`` to upload ``upload``; ``new_extent`` starts a new extent here (contiguous in the
    map, up to 1 GiB; ends at the next new_extent or Commit) -> bytes uploaded so far."""

    upload: int
    data: bytes
    new_extent: bool = False


@dataclass
class Commit:
    """Link the upload's path to its data, atomically replacing the old file -> Stat."""

    upload: int


@dataclass
class Abort:
    """Drop an upload and its data -> None. ENOENT for an unknown upload."""

    upload: int


@dataclass
class Call:
    """Run ``fn(txn)`` inside the group transaction (the journal writes its own database so) -> its
    result. ``fn`` may run more than once (the transaction is rerun after the map grew) and must act
    only through ``txn``; what it raises fails this op alone."""

    fn: Callable[[lmdb.Transaction], Any]


@dataclass
class Flush:
    """Nothing; resolves once everything submitted before it is committed -> None."""


Op = Put | Remove | Rename | Begin | Append | Commit | Abort | Call | Flush


def size_of(op: Op) -> int:
    """Bytes an op brings (for the writer's stats and batch bound)."""
    return len(op.data) if isinstance(op, (Put, Append)) else 0


def _put(op: Put, txn: lmdb.Transaction, store) -> Stat:
    path = normpath(op.path)
    data = _bytes(op.data)
    if not isinstance(op.owner, str):
        raise InvalidArgument(f"owner must be a string, not {type(op.owner).__name__}")
    inodes.check_placeable(txn, store, path)
    ino = inodes.next_number(txn, store, "next_ino")
    view = memoryview(data)
    pieces = [view[i:i + CHUNK] for i in range(0, len(view), CHUNK)]
    inodes.write_extents(txn, store, ino, 0, pieces)
    return inodes.link(txn, store, path, ino, op.owner, [len(p) for p in pieces], checked=True).stat(path)


def _remove(op: Remove, txn: lmdb.Transaction, store) -> int:
    path = normpath(op.path)
    removed = 0
    inode = inodes.lookup(txn, store, path) if path != "/" else None
    if inode is not None:
        inodes.unlink(txn, store, path, inode)
        removed += 1
    if op.recursive:
        prefix = dir_prefix(path)
        doomed = []
        with txn.cursor(db=store.db("meta")) as cur:
            ok = cur.set_range(prefix)
            while ok and bytes(cur.key()).startswith(prefix):
                doomed.append((bytes(cur.key()).decode(), cur.value()))
                ok = cur.next()
        for name, raw in doomed:
            inodes.unlink(txn, store, name, inodes.Inode.unpack(raw))
        removed += len(doomed)
    elif inode is None and inodes.is_dir(txn, store, path):
        raise InvalidArgument(f"{quote_path(path)} is a directory: remove it with recursive=True")
    if removed == 0:
        raise NotFound(f"no such file or directory: {quote_path(path)}")
    return removed


def tree(txn: lmdb.Transaction, store, path: str) -> list[tuple[str, inodes.Inode]]:
    """The file at ``path`` (if any) and every file under ``path/``, in key order, with their inodes."""
    found = []
    inode = inodes.lookup(txn, store, path) if path != "/" else None
    if inode is not None:
        found.append((path, inode))
    prefix = dir_prefix(path)
    with txn.cursor(db=store.db("meta")) as cur:
        ok = cur.set_range(prefix)
        while ok and bytes(cur.key()).startswith(prefix):
            found.append((bytes(cur.key()).decode(), inodes.Inode.unpack(cur.value())))
            ok = cur.next()
    return found


def _rename(op: Rename, txn: lmdb.Transaction, store) -> int:
    src, dst = normpath(op.src), normpath(op.dst)
    if src == "/" or dst == "/" or src == dst or dst.startswith(dir_prefix(src).decode()) or \
            src.startswith(dir_prefix(dst).decode()):
        raise InvalidArgument(f"cannot move {quote_path(src)} to {quote_path(dst)}: one is the other or inside it")
    moving = tree(txn, store, src)
    if not moving:
        raise NotFound(f"no such file or directory: {quote_path(src)}")
    there = tree(txn, store, dst)
    if there and not op.replace:
        raise Exists(f"{quote_path(dst)} exists: move with replace=True to replace it")
    for name, inode in there:
        inodes.unlink(txn, store, name, inode)
    meta = store.db("meta")
    for name, inode in moving:
        txn.delete(key(name), db=meta)
    for name, inode in moving:
        new = normpath(dst + name[len(src):])  # a longer dst may push a deep path over the bounds
        inodes.check_placeable(txn, store, new)
        txn.put(key(new), inode.pack(), db=meta)
    return len(moving)


def _call(op: Call, txn: lmdb.Transaction, store) -> Any:
    return op.fn(txn)


def _flush(op: Flush, txn: lmdb.Transaction, store) -> None:
    return None


def _bytes(data: Any) -> bytes | bytearray | memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"data must be bytes, not {type(data).__name__} ({quote(data)})")
    return data


_APPLY: dict[type, Callable[[Any, lmdb.Transaction, Any], Any]] = {
    Put: _put, Remove: _remove, Rename: _rename, Call: _call, Flush: _flush,
    Begin: uploads.begin, Append: uploads.append, Commit: uploads.commit, Abort: uploads.abort,
}


def apply(op: Op, txn: lmdb.Transaction, store) -> Any:
    """Apply ``op`` in ``txn``; returns the op's result. InvalidArgument for something that is not an op."""
    fn = _APPLY.get(type(op))
    if fn is None:
        raise InvalidArgument(f"not a storage op: {quote(op)}")
    return fn(op, txn, store)
