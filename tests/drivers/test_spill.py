"""The spill area (drivers/model/spill.py): a swapped-out context's KV written to the worker's own LMDB environment
when the host swap area has no room or host memory is short, read back exactly on resume; a spill the disk cannot
take, or cannot give back, falls back to recompute with the same output. Tiny real model, real LMDB, real disks."""

import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
import zmq

from llmos.drivers.model.engine import load_engine
from llmos.drivers.model.protocol import PAD_BLOCK, blocks_for
from llmos.drivers.model.spill import SpillArea, remove_stale, spill_root
from tests.drivers.test_context_switch import drain, step_until_tokens, tokens

GREEDY = {"temperature": 0.0, "ignore_eos": True}
SAMPLED = {"temperature": 1.3, "top_p": 0.95, "seed": 11, "ignore_eos": True}
HUGE = 1 << 62  # a spill_below_bytes no host reaches: host memory is always "short", spilling is forced


def scramble_free_blocks(engine):
    """Fill every pool block no sequence holds with noise: KV that came back must have come from the spill
    area, not from blocks that happened to keep their old contents."""
    held = {b for t in engine.pool.tables.values() for b in t} | {PAD_BLOCK}
    free = torch.tensor([b for b in range(engine.pool.num_blocks) if b not in held], dtype=torch.long)
    for cache in (*engine.k_cache, *engine.v_cache):
        cache.index_copy_(0, free, torch.randn(len(free), cache.shape[1], dtype=cache.dtype))


@pytest.fixture
def spilling(tiny_model, tmp_path):
    """A paged engine with no host swap area and its spill area under tmp_path (spilling forced)."""
    engines = []

    def make(**kw):
        # the prefix cache off: scrambled free blocks include cached ones, and recompute counts are exact
        opts = {"block_size": 4, "num_blocks": 64, "swap_blocks": 0, "spill_below_bytes": HUGE, "measure": False,
                "spill_dir": tmp_path / f"spill{len(engines)}" / "4242", "prefix_cache": False, **kw}
        e = load_engine(tiny_model, engine="paged", **opts)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()
        assert not e.spill or not e.spill.path.exists()


def run(engine, pid, prompt, params, n):
    engine.add(pid, prompt, {**params, "max_new_tokens": n})
    return tokens(drain(engine), pid)


def switched(engine, prompt, params, n, after=5, pid=1):
    """Run ``prompt``, preempt it (swap) after ``after`` tokens, scramble the freed blocks, resume it; its tokens,
    the preemption event, its computed tokens then, and the events after the resume."""
    engine.add(pid, prompt, {**params, "max_new_tokens": n})
    events = step_until_tokens(engine, pid, after)
    computed = engine.seqs[pid].computed
    ev = engine.preempt(pid, "swap")
    assert engine.seqs[pid].parked and not engine.pool.tables.get(pid)
    scramble_free_blocks(engine)
    engine.resume(pid, 0)
    after_resume = drain(engine)
    return tokens(events + after_resume, pid), ev, computed, after_resume


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_preempted_sequence_spills_to_disk_and_resumes_with_the_uninterrupted_tokens(spilling, params):
    e = spilling()
    prompt = e.encode("spilled to the store")
    ref = run(e, 9, prompt, params, 16)
    got, ev, computed, after = switched(e, prompt, params, 16)
    assert (ev.preempted, ev.recomputed) == ("swap", 0)  # to the kernel a spill is a swap: its KV is kept
    assert got == ref
    assert sum(x.prefilled for x in after) == 0  # read back, nothing recomputed
    s = e.stats()
    assert (s["spills"], s["spilled_blocks"], s["spill_bytes_used"], s["spill_failures"]) == (1, 0, 0, 0)
    assert (s["swap_used"], s["swaps_out"], s["swaps_in"], s["recomputed_tokens"]) == (0, 1, 1, 0)
    assert e.spill.path.is_dir() and stat.S_IMODE(e.spill.path.stat().st_mode) == 0o700
    assert stat.S_IMODE((e.spill.path / "data.mdb").stat().st_mode) == 0o600


def test_while_spilled_the_stats_count_its_blocks_and_bytes_and_the_store_holds_one_value_per_block(spilling):
    e = spilling()
    e.add(1, e.encode("counted"), {**GREEDY, "max_new_tokens": 40})
    step_until_tokens(e, 1, 5)
    need = blocks_for(e.seqs[1].computed, 4)
    e.preempt(1, "swap")
    s = e.stats()
    block_bytes = 4 * e.kv_token_bytes  # keys and values of every layer, 4 token slots
    assert (s["spills"], s["spilled_blocks"], s["spill_bytes_used"]) == (1, need, need * block_bytes)
    with e.spill._store.read() as txn:
        values = [bytes(v) for _, v in txn.cursor(db=e.spill._store.db("spill"))]
    assert len(values) == need and {len(v) for v in values} == {block_bytes}
    e.abort(1)  # an ended sequence's blocks leave the area
    assert e.stats()["spilled_blocks"] == 0 and e.stats()["spill_bytes_used"] == 0
    with e.spill._store.read() as txn:
        assert not list(txn.cursor(db=e.spill._store.db("spill")))


def test_the_choice_order_is_host_swap_then_spill_then_recompute(spilling):
    e = spilling(swap_blocks=1000, spill_below_bytes=0)  # host area with room, host memory never short
    prompt = e.encode("order")
    ref = run(e, 9, prompt, GREEDY, 12)
    got, ev, _, _ = switched(e, prompt, GREEDY, 12)
    assert got == ref and ev.preempted == "swap" and e.stats()["spills"] == 0 and e.swaps_in == 1
    e.spill.below_bytes = HUGE  # host memory short: the host area (still with room) is passed over
    got, ev, _, _ = switched(e, prompt, GREEDY, 12)
    assert got == ref and ev.preempted == "swap" and e.stats()["spills"] == 1 and e.swap_used == 0
    e.spill.budget_bytes = 0  # nor any room on disk: dropped
    got, ev, computed, after = switched(e, prompt, GREEDY, 12)
    assert got == ref and (ev.preempted, ev.recomputed) == ("recompute", computed) and after[0].prefilled == computed
    assert e.stats()["spill_failures"] == 1


def test_a_victim_of_memory_pressure_spills_and_both_outputs_stay_exact(spilling):
    e = spilling(num_blocks=9)  # 8 blocks: 32 slots for two contexts of about 25 tokens
    refs = {pid: run(e, 9, e.encode(text), GREEDY, 15) for pid, text in ((1, "first one"), (2, "second one"))}
    e.add(1, e.encode("first one"), {**GREEDY, "max_new_tokens": 15})
    e.add(2, e.encode("second one"), {**GREEDY, "max_new_tokens": 15}, priority=5)  # ranks last
    events = drain(e)
    assert [(ev.pid, ev.preempted) for ev in events if ev.preempted] == [(2, "swap")]
    assert e.seqs[2].spilled and e.stats()["spills"] == 1
    scramble_free_blocks(e)
    e.resume(2, 5)
    events += drain(e)
    assert {pid: tokens(events, pid) for pid in (1, 2)} == refs and e.stats()["spilled_blocks"] == 0


def test_a_spilled_session_turn_keeps_its_common_prefix_and_drops_the_rest_from_the_area(spilling):
    e = spilling()
    first = e.encode("session")
    e.add(1, first, {**GREEDY, "max_new_tokens": 12}, session=True)
    reply = tokens(drain(e), 1)
    e.preempt(1, "swap")
    assert e.stats()["spilled_blocks"] == blocks_for(len(first) + 11, 4)
    context = first + reply[:3] + e.encode("more")  # the next turn diverges 3 tokens into the reply
    kept = len(first) + 3
    e.append(1, context, {**GREEDY, "max_new_tokens": 6})
    assert e.seqs[1].computed == kept and e.stats()["spilled_blocks"] == blocks_for(kept, 4)
    scramble_free_blocks(e)
    e.resume(1, 0)
    turn = drain(e)
    assert sum(ev.prefilled for ev in turn) == len(context) - kept  # the prefix came back from disk
    fresh = run(e, 2, context, GREEDY, 6)
    assert tokens(turn, 1) == fresh
    e.abort(1)
    assert e.stats()["spilled_blocks"] == 0


def test_close_removes_the_spill_area(spilling):
    e = spilling()
    e.add(1, e.encode("closing"), {**GREEDY, "max_new_tokens": 40})
    step_until_tokens(e, 1, 3)
    e.preempt(1, "swap")
    path = e.spill.path
    assert (path / "data.mdb").exists() and e.stats()["spilled_blocks"] > 0
    e.close()
    assert not path.exists() and e.stats()["spilled_blocks"] == 0
    e.close()  # idempotent
    e.abort(1)


@pytest.fixture
def small_disk():
    """A 1 MiB tmpfs, unmounted (and removed) afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="llmos-spill-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a small tmpfs (needs root and mount rights): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
    os.rmdir(mnt)


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("where", ["unwritable", "full"])
def test_a_spill_the_disk_cannot_take_falls_back_to_recompute_with_identical_output(spilling, tmp_path, where,
                                                                                     request):
    if where == "unwritable":  # its directory cannot be made: a file stands where a directory must
        (tmp_path / "a-file").write_text("")
        spill_dir = tmp_path / "a-file" / "spill" / "4242"
    else:
        disk = request.getfixturevalue("small_disk")
        spill_dir = disk / "spill" / "4242"
    e = spilling(spill_dir=spill_dir)
    e.spill.disk_margin = 0
    if where == "full":
        fill(disk / "filler")
    prompt = e.encode("no room on disk")
    ref = run(e, 9, prompt, GREEDY, 14)
    got, ev, computed, after = switched(e, prompt, GREEDY, 14)
    assert got == ref and (ev.preempted, ev.recomputed) == ("recompute", computed) and computed > 0
    assert after[0].prefilled == computed
    s = e.stats()
    assert (s["spills"], s["spill_failures"], s["spilled_blocks"]) == (0, 1, 0)


def test_a_write_that_fills_the_disk_midway_keeps_nothing_and_the_area_serves_again(small_disk):
    area = SpillArea(small_disk / "spill" / "1", block_bytes=64 << 10, below_bytes=0, disk_margin=0)
    block = bytes(range(256)) * 256
    try:
        assert area.write(7, 2, lambda lo, hi: [block] * (hi - lo))  # the environment exists, 2 blocks in it

        def rows_that_fill_the_disk(lo, hi):  # after the area's check said the disk has room
            fill(small_disk / "filler")
            return [block] * (hi - lo)

        assert not area.write(8, 8, rows_that_fill_the_disk)
        assert "NoSpace" in area.last_error or "StorageError" in area.last_error
        assert area.held == {7: 2} and area.stats()["spill_failures"] == 1
        os.unlink(small_disk / "filler")
        got = []
        assert area.read(7, lambda lo, values: got.extend(bytes(v) for v in values)) and got == [block] * 2
        assert area.write(8, 8, lambda lo, hi: [block] * (hi - lo)) and area.blocks == 10
    finally:
        area.close()
    assert not area.path.exists()


def test_a_spilled_block_that_cannot_be_read_back_is_recomputed_with_identical_output(spilling):
    e = spilling()
    prompt = e.encode("a cut block")
    ref = run(e, 9, prompt, GREEDY, 14)
    e.add(1, prompt, {**GREEDY, "max_new_tokens": 14})
    events = step_until_tokens(e, 1, 6)
    computed = e.seqs[1].computed
    assert e.preempt(1, "swap").preempted == "swap"
    store = e.spill._store
    store.write_txn(lambda txn: txn.put((1).to_bytes(8, "big") + (0).to_bytes(4, "big"), b"cut", db=store.db("spill")))
    e.resume(1, 0)
    after = drain(e)
    assert tokens(events + after, 1) == ref
    assert after[0].prefilled == computed and e.recomputed_tokens == computed  # recomputed, never an error


def test_the_spill_budget_bounds_the_area_and_past_it_the_kv_is_recomputed(spilling):
    e = spilling()
    block_bytes = 4 * e.kv_token_bytes
    e.add(1, e.encode("first"), {**GREEDY, "max_new_tokens": 40})
    e.add(2, e.encode("second"), {**GREEDY, "max_new_tokens": 40})
    step_until_tokens(e, 2, 5)
    need = blocks_for(e.seqs[1].computed, 4)
    e.spill.budget_bytes = (need + 1) * block_bytes  # room for the first, not for both
    assert e.preempt(1, "swap").preempted == "swap"
    ev = e.preempt(2, "swap")
    assert ev.preempted == "recompute" and ev.recomputed > 0
    s = e.stats()
    assert (s["spills"], s["spilled_blocks"], s["spill_failures"]) == (1, need, 1)
    assert s["spill_bytes_used"] <= e.spill.budget_bytes
    for pid in (1, 2):
        e.abort(pid)


def test_an_area_is_never_given_more_than_the_free_disk_less_its_margin(small_disk):
    area = SpillArea(small_disk / "spill" / "1", block_bytes=64 << 10, budget_bytes=1 << 62, below_bytes=0,
                     disk_margin=512 << 10)  # of the 1 MiB disk, under 512 KiB usable, whatever the budget says
    try:
        called = []
        assert not area.write(1, 9, lambda lo, hi: called.append(1))  # 576 KiB
        assert not called and area.failures == 1 and "do not fit" in area.last_error
        assert area.write(1, 2, lambda lo, hi: [bytes(64 << 10)] * (hi - lo))
    finally:
        area.close()


def test_remove_stale_removes_the_areas_of_dead_workers_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = spill_root(tmp_path)
        for name in (str(dead.pid), str(alive.pid), str(os.getpid()), "not-a-pid"):
            (root / name).mkdir(parents=True)
        assert remove_stale(root) == [dead.pid]
        assert sorted(p.name for p in root.iterdir()) == sorted([str(alive.pid), str(os.getpid()), "not-a-pid"])
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale(tmp_path / "nothing-here") == []


def test_a_worker_spills_under_its_home_and_removes_its_area_when_it_exits(tiny_model, tmp_path, monkeypatch):
    """A worker (in-process, real sockets) opens its spill area at $LLMOS_HOME/store/spill/<pid>, removes a dead
    worker's at start, reports the counters in its step frames and removes its own area at shutdown."""
    from llmos.drivers.model import protocol as p
    from llmos.drivers.model.worker import Worker
    from llmos.syscalls import codec

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = spill_root(tmp_path) / str(dead.pid)
    stale.mkdir(parents=True)
    ref = load_engine(tiny_model, engine="paged", block_size=4, num_blocks=64, measure=False)
    prompt = ref.encode("worker spill")
    first = run(ref, 1, prompt, GREEDY, 10)
    context = prompt + first + [5, 6, 7]
    second = run(ref, 2, context, GREEDY, 5)
    ctx = zmq.Context.instance()
    kernel = ctx.socket(zmq.DEALER)
    kernel.setsockopt(zmq.LINGER, 0)
    kernel.setsockopt(zmq.RCVTIMEO, 30_000)
    address = f"ipc://{tmp_path}/w.sock"
    kernel.bind(address)
    w = Worker(address, tiny_model, "cpu", {"block_size": 4, "num_blocks": 64, "swap_blocks": 0,
                                            "spill_below_bytes": HUGE, "measure": False})
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", w.serve()), daemon=True)
    thread.start()
    area = spill_root(tmp_path) / str(os.getpid())
    try:
        def send(msg):
            kernel.send(codec.encode(msg.to_wire()))

        def until(pred):
            """Step frames until one has an event for pid 7 satisfying ``pred``: (its events for 7, its stats)."""
            out = []
            while True:
                msg = p.from_wire(codec.decode(kernel.recv()))
                if isinstance(msg, p.Step):
                    out += [ev for ev in msg.events if ev.pid == 7]
                    if out and pred(out[-1]):
                        return out, msg.stats

        while isinstance(ready := p.from_wire(codec.decode(kernel.recv())), p.Heartbeat):
            pass  # the load stages
        assert isinstance(ready, p.Ready) and ready.info["spill_bytes"] > 0 and not stale.exists()
        send(p.Add(7, prompt, {**GREEDY, "max_new_tokens": 10}, session=True))
        turn, _ = until(lambda ev: ev.finish_reason is not None)
        assert [t for ev in turn for t in ev.token_ids] == first
        send(p.Preempt(7, "swap"))
        (ev,), stats = until(lambda ev: ev.preempted is not None)
        assert ev.preempted == "swap" and stats["spills"] == 1 and stats["spilled_blocks"] > 0
        assert (area / "data.mdb").exists()
        send(p.Append(7, context, {**GREEDY, "max_new_tokens": 5}))
        send(p.Resume(7, 0))
        turn, stats = until(lambda ev: ev.finish_reason is not None)
        assert [t for ev in turn for t in ev.token_ids] == second
        # the KV came back from disk: only the reply's last token (never fed) and the 3 new ones are computed
        assert sum(ev.prefilled for ev in turn) == 4 and stats["spilled_blocks"] == 0
        send(p.Shutdown())
        thread.join(30)
        assert result.get("rc") == 0 and not area.exists()
    finally:
        if thread.is_alive():
            send(p.Shutdown())
            thread.join(30)
        w.sock.close(linger=0)
        kernel.close()
