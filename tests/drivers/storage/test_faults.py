"""Faults: a full map resized under load, a reader killed mid-transaction, a full disk at commit,
and no lmdb exception escaping the package for any of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import lmdb
import pytest

from llmos.drivers.storage import FS, Store, StorageError, Writer, ops, store_dir
from llmos.syscalls.errors import Errno, LLMOSError, NoSpace
from tests.drivers.storage.procs import pattern

ROOT = Path(__file__).resolve().parents[3]


def spawn(role: str, path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.drivers.storage.procs", role, str(path)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def expect_line(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline()  # blocks until the child says it reached the state (or died: "")
    assert line.strip() == word, f"child said {line!r}, not {word!r}"


def test_a_full_map_is_resized_under_load_with_readers_in_threads_and_processes(home):
    store = Store(store_dir(home), map_size=1 << 20).open()
    writer = Writer(store).start()
    fs = FS(store)
    writer.submit(ops.Put("/data/seed", pattern("seed", 10), "t")).result(10)
    other = spawn("reader", store.path)
    stop, thread_errors, thread_reads = threading.Event(), [], [0]

    def read_all_along():
        while not stop.is_set():
            try:
                for st in fs.walk("/data"):
                    assert fs.read(st.path) == pattern(st.path.rsplit("/", 1)[1], st.size), st.path
                    thread_reads[0] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                thread_errors.append(repr(exc))

    threads = [threading.Thread(target=read_all_along) for _ in range(2)]
    try:
        expect_line(other, "ready")
        for t in threads:
            t.start()
        size, written = 256 << 10, 0
        for batch in range(25):  # 50 MiB in 200 values, 8 submitted together each time
            futs = [writer.submit(ops.Put(f"/data/v{batch}-{i}", pattern(f"v{batch}-{i}", size), "t"))
                    for i in range(8)]
            written += sum(f.result(30).size for f in futs)
        assert written == 50 << 20
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        (home / "stop").touch()
        out, _ = other.communicate(timeout=60)
        writer.stop()
    summary = json.loads(out.strip().splitlines()[-1])
    assert thread_errors == [] and summary["errors"] == []
    assert store.map_grows >= 5 and store.map_size >= 50 << 20
    assert summary["map_adoptions"] >= 1 and summary["files_seen"] == 201  # the other process read it all
    assert thread_reads[0] > 0 and summary["reads"] > 201
    assert all(fs.read(f"/data/v24-{i}") == pattern(f"v24-{i}", size) for i in range(8))
    store.close()


def test_a_reader_killed_mid_transaction_is_cleared_at_the_next_open_and_its_pages_reused(home):
    path = store_dir(home)
    with Store(path) as s:
        s.write_txn(lambda txn: ops.apply(ops.Put("/data/x", b"1" * (1 << 20), "t"), txn, s))
    keeper = spawn("keep", path)  # another process holds the environment open, as a model worker does
    expect_line(keeper, "open")
    holder = spawn("hold", path)
    try:
        expect_line(holder, "holding")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        store = Store(path).open()
        try:
            assert store.stale_readers_cleared == 1  # what lmdb's reader_check reported at open
            assert store.readers() == 0
            writer = Writer(store).start()
            sizes = []
            for i in range(60):
                writer.submit(ops.Put("/data/x", bytes([i]) * (1 << 20), "t")).result(30)
                sizes.append(store.file_bytes())
            writer.stop()
            assert FS(store).read("/data/x", 5, 1) == bytes([59])
            # pages freed by each replace are reused: the file stops growing (60 MiB were written)
            assert sizes[-1] == sizes[20] and sizes[-1] < 8 << 20, sizes
        finally:
            store.close()
    finally:
        keeper.communicate(timeout=30)
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_long_held_read_never_hangs_a_reader_process_that_must_remap(home, monkeypatch):
    from llmos.drivers.storage import env as env_module

    monkeypatch.setattr(env_module, "ADOPT_WAIT_S", 0.3)
    path = store_dir(home)
    with Store(path, map_size=1 << 20) as s:
        s.write_txn(lambda txn: ops.apply(ops.Put("/data/w", pattern("w", 10), "t"), txn, s))
    small = Store(path, readonly=True, map_size=1 << 20).open()
    held = small.read()
    held.__enter__()  # pinned, as a model's zero-copy weights are
    try:
        grower = spawn("grow", path)
        expect_line(grower, "written")
        grower.wait(30)
        result = {}
        reader = threading.Thread(target=lambda: result.update(err=pytest.raises(StorageError, FS(small).read,
                                                                                 "/data/g15")))
        reader.start()
        reader.join(30)
        assert not reader.is_alive() and "bigger map_size" in result["err"].value.message
    finally:
        held.__exit__(None, None, None)
    assert FS(small).read("/data/g15") == pattern("g15", 1 << 20)  # nothing pinned now: it remaps
    small.close()
    with Store(path, readonly=True) as big:  # the default read-only map is address space enough never to remap
        assert big.map_size >= 1 << 40 and FS(big).read("/data/g3", 0, 9) == pattern("g3", 9)


@pytest.fixture
def small_disk():
    """A 4 MiB tmpfs, unmounted (and removed) afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="llmos-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and mount rights): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
    os.rmdir(mnt)


def test_a_full_disk_fails_the_commit_with_enospc_and_the_store_stays_whole(small_disk):
    path = small_disk / "store"
    store = Store(path, map_size=1 << 20).open()
    writer = Writer(store).start()
    committed, failure = {}, None
    try:
        for i in range(100):
            name, data = f"/data/f{i}", pattern(f"f{i}", 200_000)
            try:
                writer.submit(ops.Put(name, data, "t")).result(30)
                committed[name] = data
            except LLMOSError as exc:
                failure = exc
                break
        assert isinstance(failure, NoSpace) and failure.errno is Errno.ENOSPC and not isinstance(failure, lmdb.Error)
        assert "no space left" in failure.message and 3 <= len(committed) <= 20  # 4 MiB holds at most 20 x 200 kB
        fs = FS(store)
        assert all(fs.read(name) == data for name, data in committed.items())
        # the writer keeps serving: in one batch, a small write fits and a big one fails alone
        release = threading.Event()
        held = writer.submit(ops.Call(lambda txn: release.wait(10)))
        small = writer.submit(ops.Put("/data/small", pattern("small", 3000), "t"))
        big = writer.submit(ops.Put("/data/big", pattern("big", 3 << 20), "t"))
        release.set()
        held.result(30)
        assert small.result(30).size == 3000 and isinstance(big.exception(30), NoSpace)
        committed["/data/small"] = pattern("small", 3000)
        writer.submit(ops.Remove("/data/f0")).result(30)  # removing data makes room again
        del committed["/data/f0"]
        writer.submit(ops.Put("/data/again", pattern("again", 100_000), "t")).result(30)
        committed["/data/again"] = pattern("again", 100_000)
    finally:
        writer.stop()
        store.close()
    with Store(path) as reopened:
        fs = FS(reopened)
        assert {s.path for s in fs.walk("/data")} == set(committed)
        assert all(fs.read(name) == data for name, data in committed.items())


def test_the_packages_public_functions_raise_only_llmos_errors_for_faults(home):
    faults = []

    def expect(fn, kind=StorageError):
        try:
            fn()
        except LLMOSError as exc:
            assert isinstance(exc, kind) and not isinstance(exc, lmdb.Error), exc
            faults.append(exc.errno.name)
            return
        raise AssertionError(f"{fn} raised nothing")

    (home / "junk").mkdir()
    (home / "junk" / "data.mdb").write_bytes(b"not an lmdb file" * 1000)
    expect(lambda: Store(home / "junk").open())  # corrupt / not LMDB
    expect(lambda: Store(home / "missing", readonly=True).open())  # nothing to open read-only
    with Store(store_dir(home)) as s:
        s.write_txn(lambda txn: ops.apply(ops.Put("/data/x", b"abc" * 1000, "t"), txn, s))
        s.write_txn(lambda txn: txn.delete(b"\0\0\0\0\0\0\0\1\0\0\0\0", db=s.db("data")))  # lose an extent
        expect(lambda: FS(s).read("/data/x"))
        expect(lambda: s.write_txn(lambda txn: txn.put(b"", b"empty keys are an lmdb error", db=s.db("sys"))))
        s.write_txn(lambda txn: txn.put(b"/data/bad", b"\xc1 not msgpack", db=s.db("meta")))
        expect(lambda: FS(s).stat("/data/bad"))  # a corrupt record
        expect(lambda: FS(s).list("/data"))
    assert faults == ["EIO"] * 6


def test_disk_full_is_told_apart_from_a_failing_disk_by_the_free_space(home):
    from llmos.drivers.storage import storage_error

    eio = lmdb.Error("mdb_txn_commit", 5) if hasattr(lmdb.Error, "code") else lmdb.Error("mdb_txn_commit")
    assert type(storage_error(eio, home)) is StorageError  # plenty of space here: a failing device
    enospc = OSError(28, "No space left on device")
    assert isinstance(storage_error(enospc, home), NoSpace)
