"""The fs syscalls' logic: check who may, read through FS, write through the Writer, keep the open uploads.

Every path is normalised (``normpath``: EINVAL for a bad one) and checked by ``may`` (EPERM naming the
rule) before anything is read or written. Reads of at most one piece (PIECE, 1 MiB) run in the loop;
bigger ranges are read a piece at a time in a thread, each piece in its own read transaction (a reader
held open for a slow client would keep the writer from growing the map), and a piece waits while the
client has BACKLOG_BYTES of replies unread. Writes go through the kernel's Writer, which groups them.

Synthesised entries: ``/`` lists the namespaces, ``/var/log/kernel`` is the log ring as text, and
``/proc/<pid>/...`` comes from the journal (``proc_file``/``proc_list``) when it offers them, else from
what is stored under /proc.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from llmos.drivers.storage import UPLOAD_IDLE_S, Stat, may, normpath, ops
from llmos.drivers.storage.layout import Inode, dir_stat
from llmos.drivers.storage.paths import dir_prefix, key
from llmos.drivers.model.from_store import ref_name
from llmos.kernel import messages as m
from llmos.syscalls.errors import Busy, DeviceError, InvalidArgument, NotFound, NotPermitted, TryAgain, quote_path
from llmos.syscalls.table import FS_PIECE

Emit = Callable[[Any], Awaitable[None]]

PIECE = FS_PIECE  # bytes of file data per reply frame
BACKLOG_BYTES = 4 * FS_PIECE  # a big read waits while the client has this much unread
MAX_UPLOADS_PER_USER = 8  # open uploads one user may hold (an abandoned one is aborted after UPLOAD_IDLE_S)
KERNEL_LOG = "/var/log/kernel"
ROOTS = ("/data", "/home", "/models", "/proc", "/var")
_VIRTUAL_DIRS = {"/": [dir_stat(p) for p in ROOTS], "/var": [dir_stat("/var/log")]}


@dataclass
class Upload:
    """An open upload: the connection (bus identity) and user that began it, its path, when it was last used."""

    id: int
    identity: bytes
    user: str
    path: str
    last_used: float


def wire_stat(s: Stat) -> dict[str, Any]:
    return {"path": s.path, "kind": s.kind, "size": s.size, "owner": s.owner, "mtime": s.mtime,
            "extents": list(s.extents)}


class Files:
    """The fs syscalls over one kernel (``kernel``: its ``store``, ``writer``, ``fs``, ``logring``, the
    ProcessManager's ``admins`` and, when there, the ``journal`` and the ``bus``). Lives on the kernel's loop."""

    def __init__(self, kernel: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.k = kernel
        self.clock = clock
        self.uploads: dict[int, Upload] = {}

    @property
    def admins(self) -> frozenset[str]:
        return getattr(self.k.procman, "admins", frozenset())

    async def _not_in_use(self, path: str) -> None:
        """EBUSY for a write or removal touching the files of a store model that is loaded: its workers map its
        weights in place (drivers/model/from_store.py), so its pages must not be freed and reused under them."""
        if path != "/models" and not path.startswith("/models/"):
            return
        for model in [d["model"] for d in await self.k.models.ask(m.ListModels())]:
            name = ref_name(model)
            if name is not None and (path == "/models" or path == f"/models/{name}" or
                                     path.startswith(f"/models/{name}/")):
                raise Busy(f"model {name} is loaded and its workers read its weights in place from the store: "
                           f"unload it first (`llmos unload {name}`), then change or remove {quote_path(path)}")

    # -- put ---------------------------------------------------------------------------------------------
    async def put(self, user: str, identity: bytes, args: dict) -> dict[str, Any]:
        path, data, upload, last = normpath(args["path"]), args["data"], args["upload"], args["last"]
        if upload is None:
            self._may_write(user, path)
            await self._not_in_use(path)
            if last:
                return {"upload": None, **wire_stat(await self.k.writer.do(ops.Put(path, data, user)))}
            self._room_for_upload(user)
            uid = await self.k.writer.do(ops.Begin(path, user))
            self.uploads[uid] = Upload(uid, identity, user, path, self.clock())
            try:
                await self.k.writer.do(ops.Append(uid, data, args["new_extent"]))
            except BaseException:
                self.uploads.pop(uid, None)
                self.k.writer.submit(ops.Abort(uid))
                raise
            return {"upload": uid}
        up = self._upload(upload, identity, user, path)
        up.last_used = self.clock()
        try:
            if data or args["new_extent"]:
                await self.k.writer.do(ops.Append(upload, data, args["new_extent"]))
            if not last:
                return {"upload": upload}
            self._may_write(user, path)  # the file may have been made someone else's since the upload began
            stat = await self.k.writer.do(ops.Commit(upload))
        except NotFound:
            self.uploads.pop(upload, None)  # the writer aborted it (idle too long)
            raise
        except NotPermitted:
            self.uploads.pop(upload, None)
            self.k.writer.submit(ops.Abort(upload))
            raise
        self.uploads.pop(upload, None)
        return {"upload": None, **wire_stat(stat)}

    def _upload(self, upload: int, identity: bytes, user: str, path: str) -> Upload:
        up = self.uploads.get(upload)
        if up is None:
            raise NotFound(f"no such upload: {upload} (committed, aborted after {UPLOAD_IDLE_S:.0f} s idle, or "
                           f"never begun): start again with upload null")
        if up.identity != identity or up.user != user:
            raise NotPermitted(f"upload {upload} belongs to another connection: an upload is continued only by "
                               f"the connection that began it")
        if up.path != path:
            raise InvalidArgument(f"upload {upload} writes {quote_path(up.path)}, not {quote_path(path)}")
        return up

    def _room_for_upload(self, user: str) -> None:
        now = self.clock()
        for uid in [u.id for u in self.uploads.values() if now - u.last_used >= UPLOAD_IDLE_S]:
            del self.uploads[uid]  # the writer aborts these on its own
        mine = [u for u in self.uploads.values() if u.user == user]
        if len(mine) >= MAX_UPLOADS_PER_USER:
            wait = UPLOAD_IDLE_S - (now - min(u.last_used for u in mine))
            raise TryAgain(f"{user} has {len(mine)} uploads open, the most allowed: finish one (last=true), or "
                           f"retry in {max(wait, 1):.0f} s, when the oldest idle one is aborted")

    def _may_write(self, user: str, path: str) -> None:
        if path == KERNEL_LOG or path in _VIRTUAL_DIRS:
            may(user, "write", path, self.admins, "kernel")
        existing = self._inode(path)
        may(user, "write", path, self.admins, existing.owner if existing is not None else None)

    # -- get ---------------------------------------------------------------------------------------------
    async def get(self, user: str, args: dict, emit: Emit, backlog: Callable[[], int] = lambda: 0) -> dict:
        path, offset, length = normpath(args["path"]), args["offset"], args["length"]
        synthetic = self._synthetic_file(user, path)
        if synthetic is not None:
            data, mtime = synthetic
            ident = None
            size = len(data)
        else:
            inode = self._readable_inode(user, path)
            data, mtime, size, ident = None, inode.mtime, inode.size, inode.ino
        start = min(offset, size)
        end = size if length is None else min(size, start + length)
        pos = start
        while end - pos > PIECE:  # every piece but the last goes as a chunk
            if data is not None:
                piece = data[pos:pos + PIECE]
            else:
                piece = await asyncio.to_thread(self._read_piece, path, ident, pos, PIECE)
            await emit({"data": piece})
            pos += len(piece)
            await self._drain(backlog)
        if data is not None:
            last = data[pos:end]
        elif pos == end:
            last = b""
        elif end - start > PIECE:  # the tail of a big range: in the thread, as the pieces before it
            last = await asyncio.to_thread(self._read_piece, path, ident, pos, end - pos)
        else:  # a range of one piece: read in the loop, no thread hop
            last = self._read_piece(path, ident, pos, end - pos)
        return {"path": path, "size": size, "mtime": mtime, "offset": start, "length": end - start, "data": last}

    def _read_piece(self, path: str, ino: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the file at ``path``, which must still be inode ``ino``."""
        store = self.k.store
        with store.read() as txn:
            raw = txn.get(key(path), db=store.db("meta"))
            if raw is None or Inode.unpack(raw).ino != ino:
                raise DeviceError(f"{quote_path(path)} was {'removed' if raw is None else 'replaced'} while it was "
                                  f"being read (at byte {offset}): read it again")
            out, base = [], 0
            for view in self.k.fs.extents(txn, path):
                lo, hi = max(offset - base, 0), min(offset + length - base, len(view))
                if lo < hi:
                    out.append(view[lo:hi])
                base += len(view)
                if base >= offset + length:
                    break
            return b"".join(out)

    async def _drain(self, backlog: Callable[[], int]) -> None:
        delay = 0.001
        while backlog() > BACKLOG_BYTES:  # the bus says nothing when a client reads: look again, less often
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- list, stat, remove ---------------------------------------------------------------------------------
    async def list(self, user: str, args: dict) -> dict[str, Any]:
        path, limit = normpath(args["path"]), args["limit"]
        if path in _VIRTUAL_DIRS:
            entries = self._virtual_children(path)
        else:
            entries = self._listing(user, path, limit + 1)
        entries.sort(key=lambda s: s.path)
        return {"path": path, "entries": [wire_stat(s) for s in entries[:limit]], "truncated": len(entries) > limit}

    def _virtual_children(self, path: str) -> list[Stat]:
        out = []
        for d in _VIRTUAL_DIRS[path]:
            try:
                out.append(self._dir_stat(d.path))
            except NotFound:
                out.append(dir_stat(d.path))
        return out

    def _listing(self, user: str, path: str, limit: int) -> list[Stat]:
        pid = _proc_pid(path)
        journal = self._journal()
        if pid is not None and path == f"/proc/{pid}" and journal is not None:
            # the owner's and the admin's: its files' sizes would tell others how long a prompt or an output is
            may(user, "read", path, self.admins, self._proc_owner(pid))
            stored = self._stored_listing(path, limit, missing_ok=True)
            seen = {s.path for s in stored}
            synth = [self._stat_of_proc(pid, n) for n in journal.proc_list(pid) or () if f"{path}/{n}" not in seen]
            found = stored + [s for s in synth if s is not None]
            if not found:
                raise NotFound(f"no such process directory: {quote_path(path)}")
            return found
        inode = self._inode(path)
        may(user, "read", path, self.admins, self._owner_for_read(path, inode))
        if path == "/var/log":
            stored = self._stored_listing(path, limit, missing_ok=True)
            return [s for s in stored if s.path != KERNEL_LOG] + [self._kernel_log_stat()]
        return self._stored_listing(path, limit, missing_ok=path in ROOTS or path == "/proc")

    def _stored_listing(self, path: str, limit: int, missing_ok: bool = False) -> list[Stat]:
        try:
            return self.k.fs.list(path, limit)
        except NotFound:
            if missing_ok:
                return []
            raise

    async def stat(self, user: str, args: dict) -> dict[str, Any]:
        path = normpath(args["path"])
        if path in _VIRTUAL_DIRS:
            return wire_stat(dir_stat(path, len(_VIRTUAL_DIRS[path])))
        if path == "/var/log":
            return wire_stat(dir_stat(path, len(self._listing(user, path, 10_000))))
        if path == KERNEL_LOG:
            return wire_stat(self._kernel_log_stat())
        pid = _proc_pid(path)
        if pid is not None and self._journal() is not None:
            if path == f"/proc/{pid}":  # the process's directory: what the journal makes up and what is stored
                return wire_stat(dir_stat(path, len(self._listing(user, path, 10_000))))
            if path.count("/") == 3:
                may(user, "read", path, self.admins, self._proc_owner(pid))
                stat = self._stat_of_proc(pid, path.rsplit("/", 1)[1])
                if stat is not None:
                    return wire_stat(stat)
        inode = self._inode(path)
        may(user, "read", path, self.admins, self._owner_for_read(path, inode))
        if inode is not None:
            return wire_stat(inode.stat(path))
        return wire_stat(self._dir_stat(path))

    def _dir_stat(self, path: str) -> Stat:
        try:
            return self.k.fs.stat(path)
        except NotFound:
            if path in ROOTS:
                return dir_stat(path, 0)
            if path == "/var/log":
                return dir_stat(path, 1)
            raise

    async def remove(self, user: str, args: dict) -> dict[str, Any]:
        path, recursive = normpath(args["path"]), args["recursive"]
        if path == KERNEL_LOG or path in _VIRTUAL_DIRS:
            may(user, "write", path, self.admins, "kernel")
        self._may_remove(user, path)  # EPERM before EBUSY: a loaded model is nobody's business but the admin's
        await self._not_in_use(path)
        admins, store = self.admins, self.k.store

        def checked_remove(txn: Any) -> int:
            # the check and the removal in one transaction: no file can slip in between (a /data file is
            # removed only by its owner or the admin, so a recursive remove checks each one)
            meta = store.db("meta")
            raw = txn.get(key(path), db=meta) if path != "/" else None
            may(user, "remove", path, admins, Inode.unpack(raw).owner if raw is not None else None)
            if recursive:
                prefix = dir_prefix(path)
                with txn.cursor(db=meta) as cur:
                    ok = cur.set_range(prefix)
                    while ok and bytes(cur.key()).startswith(prefix):
                        may(user, "remove", bytes(cur.key()).decode(), admins, Inode.unpack(cur.value()).owner)
                        ok = cur.next()
            return ops.apply(ops.Remove(path, recursive), txn, store)

        removed = await self.k.writer.do(ops.Call(checked_remove))
        return {"path": path, "removed": removed}

    async def rename(self, user: str, args: dict) -> dict[str, Any]:
        src, dst, replace = normpath(args["src"]), normpath(args["dst"]), args["replace"]
        for path in (src, dst):
            if path == KERNEL_LOG or path in _VIRTUAL_DIRS:
                may(user, "write", path, self.admins, "kernel")
        self._may_remove(user, src)
        self._may_write(user, dst)
        await self._not_in_use(src)
        await self._not_in_use(dst)
        admins, store = self.admins, self.k.store

        def checked_rename(txn: Any) -> int:
            # the checks and the move in one transaction: every file that goes away (under src, and under dst
            # when replaced) must be removable by the caller, and every new path writable (/data is sticky)
            for name, inode in ops.tree(txn, store, src):
                may(user, "remove", name, admins, inode.owner)
                may(user, "write", dst + name[len(src):], admins, None)
            if replace:
                for name, inode in ops.tree(txn, store, dst):
                    may(user, "remove", name, admins, inode.owner)
            return ops.apply(ops.Rename(src, dst, replace), txn, store)

        moved = await self.k.writer.do(ops.Call(checked_rename))
        return {"src": src, "dst": dst, "moved": moved}

    def _may_remove(self, user: str, path: str) -> None:
        existing = self._inode(path)
        may(user, "remove", path, self.admins, existing.owner if existing is not None else None)

    # -- dmesg -------------------------------------------------------------------------------------------
    async def dmesg(self, args: dict, emit: Emit, backlog: Callable[[], int] = lambda: 0) -> dict[str, Any]:
        ring = self.k.logring
        if not args["follow"]:
            lines, seq = ring.tail(args["n"], args["since"])
            return {"lines": lines, "seq": seq}
        q = ring.subscribe()  # before the tail: a line logged in between is in one of them (seq tells which)
        try:
            lines, seq = ring.tail(args["n"], args["since"])
            if lines:
                await emit({"lines": lines})
            while True:
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                fresh = [line for s, line in batch if s > seq]
                if fresh:
                    seq = max(s for s, _ in batch)
                    await emit({"lines": fresh})
                await self._drain(backlog)
        finally:
            ring.unsubscribe(q)

    # -- helpers ------------------------------------------------------------------------------------------
    def _inode(self, path: str) -> Inode | None:
        if path == "/":
            return None
        store = self.k.store
        with store.read() as txn:
            raw = txn.get(key(path), db=store.db("meta"))
            return Inode.unpack(raw) if raw is not None else None

    def _owner_for_read(self, path: str, inode: Inode | None) -> str | None:
        """Who ``may`` is told owns ``path`` for a read: the file's owner; under /proc/<pid>, the process's."""
        pid = _proc_pid(path)
        if pid is not None:
            return self._proc_owner(pid) or (inode.owner if inode is not None else None)
        return inode.owner if inode is not None else None

    def _readable_inode(self, user: str, path: str) -> Inode:
        inode = self._inode(path)
        may(user, "read", path, self.admins, self._owner_for_read(path, inode))
        if inode is None:
            if path in ROOTS or path == "/var/log" or self._stored_listing(path, 1, missing_ok=True):
                raise InvalidArgument(f"{quote_path(path)} is a directory (EISDIR): list it with fs_list")
            raise NotFound(f"no such file: {quote_path(path)}")
        return inode

    def _synthetic_file(self, user: str, path: str) -> tuple[bytes, float] | None:
        """(bytes, mtime) of a file the kernel makes up on reading, or None for a stored one."""
        if path == KERNEL_LOG:
            may(user, "read", path, self.admins, "kernel")
            return self.k.logring.text(), time.time()
        pid = _proc_pid(path)
        journal = self._journal()
        if pid is not None and journal is not None and path.count("/") == 3:
            may(user, "read", path, self.admins, self._proc_owner(pid))
            data = journal.proc_file(pid, path.rsplit("/", 1)[1])
            if data is not None:
                return bytes(data), time.time()
        return None

    def _kernel_log_stat(self) -> Stat:
        return Stat(KERNEL_LOG, len(self.k.logring.text()), "kernel", time.time(), [], "file")

    def _journal(self) -> Any:
        journal = getattr(self.k, "journal", None)
        return journal if journal is not None and hasattr(journal, "proc_file") else None

    def _proc_owner(self, pid: int) -> str | None:
        journal = self._journal()
        if journal is None:
            return None
        owner_of = getattr(journal, "proc_owner", None)
        if owner_of is not None:
            return owner_of(pid)
        raw = journal.proc_file(pid, "record")
        try:
            return json.loads(raw)["owner"] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None

    def _stat_of_proc(self, pid: int, name: str) -> Stat | None:
        data = self._journal().proc_file(pid, name)
        if data is None:
            return None
        return Stat(f"/proc/{pid}/{name}", len(data), self._proc_owner(pid) or "kernel", time.time(), [], "file")


def _proc_pid(path: str) -> int | None:
    """The pid of a /proc/<pid>[/...] path, else None."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "proc" and parts[2].isdigit():
        return int(parts[2])
    return None

