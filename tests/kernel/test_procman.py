"""The ProcessManager driven step by step, with a real engine on a tiny real model and no sockets."""

import asyncio

import pytest

from llmos.drivers.model.engine import BaseEngine, load_engine
from llmos.kernel import messages as m
from llmos.kernel.procman import END, ProcessManager
from llmos.syscalls.errors import NotPermitted


class InlineExecutor:
    """The executor contract (id, max_batch, dead, tell) over an in-process Engine, stepped by hand."""

    def __init__(self, engine: BaseEngine, max_batch: int):
        self.id, self.engine, self.max_batch, self.dead = "inline", engine, max_batch, None
        self.kv_total, self.kv_block_size = engine.pool.capacity, engine.pool.block_size
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


def scenario(engine, max_batch, body):
    async def main():
        pm = ProcessManager().start()
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
