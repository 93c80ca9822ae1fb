"""The kernel's log lines stay small whatever a client sends."""

import io
import json

from llmos.kernel.log import FIELD_CHARS, Logger, bounded


def test_every_field_of_a_log_line_is_bounded():
    out = io.StringIO()
    Logger("t", stream=out).info("spawn", owner="u" * 8_000_000, ids=list(range(1_000_000)),
                                 nested={"k": "v" * 100_000}, pid=3, ok=True)
    line = out.getvalue()
    assert len(line) < 10 * FIELD_CHARS
    rec = json.loads(line)
    assert rec["pid"] == 3 and rec["ok"] is True and "8000000 characters" in rec["owner"]


def test_small_fields_are_logged_as_they_are():
    assert bounded("alice") == "alice" and bounded([1, 2]) == [1, 2] and bounded(None) is None


# -- the log ring (a real store and writer; no sockets) ----------------------------------------------------
import asyncio  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from llmos.drivers.storage import Store, Writer, store_dir  # noqa: E402
from llmos.kernel.log import LogRing  # noqa: E402


@pytest.fixture
def store():
    home = Path(tempfile.mkdtemp(prefix="llmos-ring-test-"))
    s = Store(store_dir(home), map_size=8 << 20).open()
    yield s
    s.close()
    shutil.rmtree(home, ignore_errors=True)


def stored(store) -> list[dict]:
    with store.read() as txn:
        return [json.loads(bytes(v)) for _, v in txn.cursor(db=store.db("log"))]


def test_ring_lines_reach_the_store_in_order_in_a_few_batched_commits(store):
    writer = Writer(store).start()
    log = Logger("t", stream=io.StringIO())

    async def scenario():
        ring = LogRing(store, writer).start()
        for i in range(300):
            log.info("line", i=i)
        await ring.stop()

    asyncio.run(scenario())
    writer.stop()
    lines = stored(store)
    assert [r["i"] for r in lines] == list(range(300)) and [r["seq"] for r in lines] == list(range(1, 301))
    assert writer.stats["commits"] <= 3  # never a commit per line


def test_the_ring_keeps_its_last_lines_and_numbering_goes_on_after_a_restart(store):
    log = Logger("t", stream=io.StringIO())

    async def life(lines: int) -> tuple[list[str], int]:
        writer = Writer(store).start()
        ring = LogRing(store, writer, size=10, flush_s=0.0).start()
        for i in range(lines):
            log.info("line", i=i)
            if i % 7 == 0:
                await asyncio.sleep(0.01)  # several batches, each trimming the ring
        await ring.stop()
        writer.stop()
        return ring.tail(5)

    asyncio.run(life(25))
    assert [r["seq"] for r in stored(store)] == list(range(16, 26))
    tail, newest = asyncio.run(life(3))  # a new kernel on the same store
    assert [r["seq"] for r in stored(store)] == list(range(19, 29)) and newest == 28
    assert [json.loads(t)["seq"] for t in tail] == [24, 25, 26, 27, 28]


def test_tail_includes_lines_not_yet_in_the_store_and_since_continues_where_a_reader_left_off(store):
    writer = Writer(store).start()
    log = Logger("t", stream=io.StringIO())

    async def scenario():
        ring = LogRing(store, writer, flush_s=3600).start()  # nothing reaches the store during the test
        log.info("a")
        log.info("b")
        first, seq = ring.tail(100)
        log.info("c")
        later, seq2 = ring.tail(100, since=seq)
        none, seq3 = ring.tail(100, since=seq2)
        await ring.stop()
        return first, seq, later, seq2, none, seq3

    first, seq, later, seq2, none, seq3 = asyncio.run(scenario())
    writer.stop()
    assert [json.loads(x)["event"] for x in first] == ["a", "b"] and seq == 2
    assert [json.loads(x)["event"] for x in later] == ["c"] and seq2 == 3 and none == [] and seq3 == 3
    assert [r["event"] for r in stored(store)] == ["a", "b", "c"]  # stop() flushed them


def test_logging_never_fails_or_waits_when_the_store_cannot_take_the_ring(store):
    writer = Writer(store).start()
    writer.stop()  # every op is refused from now on
    out = io.StringIO()
    log = Logger("t", stream=out)

    async def scenario():
        ring = LogRing(store, writer, flush_s=0.0).start()
        for i in range(50):
            log.info("line", i=i)
        await asyncio.sleep(0.05)
        await ring.stop()
        return ring.lost

    lost = asyncio.run(scenario())
    assert len(out.getvalue().splitlines()) == 50 and lost == 50 and stored(store) == []
