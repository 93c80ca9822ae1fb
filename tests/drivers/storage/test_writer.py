"""The Writer: one thread, group commit, each op's own result or error, stop drains, idle uploads end."""

import asyncio
import threading

import pytest

from llmos.drivers.storage import FS, StorageError, Writer, ops
from llmos.syscalls.errors import InvalidArgument, NotFound


def hold_the_writer(writer):
    """Submit an op that keeps the writer busy until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def block(txn):
        started.set()
        assert release.wait(10)

    fut = writer.submit(ops.Call(block))
    assert started.wait(10)
    return release, fut


def test_ops_submitted_together_land_in_fewer_commits_each_with_its_own_result(writer, fs):
    release, held = hold_the_writer(writer)
    futs = [writer.submit(ops.Put(f"/data/f{i}", b"x" * i, "alice")) for i in range(200)]
    before = writer.stats["commits"]
    release.set()
    stats = [f.result(10) for f in futs]
    held.result(10)
    assert [s.path for s in stats] == [f"/data/f{i}" for i in range(200)] and stats[5].size == 5
    assert writer.stats["commits"] - before <= 2  # the 200 were queued while one commit ran
    assert writer.stats["mean_ops_per_commit"] > 50 and writer.stats["ops"] == 201
    assert fs.read("/data/f199") == b"x" * 199


def test_a_failing_op_fails_alone_and_its_partial_writes_are_rolled_back(writer, store, fs):
    release, held = hold_the_writer(writer)

    def half_then_fail(txn):
        txn.put(b"/data/half", b"not a record", db=store.db("meta"))
        raise ValueError("the journal's bug")

    futs = [writer.submit(ops.Put("/data/a", b"A", "alice")),
            writer.submit(ops.Remove("/data/missing")),
            writer.submit(ops.Call(half_then_fail)),
            writer.submit(ops.Put("relative", b"", "alice")),
            writer.submit(ops.Put("/data/b", b"B", "alice")),
            writer.submit(ops.Call(lambda txn: "journal says hi"))]
    release.set()
    held.result(10)
    assert futs[0].result(10).size == 1 and futs[4].result(10).size == 1
    assert isinstance(futs[1].exception(10), NotFound)
    assert isinstance(futs[2].exception(10), ValueError)
    assert isinstance(futs[3].exception(10), InvalidArgument)
    assert futs[5].result(10) == "journal says hi"
    assert [s.path for s in fs.list("/data")] == ["/data/a", "/data/b"]  # no /data/half


def test_remove_takes_a_file_or_a_whole_subtree(writer, fs):
    for p in ("/home/u/a", "/home/u/d/b", "/home/u/d/e/c", "/home/u/dx"):
        writer.submit(ops.Put(p, b"1", "u")).result(10)
    with pytest.raises(InvalidArgument, match="recursive"):
        writer.submit(ops.Remove("/home/u/d")).result(10)
    assert writer.submit(ops.Remove("/home/u/d", recursive=True)).result(10) == 2
    assert [s.path for s in fs.list("/home/u")] == ["/home/u/a", "/home/u/dx"]
    assert writer.submit(ops.Remove("/home/u/a")).result(10) == 1
    with pytest.raises(NotFound):
        writer.submit(ops.Remove("/home/u/a")).result(10)


def test_a_file_cannot_be_made_over_a_directory_or_under_a_file(writer):
    writer.submit(ops.Put("/data/d/f", b"", "a")).result(10)
    with pytest.raises(InvalidArgument, match="directory"):
        writer.submit(ops.Put("/data/d", b"", "a")).result(10)
    with pytest.raises(InvalidArgument, match="is a file"):
        writer.submit(ops.Put("/data/d/f/g", b"", "a")).result(10)


def test_replacing_a_file_frees_its_old_data(writer, store, fs):
    writer.submit(ops.Put("/data/r", b"1" * (3 << 20), "a")).result(10)
    writer.submit(ops.Put("/data/r", b"2", "a")).result(10)
    with store.read() as txn:
        assert txn.stat(store.db("data"))["entries"] == 1
    assert fs.read("/data/r") == b"2"


def test_flush_returns_once_everything_before_it_is_committed(writer, fs):
    futs = [writer.submit(ops.Put(f"/data/q{i}", b"q", "a")) for i in range(50)]
    writer.submit(ops.Flush()).result(10)
    assert all(f.done() for f in futs) and len(fs.list("/data")) == 50


def test_do_awaits_an_op_from_an_asyncio_loop(writer, fs):
    async def main():
        stats = await asyncio.gather(*(writer.do(ops.Put(f"/data/as{i}", b"z", "a")) for i in range(20)))
        with pytest.raises(NotFound):
            await writer.do(ops.Remove("/data/none"))
        return stats

    assert len(asyncio.run(main())) == 20 and fs.stat("/data").size == 20


def test_stop_commits_what_is_queued_then_later_submits_fail(store, fs):
    writer = Writer(store).start()
    release, held = hold_the_writer(writer)
    futs = [writer.submit(ops.Put(f"/data/s{i}", b"s", "a")) for i in range(30)]
    stopper = threading.Thread(target=writer.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert not stopper.is_alive() and all(f.result(0) for f in futs)
    assert isinstance(writer.submit(ops.Flush()).exception(0), StorageError)
    assert fs.stat("/data").size == 30


def test_an_idle_upload_is_aborted_by_the_writer(store, fs):
    now = [1000.0]
    writer = Writer(store, clock=lambda: now[0], upload_idle_s=300).start()
    try:
        idle = writer.submit(ops.Begin("/data/idle", "a")).result(10)
        writer.submit(ops.Append(idle, b"abc")).result(10)
        now[0] += 200
        busy = writer.submit(ops.Begin("/data/busy", "a")).result(10)
        now[0] += 150  # idle: 350 s since its last Append; busy: 150 s
        writer.submit(ops.Flush()).result(10)
        writer.submit(ops.Flush()).result(10)  # the check runs after each batch
        assert writer.stats["idle_uploads_aborted"] == 1
        with pytest.raises(NotFound, match="no such upload"):
            writer.submit(ops.Append(idle, b"more")).result(10)
        writer.submit(ops.Append(busy, b"ok")).result(10)
        assert writer.submit(ops.Commit(busy)).result(10).size == 2
    finally:
        writer.stop()
