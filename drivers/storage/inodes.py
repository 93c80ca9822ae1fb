"""Inode bookkeeping inside a write transaction: numbers, links from paths, freeing data.

Every function takes the open write transaction and the Store (for its database handles) and acts
only through that transaction, so a failed or rerun transaction leaves nothing behind.
"""

from __future__ import annotations

import lmdb
import msgpack

from llmos.drivers.storage.layout import Inode, data_key, ino_key, key_ino, new_inode
from llmos.drivers.storage.paths import dir_prefix, key, parents
from llmos.syscalls.errors import InvalidArgument, quote_path


def next_number(txn: lmdb.Transaction, store, name: str) -> int:
    """Take the next value of counter ``name`` in the sys database (first value 1)."""
    sys_db = store.db("sys")
    raw = txn.get(name.encode(), db=sys_db)
    value = msgpack.unpackb(raw) if raw is not None else 1
    txn.put(name.encode(), msgpack.packb(value + 1), db=sys_db)
    return value


def lookup(txn: lmdb.Transaction, store, path: str) -> Inode | None:
    raw = txn.get(key(path), db=store.db("meta"))
    return Inode.unpack(raw) if raw is not None else None


def is_dir(txn: lmdb.Transaction, store, path: str) -> bool:
    """True when some file lives under ``path/`` (directories are implied by their files)."""
    prefix = dir_prefix(path)
    with txn.cursor(db=store.db("meta")) as cur:
        return cur.set_range(prefix) and bytes(cur.key()).startswith(prefix)


def check_placeable(txn: lmdb.Transaction, store, path: str) -> None:
    """EINVAL unless a file may live at ``path``: not the root, not a directory, no file as an ancestor."""
    if path == "/":
        raise InvalidArgument("'/' is a directory, not a file")
    if is_dir(txn, store, path):
        raise InvalidArgument(f"{quote_path(path)} is a directory (EISDIR): it holds files")
    meta = store.db("meta")
    for parent in parents(path):
        if txn.get(key(parent), db=meta) is not None:
            raise InvalidArgument(f"{quote_path(parent)} is a file, so {quote_path(path)} cannot be made under it "
                                  f"(ENOTDIR)")


def free_data(txn: lmdb.Transaction, store, ino: int) -> int:
    """Delete every extent of ``ino`` (however many there are); returns how many."""
    data, prefix, gone = store.db("data"), ino_key(ino), 0
    with txn.cursor(db=data) as cur:
        if cur.set_range(prefix):
            while bytes(cur.key()).startswith(prefix):
                if not cur.delete():  # delete moves the cursor to the next record
                    break
                gone += 1
    return gone


def write_extents(txn: lmdb.Transaction, store, ino: int, first: int, pieces: list) -> None:
    """Write ``pieces`` (bytes-like) as extents ``first, first+1, ...`` of ``ino``."""
    data = store.db("data")
    for i, piece in enumerate(pieces):
        txn.put(data_key(ino, first + i), piece, db=data)


def link(txn: lmdb.Transaction, store, path: str, ino: int, owner: str, extents: list[int],
         checked: bool = False) -> Inode:
    """Point ``path`` at ``ino`` (atomically replacing what it pointed to; the old data is freed).
    ``checked``: check_placeable already ran in this transaction."""
    if not checked:
        check_placeable(txn, store, path)
    old = lookup(txn, store, path)
    if old is not None and old.ino != ino:
        free_data(txn, store, old.ino)
    inode = new_inode(ino, owner, extents)
    txn.put(key(path), inode.pack(), db=store.db("meta"))
    return inode


def unlink(txn: lmdb.Transaction, store, path: str, inode: Inode) -> None:
    txn.delete(key(path), db=store.db("meta"))
    free_data(txn, store, inode.ino)


def referenced(txn: lmdb.Transaction, store) -> set[int]:
    """Every inode some path points to."""
    with txn.cursor(db=store.db("meta")) as cur:
        return {Inode.unpack(v).ino for _, v in cur}


def data_inodes(txn: lmdb.Transaction, store) -> set[int]:
    """Every inode that has extents in the data database (one seek per inode, not one per extent)."""
    found: set[int] = set()
    with txn.cursor(db=store.db("data")) as cur:
        ok = cur.first()
        while ok:
            ino = key_ino(cur.key())
            found.add(ino)
            ok = cur.set_range(ino_key(ino + 1)) if ino + 1 < 1 << 64 else False
    return found
