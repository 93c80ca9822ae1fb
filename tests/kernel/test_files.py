"""The fs syscalls' logic (kernel/files.py) over a real store and writer, without sockets: permissions, ranges,
pieces, uploads tied to their connection, the per-user upload bound, synthesised entries."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmos.drivers.storage import FS, UPLOAD_IDLE_S, Store, Writer, ops, store_dir
from llmos.kernel.files import BACKLOG_BYTES, MAX_UPLOADS_PER_USER, PIECE, Files
from llmos.kernel.log import LogRing
from llmos.syscalls.errors import Busy, DeviceError, Exists, InvalidArgument, NotFound, NotPermitted, TryAgain
from llmos.syscalls.schema import validate
from llmos.syscalls.table import BY_NAME

A, B = b"conn-a", b"conn-b"  # two connections' bus identities


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Journal:
    """What the lead's journal offers the namespace: a process's synthesised files and its owner."""

    def __init__(self) -> None:
        self.files = {7: {"record": json.dumps({"pid": 7, "owner": "alice"}).encode(), "tokens": b"1 2 3"}}

    def proc_file(self, pid: int, name: str) -> bytes | None:
        return self.files.get(pid, {}).get(name)

    def proc_list(self, pid: int) -> list[str]:
        return sorted(self.files.get(pid, {}))


class Models:
    """What the models actor answers ListModels with: the loaded models (store ones as store:/models/<name>)."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    async def ask(self, msg) -> list[dict]:
        return [{"model": name} for name in self.loaded]


@pytest.fixture
def kernel():
    home = Path(tempfile.mkdtemp(prefix="llmos-files-test-"))
    store = Store(store_dir(home), map_size=8 << 20).open()
    writer = Writer(store).start()
    k = SimpleNamespace(store=store, writer=writer, fs=FS(store), procman=SimpleNamespace(admins=frozenset({"root"})),
                        logring=LogRing(store, writer), journal=None, models=Models())
    yield k
    writer.stop()
    store.close()
    shutil.rmtree(home, ignore_errors=True)


def run(coro):
    return asyncio.run(coro)


def args(call: str, **given) -> dict:
    return validate(BY_NAME[call].request, given)  # what the dispatcher hands a handler


def put(files: Files, user: str, path: str, data: bytes, conn: bytes = A, **more) -> dict:
    return run(files.put(user, conn, args("fs_put", path=path, data=data, **more)))


def get(files: Files, user: str, path: str, **more) -> tuple[dict, list[bytes]]:
    chunks: list[bytes] = []

    async def emit(d):
        chunks.append(d["data"])

    reply = run(files.get(user, args("fs_get", path=path, **more), emit))
    return reply, chunks


def test_a_put_is_read_back_whole_and_by_ranges_cut_at_the_end_of_the_file(kernel):
    f = Files(kernel)
    st = put(f, "alice", "/home/alice/notes.txt", b"0123456789")
    assert st["upload"] is None and st["size"] == 10 and st["owner"] == "alice" and st["kind"] == "file"
    assert get(f, "alice", "/home/alice/notes.txt")[0]["data"] == b"0123456789"
    reply, chunks = get(f, "alice", "/home/alice//notes.txt", offset=3, length=4)
    assert (reply["data"], reply["offset"], reply["length"], reply["size"], chunks) == (b"3456", 3, 4, 10, [])
    assert get(f, "alice", "/home/alice/notes.txt", offset=8, length=100)[0]["data"] == b"89"
    assert get(f, "alice", "/home/alice/notes.txt", offset=50)[0]["data"] == b""


def test_a_big_range_comes_as_pieces_of_at_most_one_mib_the_last_in_the_reply(kernel):
    f = Files(kernel)
    blob = bytes(range(256)) * (PIECE * 3 // 256) + b"tail"
    put(f, "root", "/models/m/weights", blob)
    reply, chunks = get(f, "root", "/models/m/weights", offset=5, length=len(blob) - 7)
    assert [len(c) for c in chunks] == [PIECE, PIECE] and 0 < len(reply["data"]) <= PIECE
    assert b"".join(chunks) + reply["data"] == blob[5:-2] and reply["length"] == len(blob) - 7


def test_a_file_replaced_while_a_big_range_is_read_fails_the_read_instead_of_mixing_two_files(kernel):
    f = Files(kernel)
    put(f, "alice", "/home/alice/big", b"a" * (3 * PIECE))

    async def scenario():
        async def emit(d):  # after the first piece, someone replaces the file
            await kernel.writer.do(ops.Put("/home/alice/big", b"b" * (3 * PIECE), "alice"))

        await f.get("alice", args("fs_get", path="/home/alice/big"), emit)

    with pytest.raises(DeviceError, match="replaced while it was being read"):
        run(scenario())


def test_a_big_read_waits_while_the_client_has_too_much_unread(kernel):
    f = Files(kernel)
    put(f, "alice", "/home/alice/big", b"x" * (3 * PIECE))
    held = [BACKLOG_BYTES + 1] * 5 + [0] * 100  # the client is behind for five looks, then reads
    seen: list[int] = []

    def backlog() -> int:
        seen.append(held[len(seen)])
        return seen[-1]

    emitted: list[int] = []

    async def emit(d):
        emitted.append(len(seen))  # how many looks had been taken when each piece went

    run(f.get("alice", args("fs_get", path="/home/alice/big"), emit, backlog))
    assert emitted[0] == 0 and emitted[1] == 6  # the second piece went only once the backlog fell


@pytest.mark.parametrize("user, path, rule", [
    ("bob", "/home/alice/x", "alice's home"),
    ("alice", "/models/m/config.json", "only the admin writes /models"),
    ("alice", "/var/log/kernel", "only the kernel writes /var/log"),
    ("alice", "/proc/7/tokens", "only the kernel writes /proc"),
])
def test_writes_outside_what_a_user_may_write_are_eperm_naming_the_rule(kernel, user, path, rule):
    with pytest.raises(NotPermitted, match=rule):
        put(Files(kernel), user, path, b"x")
    assert not FS(kernel.store).list("/", 100)  # nothing was written


def test_another_users_home_is_not_readable_but_the_admin_reads_it(kernel):
    f = Files(kernel)
    put(f, "alice", "/home/alice/x", b"secret")
    for call in (lambda: get(f, "bob", "/home/alice/x"), lambda: run(f.stat("bob", args("fs_stat", path="/home/alice/x"))),
                 lambda: run(f.list("bob", args("fs_list", path="/home/alice")))):
        with pytest.raises(NotPermitted, match="alice's home"):
            call()
    assert get(f, "root", "/home/alice/x")[0]["data"] == b"secret"


def test_data_is_sticky_only_the_owner_or_the_admin_replaces_or_removes_a_file(kernel):
    f = Files(kernel)
    put(f, "alice", "/data/set/a.txt", b"alice's")
    put(f, "bob", "/data/set/b.txt", b"bob's")
    with pytest.raises(NotPermitted, match="belongs to alice"):
        put(f, "bob", "/data/set/a.txt", b"overwritten")
    with pytest.raises(NotPermitted, match="belongs to alice"):
        run(f.remove("bob", args("fs_remove", path="/data/set", recursive=True)))
    assert get(f, "bob", "/data/set/b.txt")[0]["data"] == b"bob's"  # the refused remove took nothing
    assert run(f.remove("bob", args("fs_remove", path="/data/set/b.txt")))["removed"] == 1
    assert run(f.remove("root", args("fs_remove", path="/data/set", recursive=True)))["removed"] == 1


def test_an_upload_is_invisible_until_committed_and_belongs_to_its_connection(kernel):
    f = Files(kernel)
    up = put(f, "alice", "/home/alice/big", b"one,", last=False)["upload"]
    assert up and not FS(kernel.store).list("/", 10)  # nothing visible yet
    with pytest.raises(NotPermitted, match="another connection"):
        put(f, "alice", "/home/alice/big", b"two,", conn=B, upload=up, last=False)
    with pytest.raises(InvalidArgument, match="writes '/home/alice/big'"):
        put(f, "alice", "/home/alice/other", b"", upload=up)
    put(f, "alice", "/home/alice/big", b"two,", upload=up, last=False, new_extent=True)
    st = put(f, "alice", "/home/alice/big", b"three", upload=up)
    assert st["upload"] is None and st["size"] == 13 and st["extents"] == [4, 9]
    assert get(f, "alice", "/home/alice/big")[0]["data"] == b"one,two,three"
    with pytest.raises(NotFound, match="no such upload"):
        put(f, "alice", "/home/alice/big", b"more", upload=up)


def test_a_user_may_hold_only_so_many_open_uploads_and_an_idle_one_stops_counting(kernel):
    clock = Clock()
    f = Files(kernel, clock=clock)
    for i in range(MAX_UPLOADS_PER_USER):
        put(f, "alice", f"/home/alice/u{i}", b"x", last=False)
    with pytest.raises(TryAgain, match=f"{MAX_UPLOADS_PER_USER} uploads open"):
        put(f, "alice", "/home/alice/one-more", b"x", last=False)
    put(f, "bob", "/home/bob/u", b"x", last=False)  # another user's bound is their own
    put(f, "alice", "/home/alice/whole", b"x")  # a whole-file put is no upload
    clock.now += UPLOAD_IDLE_S
    assert put(f, "alice", "/home/alice/one-more", b"x", last=False)["upload"]


def test_bad_paths_are_einval_and_missing_ones_enoent(kernel):
    f = Files(kernel)
    for path, what in (("relative", "relative"), ("/home/a/../b", "'..'"), ("/etc/passwd", "no such namespace")):
        with pytest.raises(InvalidArgument, match=what):
            get(f, "alice", path)
    with pytest.raises(NotFound):
        get(f, "alice", "/home/alice/none")
    put(f, "alice", "/home/alice/d/x", b"1")
    with pytest.raises(InvalidArgument, match="is a directory"):
        get(f, "alice", "/home/alice/d")
    with pytest.raises(NotFound):
        run(f.remove("alice", args("fs_remove", path="/home/alice/none")))


def test_the_root_lists_the_namespaces_and_var_log_kernel_is_the_log_ring(kernel):
    f = Files(kernel)

    async def scenario():
        kernel.logring.start()
        from llmos.kernel.log import get_logger

        get_logger("test").info("hello_ring", n=1)
        names = [e["path"] for e in (await f.list("alice", args("fs_list", path="/")))["entries"]]
        listing = (await f.list("alice", args("fs_list", path="/var/log")))["entries"]
        text, _ = [], None

        async def emit(d):
            text.append(d["data"])

        reply = await f.get("alice", args("fs_get", path="/var/log/kernel"), emit)
        await kernel.logring.stop()
        return names, listing, b"".join(text) + reply["data"]

    names, listing, text = run(scenario())
    assert names == ["/data", "/home", "/models", "/proc", "/var"]
    assert [(e["path"], e["kind"]) for e in listing] == [("/var/log/kernel", "file")]
    assert json.loads(text.decode().splitlines()[-1])["event"] == "hello_ring"
    with pytest.raises(NotPermitted):
        run(f.remove("root", args("fs_remove", path="/var/log/kernel")))


def test_proc_files_come_from_the_journal_and_only_the_owner_and_the_admin_read_them(kernel):
    kernel.journal = Journal()
    f = Files(kernel)
    assert get(f, "alice", "/proc/7/tokens")[0]["data"] == b"1 2 3"
    assert [e["path"] for e in run(f.list("alice", args("fs_list", path="/proc/7")))["entries"]] == \
        ["/proc/7/record", "/proc/7/tokens"]
    assert run(f.stat("root", args("fs_stat", path="/proc/7/tokens")))["size"] == 5
    assert run(f.stat("alice", args("fs_stat", path="/proc/7")))["size"] == 2
    with pytest.raises(NotPermitted, match="alice's process"):
        get(f, "bob", "/proc/7/tokens")
    with pytest.raises(NotFound):
        run(f.list("alice", args("fs_list", path="/proc/8")))


def rename(files: Files, user: str, src: str, dst: str, replace: bool = False) -> dict:
    return run(files.rename(user, args("fs_rename", src=src, dst=dst, replace=replace)))


def test_rename_moves_a_tree_atomically_over_the_old_one_only_with_replace(kernel):
    f = Files(kernel)
    put(f, "alice", "/data/keep/a", b"old")
    put(f, "alice", "/data/.import-keep-1/a", b"new")
    put(f, "alice", "/data/.import-keep-1/b", b"new b")
    with pytest.raises(Exists):
        rename(f, "alice", "/data/.import-keep-1", "/data/keep")
    assert get(f, "alice", "/data/keep/a")[0]["data"] == b"old"
    assert rename(f, "alice", "/data/.import-keep-1", "/data/keep", replace=True) == \
        {"src": "/data/.import-keep-1", "dst": "/data/keep", "moved": 2}
    assert [e["path"] for e in run(f.list("alice", args("fs_list", path="/data")))["entries"]] == ["/data/keep"]
    assert get(f, "bob", "/data/keep/b")[0]["data"] == b"new b"
    with pytest.raises(NotFound):
        rename(f, "alice", "/data/.import-keep-1", "/data/keep", replace=True)


def test_rename_needs_remove_on_every_source_file_and_write_on_every_replaced_one(kernel):
    f = Files(kernel)
    put(f, "alice", "/data/a/x", b"alice's")
    put(f, "bob", "/data/b/y", b"bob's")
    put(f, "root", "/models/m/config.json", b"{}")
    with pytest.raises(NotPermitted, match="belongs to alice"):
        rename(f, "bob", "/data/a", "/data/c")  # bob may not take alice's files away
    with pytest.raises(NotPermitted, match="belongs to alice"):
        rename(f, "bob", "/data/b", "/data/a", replace=True)  # nor replace them
    with pytest.raises(NotPermitted, match="only the admin writes /models"):
        rename(f, "bob", "/data/b", "/models/m2")
    with pytest.raises(NotPermitted, match="only the admin writes /models"):
        rename(f, "bob", "/models/m", "/data/m")
    with pytest.raises(NotPermitted, match="alice's home"):
        rename(f, "bob", "/data/b", "/home/alice/b")
    assert get(f, "root", "/data/a/x")[0]["data"] == b"alice's" and get(f, "root", "/data/b/y")[0]["data"] == b"bob's"
    assert rename(f, "root", "/data/b", "/data/a", replace=True)["moved"] == 1  # the admin may


def test_a_loaded_store_model_is_busy_for_rename_and_remove_but_a_user_hears_eperm_first(kernel):
    f = Files(kernel)
    put(f, "root", "/models/m/config.json", b"{}")
    put(f, "root", "/models/.import-m-1/config.json", b"{ }")
    kernel.models.loaded = ["store:/models/m"]
    with pytest.raises(Busy, match="unload it first"):
        rename(f, "root", "/models/.import-m-1", "/models/m", replace=True)
    with pytest.raises(Busy):
        rename(f, "root", "/models/m", "/models/n")
    with pytest.raises(Busy):
        run(f.remove("root", args("fs_remove", path="/models/m", recursive=True)))
    for call in (lambda: run(f.remove("alice", args("fs_remove", path="/models/m", recursive=True))),
                 lambda: run(f.remove("alice", args("fs_remove", path="/models/m/config.json"))),
                 lambda: rename(f, "alice", "/models/.import-m-1", "/models/m", replace=True)):
        with pytest.raises(NotPermitted):
            call()
    kernel.models.loaded = []
    assert rename(f, "root", "/models/.import-m-1", "/models/m", replace=True)["moved"] == 1
    assert get(f, "root", "/models/m/config.json")[0]["data"] == b"{ }"
