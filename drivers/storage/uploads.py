"""Uploads: a big value written in pieces under a fresh inode, linked to its path only at Commit.

State lives in the "uploads" database, so it is as transactional as the data: key ino (8 bytes)
-> msgpack record ``{path, owner, extents, staged, pending, custom}``; key ino + piece (4 bytes) ->
bytes staged for the extent being built. An extent is written to the data database whole once its
end is known (CHUNK reached, the next new_extent, Commit): an LMDB value cannot be appended to, and a
whole value is what makes an extent contiguous in the map. The upload id is the inode number.
"""

from __future__ import annotations

import lmdb
import msgpack

from llmos.drivers.storage import inodes
from llmos.drivers.storage.layout import CHUNK, MAX_EXTENT, Stat, ino_key, key_ino
from llmos.drivers.storage.paths import normpath
from llmos.syscalls.errors import InvalidArgument, NotFound, TooBig, quote

_PIECE = 4  # bytes of the piece index after the inode


def begin(op, txn: lmdb.Transaction, store) -> int:
    path = normpath(op.path)
    if not isinstance(op.owner, str):
        raise InvalidArgument(f"owner must be a string, not {type(op.owner).__name__}")
    inodes.check_placeable(txn, store, path)
    ino = inodes.next_number(txn, store, "next_ino")
    _save(txn, store, ino, {"path": path, "owner": op.owner, "extents": [], "staged": 0, "pending": 0,
                            "custom": False})
    return ino


def append(op, txn: lmdb.Transaction, store) -> int:
    if not isinstance(op.data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"data must be bytes, not {type(op.data).__name__} ({quote(op.data)})")
    ino, rec = _load(txn, store, op.upload)
    if op.new_extent:
        _finish_extent(txn, store, ino, rec)
        rec["custom"] = True
    data = memoryview(op.data).cast("B")
    if rec["custom"]:
        if rec["pending"] + len(data) > MAX_EXTENT:
            raise TooBig(f"upload {ino}: one extent may hold at most {MAX_EXTENT} bytes")
        _stage(txn, store, ino, rec, data)
    elif rec["pending"] + len(data) < CHUNK:
        _stage(txn, store, ino, rec, data)
    else:  # whole CHUNKs go straight to the data db; the rest is staged
        joined = memoryview(b"".join([*_staged(txn, store, ino, rec), data]))
        _drop_staged(txn, store, ino, rec)
        whole = len(joined) - len(joined) % CHUNK
        pieces = [joined[i:i + CHUNK] for i in range(0, whole, CHUNK)]
        inodes.write_extents(txn, store, ino, len(rec["extents"]), pieces)
        rec["extents"] += [CHUNK] * len(pieces)
        if whole < len(joined):
            _stage(txn, store, ino, rec, joined[whole:])
    _save(txn, store, ino, rec)
    return sum(rec["extents"]) + rec["pending"]


def commit(op, txn: lmdb.Transaction, store) -> Stat:
    ino, rec = _load(txn, store, op.upload)
    _finish_extent(txn, store, ino, rec)
    txn.delete(ino_key(ino), db=store.db("uploads"))
    return inodes.link(txn, store, rec["path"], ino, rec["owner"], rec["extents"]).stat(rec["path"])


def abort(op, txn: lmdb.Transaction, store) -> None:
    ino, rec = _load(txn, store, op.upload)
    _drop_staged(txn, store, ino, rec)
    txn.delete(ino_key(ino), db=store.db("uploads"))
    inodes.free_data(txn, store, ino)


def open_uploads(txn: lmdb.Transaction, store) -> list[int]:
    """The ids of the uploads not yet committed or aborted."""
    with txn.cursor(db=store.db("uploads")) as cur:
        return [key_ino(k) for k in cur.iternext(values=False) if len(k) == 8]


def gc_orphans(txn: lmdb.Transaction, store) -> int:
    """Abort every open upload and free every inode no path points to; returns how many inodes."""
    freed = set(open_uploads(txn, store))
    txn.drop(store.db("uploads"), delete=False)
    freed |= inodes.data_inodes(txn, store) - inodes.referenced(txn, store)
    for ino in freed:
        inodes.free_data(txn, store, ino)
    return len(freed)


def _load(txn: lmdb.Transaction, store, upload) -> tuple[int, dict]:
    if not isinstance(upload, int) or isinstance(upload, bool) or not 0 < upload < 1 << 64:
        raise InvalidArgument(f"upload must be an upload id (a positive int), not {quote(upload)}")
    raw = txn.get(ino_key(upload), db=store.db("uploads"))
    if raw is None:
        raise NotFound(f"no such upload: {upload} (committed, aborted, idle for too long, or the kernel restarted)")
    return upload, msgpack.unpackb(raw)


def _save(txn: lmdb.Transaction, store, ino: int, rec: dict) -> None:
    txn.put(ino_key(ino), msgpack.packb(rec), db=store.db("uploads"))


def _piece_key(ino: int, index: int) -> bytes:
    return ino_key(ino) + index.to_bytes(_PIECE, "big")


def _stage(txn: lmdb.Transaction, store, ino: int, rec: dict, data: memoryview) -> None:
    if len(data):
        txn.put(_piece_key(ino, rec["staged"]), data, db=store.db("uploads"))
        rec["staged"] += 1
        rec["pending"] += len(data)


def _staged(txn: lmdb.Transaction, store, ino: int, rec: dict) -> list[bytes]:
    db = store.db("uploads")
    return [txn.get(_piece_key(ino, i), db=db) for i in range(rec["staged"])]


def _drop_staged(txn: lmdb.Transaction, store, ino: int, rec: dict) -> None:
    db = store.db("uploads")
    for i in range(rec["staged"]):
        txn.delete(_piece_key(ino, i), db=db)
    rec["staged"] = rec["pending"] = 0


def _finish_extent(txn: lmdb.Transaction, store, ino: int, rec: dict) -> None:
    """Write what is staged as the next extent (nothing if nothing is staged)."""
    if rec["pending"]:
        extent = b"".join(_staged(txn, store, ino, rec))
        inodes.write_extents(txn, store, ino, len(rec["extents"]), [extent])
        rec["extents"].append(len(extent))
        _drop_staged(txn, store, ino, rec)
    rec["custom"] = False
