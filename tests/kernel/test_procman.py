"""The ProcessManager driven step by step, with a real engine on a tiny real model and no sockets."""

import asyncio
import time

import pytest

from llmos.drivers.model.engine import BaseEngine, load_engine
from llmos.kernel import messages as m
from llmos.kernel.config import KernelConfig
from llmos.kernel.procman import END, ProcessManager
from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import NoSuchProcess, NotPermitted


class InlineExecutor:
    """The executor contract (id, max_batch, dead, tell) over an in-process Engine, stepped by hand."""

    def __init__(self, engine: BaseEngine, max_batch: int):
        self.id, self.engine, self.max_batch, self.dead = "inline", engine, max_batch, None
        self.kv_total, self.kv_block_size = engine.pool.capacity, engine.pool.block_size
        self.info = {"context_len": engine.context_len}
        self.outbox: list[list] = []

    def tell(self, msg):
        if isinstance(msg, m.Add):
            self.engine.add(msg.pid, msg.prompt_ids, msg.params, msg.user, msg.priority)
        elif isinstance(msg, m.Abort):
            ev = self.engine.abort(msg.pid)
            if ev:
                self.outbox.append(ev.to_wire())

    async def pump(self, pm: ProcessManager, steps: int = 1) -> None:
        for _ in range(steps):
            events = self.outbox + [e.to_wire() for e in self.engine.step()]
            self.outbox = []
            await pm.ask(m.StepEvents(self.id, events, self.engine.running))


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(tiny_model)


def scenario(engine, max_batch, body, config=None, clock=None):
    async def main():
        pm = ProcessManager(config, clock=clock or time.time, tick_s=0 if clock else None).start()
        ex = InlineExecutor(engine, max_batch)
        try:
            await body(pm, ex)
        finally:
            for pid in list(engine.seqs):
                engine.abort(pid)
            await pm.stop()
    asyncio.run(main())


async def spawn(pm, ex, n=5, priority=0, owner="ann"):
    return await pm.ask(m.Spawn(owner, "tiny", [ex], [1, 5, 9], priority,
                                {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}))


async def state(pm, pid):
    return (await pm.ask(m.Stat(pid)))["state"]


def test_a_spawned_process_runs_to_a_zombie_and_wait_returns_its_result(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=3)
        assert await state(pm, pid) == "RUNNING"
        fut = await pm.ask(m.Wait(pid, "ann", reap=False))
        await ex.pump(pm, 3)
        res = await fut
        assert res["finish_reason"] == "length" and len(res["token_ids"]) == 3
        assert await state(pm, pid) == "ZOMBIE"
    scenario(engine, 4, body)


def test_the_batch_is_bounded_and_the_best_priority_waits_least(engine):
    async def body(pm, ex):
        blocker = await spawn(pm, ex, n=2)
        low = await spawn(pm, ex, n=1, priority=10)
        high = await spawn(pm, ex, n=1, priority=-10)
        assert [await state(pm, p) for p in (blocker, low, high)] == ["RUNNING", "READY", "READY"]
        await ex.pump(pm, 2)  # blocker finishes; high is admitted before low
        assert await state(pm, high) == "RUNNING" and await state(pm, low) == "READY"
    scenario(engine, 1, body)


def test_several_processes_make_progress_in_the_same_step(engine):
    async def body(pm, ex):
        pids = [await spawn(pm, ex, n=10) for _ in range(3)]
        await ex.pump(pm, 2)
        outs = [(await pm.ask(m.Stat(p)))["output_tokens"] for p in pids]
        assert outs == [2, 2, 2]
    scenario(engine, 4, body)


def test_term_keeps_partial_output_and_kill_ends_at_once(engine):
    async def body(pm, ex):
        a, b = await spawn(pm, ex, n=50), await spawn(pm, ex, n=50)
        await ex.pump(pm, 3)
        await pm.ask(m.Kill(a, "TERM", "ann"))
        assert await state(pm, a) == "RUNNING"  # TERM is delivered; the worker flushes
        await ex.pump(pm, 1)
        ra = await (await pm.ask(m.Wait(a, "ann", reap=True)))
        assert ra["finish_reason"] == "killed" and ra["signal"] == "TERM" and len(ra["token_ids"]) == 3
        assert (await pm.ask(m.Kill(b, "KILL", "ann")))["state"] == "ZOMBIE"
        rb = await (await pm.ask(m.Wait(b, "ann", reap=True)))
        assert rb["finish_reason"] == "killed" and rb["signal"] == "KILL"
    scenario(engine, 4, body)


def test_killing_a_ready_process_removes_it_from_the_run_queue(engine):
    async def body(pm, ex):
        await spawn(pm, ex, n=5)
        queued = await spawn(pm, ex, n=5)
        await pm.ask(m.Kill(queued, "TERM", "ann"))
        assert await state(pm, queued) == "ZOMBIE"
        await ex.pump(pm, 5)
        assert (await pm.ask(m.Stat(queued)))["output_tokens"] == 0
    scenario(engine, 1, body)


def test_only_the_owner_may_signal_or_wait(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, owner="ann")
        with pytest.raises(NotPermitted):
            await pm.ask(m.Kill(pid, "KILL", "bob"))
        with pytest.raises(NotPermitted):
            await pm.ask(m.Wait(pid, "bob", reap=True))
    scenario(engine, 4, body)


def test_a_subscriber_gets_every_chunk_then_the_result(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=4)
        await ex.pump(pm, 1)
        q = await pm.ask(m.Subscribe(pid, "ann"))
        await ex.pump(pm, 3)
        items = []
        while not q.empty():
            items.append(q.get_nowait())
        chunks, (end, result) = items[:-1], items[-1]
        assert end is END and sum(len(c["token_ids"]) for c in chunks) == 4
        assert "".join(c["text"] for c in chunks) == result["text"]
    scenario(engine, 4, body)


def test_admission_waits_for_kv_blocks(tiny_model):
    small = load_engine(tiny_model, block_size=4, num_blocks=4)  # 3 usable blocks = 12 slots

    async def body(pm, ex):
        first = await pm.ask(m.Spawn("ann", "tiny", [ex], list(range(5, 12)), 0, {"max_new_tokens": 2}))
        second = await pm.ask(m.Spawn("ann", "tiny", [ex], list(range(5, 12)), 0, {"max_new_tokens": 2}))
        assert await state(pm, first) == "RUNNING" and await state(pm, second) == "READY"
        await ex.pump(pm, 2)
        assert await state(pm, first) == "ZOMBIE" and await state(pm, second) == "RUNNING"
    scenario(small, 8, body)


def test_metrics_summarise_finished_processes(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=3)
        await ex.pump(pm, 3)
        fin = (await pm.ask(m.Metrics()))["finished"]
        assert fin["count"] == 1 and fin["tokens_out"] == 3 and fin["ttft_s"]["max"] > 0
        assert pid
    scenario(engine, 4, body)


def test_a_dead_worker_ends_its_processes_with_eio(engine):
    async def body(pm, ex):
        running, queued = await spawn(pm, ex, n=50), await spawn(pm, ex, n=50)
        await pm.ask(m.WorkerDied(ex.id, "worker exited with code -9"))
        for pid in (running, queued):
            res = await (await pm.ask(m.Wait(pid, "ann", reap=True)))
            assert res["finish_reason"] == "error" and res["error"]["error"] == "EIO"
    scenario(engine, 1, body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def owners_zombies(pm):
    out: dict[str, list[int]] = {}
    for p in (await pm.ask(m.Ps()))["processes"]:
        if p["state"] == "ZOMBIE":
            out.setdefault(p["owner"], []).append(p["pid"])
    return out


def test_zombies_nobody_waits_for_are_capped_per_owner_at_once_and_reaped_after_the_retention(engine):
    clock = Clock()

    async def body(pm, ex):
        ann = [await spawn(pm, ex, n=1, owner="ann") for _ in range(5)]
        bob = [await spawn(pm, ex, n=1, owner="bob")]
        await ex.pump(pm, 2)
        assert await owners_zombies(pm) == {"ann": ann[-2:], "bob": bob}  # the oldest of ann's went first
        clock.now += 99
        await pm.ask(m.Tick())
        assert await owners_zombies(pm) == {"ann": ann[-2:], "bob": bob}
        clock.now += 1
        await pm.ask(m.Tick())
        assert await owners_zombies(pm) == {}
        with pytest.raises(NoSuchProcess):
            await pm.ask(m.Wait(ann[-1], "ann", reap=True))
    scenario(engine, 8, body, KernelConfig(zombie_ttl_s=100, max_zombies=2), clock)


def test_a_waiter_and_a_stream_get_their_result_before_retention_reaps(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=2)
        fut = await pm.ask(m.Wait(pid, "ann", reap=False))
        q = await pm.ask(m.Subscribe(pid, "ann"))
        await ex.pump(pm, 2)
        assert (await fut)["finish_reason"] == "length"
        items = [q.get_nowait() for _ in range(q.qsize())]
        assert items[-1][0] is END and items[-1][1]["token_ids"] == (await fut)["token_ids"]
        assert await owners_zombies(pm) == {}  # max_zombies 0: reaped right after they were served
    scenario(engine, 4, body, KernelConfig(max_zombies=0))


def test_a_periodic_tick_reaps_expired_zombies_without_any_other_event(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=1)
        await ex.pump(pm, 1)
        assert await state(pm, pid) == "ZOMBIE"
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not await owners_zombies(pm):
                return
        raise AssertionError("the tick never reaped the expired zombie")
    scenario(engine, 4, body, KernelConfig(zombie_ttl_s=0.05))


def test_a_smaller_process_does_not_overtake_a_head_that_does_not_fit(tiny_model):
    small = load_engine(tiny_model, block_size=4, num_blocks=4)  # 3 usable blocks = 12 slots

    async def body(pm, ex):
        first = await pm.ask(m.Spawn("ann", "tiny", [ex], list(range(5, 12)), 0, {"max_new_tokens": 2}))
        head = await pm.ask(m.Spawn("ann", "tiny", [ex], list(range(5, 12)), 0, {"max_new_tokens": 2}))
        tiny = await pm.ask(m.Spawn("ann", "tiny", [ex], [5], 0, {"max_new_tokens": 2}))  # would fit now
        assert [await state(pm, p) for p in (first, head, tiny)] == ["RUNNING", "READY", "READY"]
        await ex.pump(pm, 2)
        assert await state(pm, first) == "ZOMBIE" and await state(pm, head) == "RUNNING"
    scenario(small, 8, body)


def test_max_new_tokens_beyond_the_context_is_cut_and_the_result_says_so(engine):
    async def body(pm, ex):
        cut = await spawn(pm, ex, n=5000)
        kept = await spawn(pm, ex, n=3)
        await pm.ask(m.Kill(cut, "KILL", "ann"))
        await ex.pump(pm, 3)
        rc = await (await pm.ask(m.Wait(cut, "ann", reap=True)))
        rk = await (await pm.ask(m.Wait(kept, "ann", reap=True)))
        room = engine.context_len - 3
        assert rc["stats"]["max_new_tokens"] == room and f"cut to {room}" in rc["warnings"][0]
        assert rk["stats"]["max_new_tokens"] == 3 and rk["warnings"] == []
    scenario(engine, 4, body)


class Parked:
    """An executor that admits nothing: processes stay READY with whatever records they have."""

    id, max_batch, dead, kv_total, kv_block_size, info = "parked", 0, None, 0, 8, {}

    def tell(self, msg):
        pass


def test_ps_and_metrics_never_exceed_the_frame_limit_whatever_the_records_hold():
    async def main():
        pm = ProcessManager(tick_s=0).start()
        ex = Parked()
        try:
            pids = [await pm.ask(m.Spawn("o" * 100_000, "m" * 1_000_000, [ex], [1], 0, {})) for _ in range(40)]
            pids.append(await pm.ask(m.Spawn("ann", "m" * (protocol.MAX_FRAME_BYTES + 1), [ex], [1], 0, {})))
            pids.append(await pm.ask(m.Spawn("ann", "tiny", [ex], [1], 0, {})))
            for msg in (m.Ps(), m.Metrics()):
                reply = await pm.ask(msg)
                frame = codec.ok(1, reply)  # raises if over the limit
                assert len(frame) <= protocol.MAX_FRAME_BYTES
                shown = [p["pid"] for p in reply["processes"]]
                assert shown == sorted(shown) and shown[-1] == pids[-1] and pids[-2] not in shown
                assert reply["omitted"] > 0 and len(shown) + reply["omitted"] == len(pids)
        finally:
            await pm.stop()
    asyncio.run(main())
