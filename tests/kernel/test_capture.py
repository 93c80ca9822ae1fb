"""The kernel's side of captures, without sockets: admission and the byte caps, pieces written through the real
storage Writer into a real LMDB store, results that wait for the store, and pieces that must be dropped."""

import asyncio
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from llmos.drivers.model.capture_spec import file_bytes, npy_header
from llmos.drivers.model.protocol import CaptureDone, Captured
from llmos.drivers.storage import FS, Store, Writer, store_dir
from llmos.kernel.capture import INDEX_RESERVE, Captures, Request
from llmos.kernel.config import KernelConfig
from llmos.kernel.procman import ProcessManager
from llmos.syscalls.errors import InvalidArgument, NotFound

INFO = {"engine": "paged", "layers": 2, "heads": 4, "capture": ["attentions", "hidden_states"]}
BOTH = Request(("attentions", "hidden_states"), None, None)


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="llmos-capture-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(home, body, max_bytes=1 << 20, per_user=4 << 20):
    """Run ``body(captures, fs)`` in a loop with a real store, writer and (empty) process table."""
    async def main():
        store = Store(store_dir(home), map_size=8 << 20).open()
        writer = Writer(store).start()
        procman = ProcessManager(KernelConfig()).start()
        try:
            return await body(Captures(writer, FS(store), procman, max_bytes=max_bytes,
                                       max_bytes_per_user=per_user), FS(store))
        finally:
            await procman.stop()
            writer.stop()
            store.close()
    return asyncio.run(main())


def pieces(pid, key, kind, layer, arr, size=100):
    """The Captured frames of ``arr`` as the worker sends them: its .npy bytes in pieces of ``size``."""
    data = npy_header(arr.shape) + arr.astype(np.float32).tobytes()
    out = []
    for start in range(0, len(data), size):
        piece = data[start:start + size]
        out.append(Captured(pid, key, kind, layer, start, list(arr.shape), "float32", piece,
                            start + len(piece) == len(data)))
    return out


def test_a_capture_stored_in_pieces_is_whole_once_its_result_is_complete(home):
    rng = np.random.default_rng(0)
    hidden, attn = rng.standard_normal((5, 32)).astype(np.float32), rng.random((5, 2, 5)).astype(np.float32)

    async def body(cap, fs):
        ticket = await cap.admit("alice", BOTH, INFO, session=False)
        assert ticket.params["max_bytes"] == (1 << 20) - INDEX_RESERVE and ticket.params["key"] == ticket.key
        cap.bind(ticket, 7)
        for msg in pieces(7, ticket.key, "hidden_states", 2, hidden) + pieces(7, ticket.key, "attentions", 0, attn):
            cap.receive(msg)
        cap.receive(CaptureDone(7, ticket.key, 5, 2, [3, 1], ["capture stopped at 5 tokens"]))
        result = await cap.complete({"pid": 7, "warnings": ["max_new_tokens was cut"]})
        assert result["warnings"] == ["max_new_tokens was cut", "capture stopped at 5 tokens"]
        got = np.load(io.BytesIO(fs.read("/proc/7/capture/hidden_states/2.npy")))
        assert np.array_equal(got, hidden) and fs.stat("/proc/7/capture/hidden_states/2.npy").owner == "alice"
        assert np.array_equal(np.load(io.BytesIO(fs.read("/proc/7/capture/attentions/0.npy"))), attn)
        index = json.loads(fs.read("/proc/7/capture/index.json"))
        assert index["tokens"] == 5 and index["heads"] == [3, 1]
        assert index["layers"] == {"hidden_states": [2], "attentions": [0]}
        # a second reader of the result (stream, then wait) gets the same warnings
        assert (await cap.complete({"pid": 7}))["warnings"] == ["capture stopped at 5 tokens"]
        assert (await cap.complete({"pid": 8, "warnings": []})) == {"pid": 8, "warnings": []}

    run(home, body)


def test_the_per_user_cap_counts_stored_captures_and_reservations_then_leaves_nothing_with_a_warning(home):
    arr = np.ones((40, 100), np.float32)  # a 16,128-byte file

    async def body(cap, fs):
        # not bound to pids: the (empty) process table would say their processes have ended (next test)
        a = await cap.admit("bob", BOTH, INFO, session=False)
        assert a.params["max_bytes"] == 40_000 - INDEX_RESERVE and "per-process cap" in a.params["limit_doc"]
        await cap.admit("bob", BOTH, INFO, session=False)  # 100,000 - 40,000 reserved by a
        c = await cap.admit("bob", BOTH, INFO, session=False)
        assert c.params["max_bytes"] == 20_000 - INDEX_RESERVE and "what is left of bob's cap" in c.params["limit_doc"]
        cap.release(c)  # its spawn failed: the room comes back
        assert (await cap.admit("carol", BOTH, INFO, session=False)).params is not None  # other users are apart
        for msg in pieces(1, a.key, "hidden_states", 0, arr, size=4096):
            cap.receive(msg)
        cap.receive(CaptureDone(1, a.key, 40, 1, [], []))
        await cap.complete({"pid": 1})
        stored = fs.stat("/proc/1/capture/hidden_states/0.npy").size + fs.stat("/proc/1/capture/index.json").size
        assert stored == file_bytes((40, 100)) + len(fs.read("/proc/1/capture/index.json"))
        d = await cap.admit("bob", BOTH, INFO, session=False)  # a's reservation gave way to what it stored
        assert d.params["max_bytes"] == 40_000 - INDEX_RESERVE
        # 100,000 - 40,000 (b) - stored (a) - 40,000 (d) = 3,765 bytes: less than an index needs
        e = await cap.admit("bob", BOTH, INFO, session=False)
        assert e.params is None and "nothing captured: bob's captures hold" in e.warnings[0]
        cap.bind(e, 5)
        assert (await cap.complete({"pid": 5}))["warnings"] == e.warnings

    run(home, body, max_bytes=40_000, per_user=100_000)


def test_a_reservation_whose_process_ended_unwaited_without_a_capture_goes_back_at_the_next_admission(home):
    async def body(cap, fs):
        t = await cap.admit("gil", BOTH, INFO, session=False)
        cap.bind(t, 41)  # the process table has no pid 41: it ended (KILLed) and was reaped, nobody waited
        u = await cap.admit("gil", BOTH, INFO, session=False)
        assert u.params["max_bytes"] == 60_000 - INDEX_RESERVE  # all the room again, not 60,000 - 40,000
        assert (await cap.complete({"pid": 41}))["warnings"] == [
            "nothing captured: the process ended before its worker sent the capture"]

    run(home, body, max_bytes=60_000, per_user=100_000)


def test_a_capture_whose_process_ended_without_it_is_given_up_and_its_late_pieces_dropped(home):
    async def body(cap, fs):
        t = await cap.admit("dan", BOTH, INFO, session=False)
        cap.bind(t, 3)
        result = await cap.complete({"pid": 3, "warnings": []})  # a KILL ends it before the worker sends
        assert result["warnings"] == ["nothing captured: the process ended before its worker sent the capture"]
        for msg in pieces(3, t.key, "hidden_states", 0, np.zeros((2, 4), np.float32)):
            cap.receive(msg)
        cap.receive(CaptureDone(3, t.key, 2, 1, [], []))
        await asyncio.sleep(0)  # nothing was scheduled: there is no task to wait for
        with pytest.raises(NotFound):
            fs.stat("/proc/3/capture")
        unknown = pieces(9, 12345, "hidden_states", 0, np.zeros((2, 4), np.float32))  # an earlier kernel's key
        for msg in unknown:
            cap.receive(msg)
        assert (await cap.admit("dan", BOTH, INFO, session=False)).params["max_bytes"] > 0  # nothing reserved

    run(home, body)


def test_pieces_out_of_order_or_past_their_shape_lose_that_file_only_with_a_warning(home):
    good, bad = np.arange(64, dtype=np.float32).reshape(8, 8), np.ones((8, 8), np.float32)

    async def body(cap, fs):
        t = await cap.admit("eve", BOTH, INFO, session=False)
        cap.bind(t, 6)
        swapped = pieces(6, t.key, "hidden_states", 1, bad)
        swapped[1], swapped[2] = swapped[2], swapped[1]
        grown = pieces(6, t.key, "attentions", 1, np.ones((2, 2, 2), np.float32))
        grown[-1].data += b"\0" * 8
        for msg in pieces(6, t.key, "hidden_states", 0, good) + swapped + grown:
            cap.receive(msg)
        cap.receive(CaptureDone(6, t.key, 8, 3, [], []))
        warnings = (await cap.complete({"pid": 6}))["warnings"]
        assert warnings == ["hidden_states/1 not stored: its pieces came out of order",
                            "attentions/1 not stored: more bytes than its shape holds"]
        assert np.array_equal(np.load(io.BytesIO(fs.read("/proc/6/capture/hidden_states/0.npy"))), good)
        assert [s.path for s in fs.walk("/proc/6")] == ["/proc/6/capture/hidden_states/0.npy",
                                                        "/proc/6/capture/index.json"]

    run(home, body)


@pytest.mark.parametrize("req, info, session, message", [
    (BOTH, {**INFO, "engine": "sequential", "capture": ["hidden_states"]}, False,
     "the sequential engine cannot capture attentions.*the paged engine captures"),
    (BOTH, INFO, True, "a session cannot capture"),
    (Request(("attentions",), (2,), None), INFO, False, r"capture_layers \[2\] out of range: the model has 2 layers"),
    (Request(("attentions",), None, (9,)), INFO, False, r"capture_heads \[9\] out of range"),
])
def test_admission_refuses_what_the_model_cannot_capture(home, req, info, session, message):
    async def body(cap, fs):
        with pytest.raises(InvalidArgument, match=message):
            await cap.admit("frank", req, info, session)
        assert not cap._live  # nothing reserved

    run(home, body)


@pytest.mark.parametrize("args, message", [
    ({"capture": ["attention"]}, "distinct kinds among attentions, hidden_states"),
    ({"capture": ["hidden_states", "hidden_states"]}, "distinct kinds"),
    ({"capture": [], "capture_layers": [0]}, "need capture"),
    ({"capture": ["hidden_states"], "capture_heads": [0]}, "needs capture of attentions"),
    ({"capture": ["hidden_states"], "capture_layers": [-1]}, "numbers from 0"),
])
def test_a_bad_capture_request_is_einval_before_anything_loads(args, message):
    with pytest.raises(InvalidArgument, match=message):
        Captures.request(dict(args))


def test_a_spawn_without_capture_takes_none_of_its_fields():
    args = {"capture": (), "capture_layers": None, "capture_heads": None, "max_new_tokens": 3}
    assert Captures.request(args) is None and args == {"max_new_tokens": 3}
