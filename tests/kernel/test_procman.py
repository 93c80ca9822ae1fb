"""The ProcessManager driven step by step, with a real engine on a tiny real model and no sockets."""

import asyncio
import itertools
import time

import pytest

from llmos.drivers.model import protocol as wp
from llmos.drivers.model.engine import BaseEngine, load_engine
from llmos.kernel import messages as m
from llmos.kernel.config import KernelConfig
from llmos.kernel.process import State
from llmos.kernel.procman import END, ProcessManager
from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import Busy, InvalidArgument, NoSuchProcess, NotPermitted, QuotaExceeded, TryAgain


_ids = itertools.count(1)


class InlineExecutor:
    """An executor over an in-process engine, stepped by hand: it is told the worker protocol's ops and
    answers with the events the engine returns, as a worker would (no sockets)."""

    def __init__(self, engine: BaseEngine, max_batch: int):
        self.id, self.engine = f"inline{next(_ids)}", engine
        self.model_path = "tiny"  # the model its processes name (a restarted instance adopts theirs)
        self.info = {**engine.info(), "max_batch": max_batch}
        self.outbox: list[wp.StepEvent] = []
        self.sent: list = []

    def tell(self, msg):
        self.sent.append(msg)
        match msg:
            case wp.Add():
                self.engine.add(msg.pid, msg.prompt_ids, msg.params, msg.user, msg.priority, msg.session,
                                msg.output_ids)
            case wp.Preempt():
                ev = self.engine.preempt(msg.pid, msg.mode)
                if ev is not None:
                    self.outbox.append(ev)
            case wp.Resume():
                self.engine.resume(msg.pid, msg.priority)
            case wp.Renice():
                self.engine.renice(msg.pid, msg.priority)
            case wp.Append():
                self.engine.append(msg.pid, msg.prompt_ids, msg.params)
            case wp.Abort():
                self.outbox.append(self.engine.abort(msg.pid) or wp.StepEvent(msg.pid, finish_reason="killed",
                                                                              final_text=""))

    async def ask(self, msg):
        fut = asyncio.get_running_loop().create_future()
        if msg.add_special_tokens:
            fut.set_result(self.engine.encode(msg.prompt, msg.messages, msg.prompt_ids))
        else:
            fut.set_result(self.engine.tokenize(msg.prompt, add_special_tokens=False))
        return fut

    async def pump(self, pm: ProcessManager, steps: int = 1) -> None:
        for _ in range(steps):
            events = self.outbox + self.engine.step()
            self.outbox = []
            await pm.ask(m.StepEvents(self.id, events, self.engine.stats()))


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(tiny_model)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scenario(engine, max_batch, body, config=None, clock=None):
    async def main():
        pm = ProcessManager(config, clock=clock or time.monotonic, tick_s=0 if clock else None).start()
        ex = InlineExecutor(engine, max_batch)
        await pm.ask(m.ExecutorReady(ex.id, ex, ex.info))
        try:
            await body(pm, ex)
            check_invariants(pm)
        finally:
            for pid in list(engine.seqs):
                engine.abort(pid)
            await pm.stop()
    asyncio.run(main())


def check_invariants(pm: ProcessManager) -> None:
    """Queued only while READY, in a batch only while RUNNING, parked only while BLOCKED or STOPPED; each user's
    live count is its processes not yet ZOMBIE."""
    live: dict[str, int] = {}
    for p in pm.table:
        if p.state is not State.ZOMBIE:
            live[p.owner] = live.get(p.owner, 0) + 1
    assert pm.live_of == live
    for inst in pm.instances.values():
        for pid in inst.queue.order():
            assert pm.table.get(pid).state is State.READY, pid
        for pid in inst.running:
            assert pm.table.get(pid).state is State.RUNNING, pid
        for pid in inst.parked:
            assert pm.table.get(pid).state in (State.BLOCKED, State.STOPPED), pid


async def spawn(pm, ex, n=5, priority=0, owner="ann", prompt=(1, 5, 9), **kw):
    return await pm.ask(m.Spawn(owner, "tiny", [ex], list(prompt), priority,
                                {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}, **kw))


async def state(pm, pid):
    return (await pm.ask(m.Stat(pid, "root")))["state"]


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
        high = await spawn(pm, ex, n=1, priority=5)
        assert [await state(pm, p) for p in (blocker, low, high)] == ["RUNNING", "READY", "READY"]
        await ex.pump(pm, 2)  # blocker finishes (it ranks better than both: no preemption); high before low
        assert await state(pm, high) == "RUNNING" and await state(pm, low) == "READY"
    scenario(engine, 1, body)


def test_an_urgent_process_preempts_the_lowest_priority_running_one_when_the_batch_is_full(engine):
    async def body(pm, ex):
        batch = [await spawn(pm, ex, n=200, priority=10) for _ in range(2)]
        await ex.pump(pm, 3)
        urgent = await spawn(pm, ex, n=3, priority=-10, owner="root")
        assert await state(pm, urgent) == "RUNNING"
        assert [await state(pm, p) for p in batch] == ["RUNNING", "READY"]  # the newest of the worst level
        assert (await pm.ask(m.Stat(batch[1], "root")))["sched"]["preemptions"] == 1
        await ex.pump(pm, 1)
        assert (await pm.ask(m.Stat(urgent, "root")))["output_tokens"] == 1  # its first token came in the next step
        await ex.pump(pm, 3)
        assert await state(pm, urgent) == "ZOMBIE" and await state(pm, batch[1]) == "RUNNING"
    scenario(engine, 2, body)


def test_an_urgent_process_preempts_when_the_kv_pool_is_full(tiny_model):
    small = load_engine(tiny_model, block_size=4, num_blocks=9)  # 8 usable blocks = 32 slots

    async def body(pm, ex):
        low = await spawn(pm, ex, n=40, priority=10, prompt=range(5, 25))  # 20 tokens: 6 blocks
        await ex.pump(pm, 1)
        urgent = await spawn(pm, ex, n=2, priority=-5, owner="root", prompt=range(5, 15))  # 3 blocks
        assert await state(pm, urgent) == "RUNNING" and await state(pm, low) == "READY"
        await ex.pump(pm, 3)
        assert await state(pm, urgent) == "ZOMBIE"
        await ex.pump(pm, 1)
        assert await state(pm, low) == "RUNNING"
    scenario(small, 8, body)


def greedy_reference(engine, prompt, n):
    pid = 10_000 + next(_ids)
    engine.add(pid, list(prompt), {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True})
    out = []
    while pid in engine.seqs:
        for ev in engine.step():
            if ev.pid == pid:
                out += ev.token_ids
    return out


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_preempted_process_resumes_to_exactly_the_uninterrupted_tokens(engine, mode):
    expected = greedy_reference(engine, (1, 5, 9), 12)

    async def body(pm, ex):
        low = await spawn(pm, ex, n=12, priority=10)
        await ex.pump(pm, 4)
        # the urgent one preempts it; force the mode under test through the measured costs
        ex.info.update(swap_bytes_per_s=1e12 if mode == "swap" else 1.0, prefill_tokens_per_s=1e6, kv_bytes_per_token=1)
        await pm.ask(m.ExecutorReady(ex.id, ex, ex.info))  # as if the worker had measured these
        urgent = await spawn(pm, ex, n=3, priority=-10, owner="root")
        assert await state(pm, low) == "READY"
        await ex.pump(pm, 20)
        res = await (await pm.ask(m.Wait(low, "ann", reap=True)))
        assert res["token_ids"] == expected
        assert res["sched"]["preemptions"] == 1
        assert (res["sched"]["swaps_out"], res["sched"]["swaps_in"]) == ((1, 1) if mode == "swap" else (0, 0))
        assert (res["sched"]["recomputed_tokens"] > 0) == (mode == "recompute")
        assert (await (await pm.ask(m.Wait(urgent, "root", reap=True))))["finish_reason"] == "length"
    scenario(engine, 1, body)


def test_stop_suspends_and_cont_resumes_to_exactly_the_uninterrupted_tokens(engine):
    expected = greedy_reference(engine, (1, 5, 9), 10)

    async def body(pm, ex):
        pid = await spawn(pm, ex, n=10)
        await ex.pump(pm, 3)
        assert (await pm.ask(m.Kill(pid, "STOP", "ann")))["state"] == "STOPPED"
        await ex.pump(pm, 5)  # nothing runs it while stopped
        st = await pm.ask(m.Stat(pid, "root"))
        assert st["state"] == "STOPPED" and st["output_tokens"] == 3 and st["kv_blocks"] == 0
        assert (await pm.ask(m.Kill(pid, "CONT", "ann")))["state"] == "RUNNING"
        await ex.pump(pm, 10)
        res = await (await pm.ask(m.Wait(pid, "ann", reap=True)))
        assert res["token_ids"] == expected and res["sched"]["swaps_out"] == 1 and res["sched"]["swaps_in"] == 1
        assert res["sched"]["time_in_state"]["STOPPED"] >= 0
    scenario(engine, 4, body)


def test_a_memory_preemption_by_the_engine_moves_the_process_back_to_ready(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=50)
        await ex.pump(pm, 2)
        ev = engine.preempt(pid, "swap")  # as the engine does under memory pressure, unasked
        await pm.ask(m.StepEvents(ex.id, [ev], engine.stats()))
        # the kernel re-admits it at once (room is there) with a Resume, and the table says so
        assert await state(pm, pid) == "RUNNING"
        assert isinstance(ex.sent[-1], wp.Resume) and (await pm.ask(m.Stat(pid, "root")))["sched"]["preemptions"] == 1
    scenario(engine, 4, body)


def test_aging_makes_a_waiting_low_priority_process_progress(engine):
    clock = Clock()

    async def body(pm, ex):
        first = await spawn(pm, ex, n=500, priority=0)
        low = await spawn(pm, ex, n=1, priority=10)
        for _ in range(5):
            await ex.pump(pm, 1)
            clock.now += 1.0
        assert await state(pm, low) == "READY"  # 5 levels earned of the 11 it needs
        for _ in range(8):
            await ex.pump(pm, 1)
            clock.now += 1.0
        assert await state(pm, low) in ("RUNNING", "ZOMBIE")
        assert (await pm.ask(m.Stat(first, "root")))["sched"]["preemptions"] == 1
    scenario(engine, 1, body, KernelConfig(aging_s=1.0, quantum_tokens=2), clock)


def test_renice_reorders_the_queue_and_only_the_admin_goes_below_zero(engine):
    async def body(pm, ex):
        await spawn(pm, ex, n=3)
        a = await spawn(pm, ex, n=1, priority=5)
        b = await spawn(pm, ex, n=1, priority=5)
        await pm.ask(m.Nice(b, 1, "ann"))
        with pytest.raises(NotPermitted):
            await pm.ask(m.Nice(b, -1, "ann"))
        with pytest.raises(NotPermitted):
            await pm.ask(m.Nice(b, 3, "bob"))
        with pytest.raises(NotPermitted):
            await pm.ask(m.Kill(b, "STOP", "bob"))
        await ex.pump(pm, 3)
        assert await state(pm, b) == "RUNNING" and await state(pm, a) == "READY"
    scenario(engine, 1, body)


def test_a_deadline_ends_the_process_with_etimedout_keeping_its_partial_output(engine):
    clock = Clock()

    async def body(pm, ex):
        pid = await spawn(pm, ex, n=100, deadline=2.0)
        queued = await spawn(pm, ex, n=100, queue_timeout=1.0)
        await ex.pump(pm, 3)
        clock.now += 1.5
        await pm.ask(m.Tick())
        rq = await (await pm.ask(m.Wait(queued, "ann", reap=True)))
        assert rq["error"]["error"] == "ETIMEDOUT" and "queue timeout" in rq["error"]["message"]
        assert await state(pm, pid) == "RUNNING"
        clock.now += 1.0
        await pm.ask(m.Tick())
        res = await (await pm.ask(m.Wait(pid, "ann", reap=True)))
        assert res["finish_reason"] == "error" and res["error"]["error"] == "ETIMEDOUT"
        assert len(res["token_ids"]) == 3 and res["text"]
    scenario(engine, 1, body, None, clock)


def test_each_quota_refuses_with_its_errno_and_says_which_limit(engine):
    clock = Clock()
    cfg = KernelConfig(max_queue=2, user_quotas="ann:procs=2;bob:tpm=10;cy:kv_blocks=1")

    async def body(pm, ex):
        await spawn(pm, ex, n=50)
        await spawn(pm, ex, n=50)
        with pytest.raises(TryAgain, match="2 live processes"):
            await spawn(pm, ex, n=5)
        await spawn(pm, ex, n=2, owner="bob")  # 3 prompt tokens
        await ex.pump(pm, 2)  # + 2 output tokens
        with pytest.raises(QuotaExceeded, match="tokens per minute: retry in"):
            await spawn(pm, ex, n=2, owner="bob", prompt=range(1, 7))
        clock.now += 61
        await spawn(pm, ex, n=2, owner="bob", prompt=range(1, 7))  # the window moved on
        with pytest.raises(QuotaExceeded, match="KV blocks"):
            await spawn(pm, ex, n=2, owner="cy", prompt=range(1, 40))
        for i in range(2):
            await spawn(pm, ex, n=2, owner=f"q{i}")
        with pytest.raises(Busy, match="run queue is full"):
            await spawn(pm, ex, n=2, owner="q9")
    scenario(engine, 3, body, cfg, clock)


def test_stop_cont_and_nice_of_an_ended_process_are_refused_and_stat_is_the_owners(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=1)
        await ex.pump(pm, 1)
        for msg in (m.Kill(pid, "STOP", "ann"), m.Kill(pid, "CONT", "ann"), m.Nice(pid, 3, "ann")):
            with pytest.raises(InvalidArgument, match="has already ended"):
                await pm.ask(msg)
        assert (await pm.ask(m.Kill(pid, "TERM", "ann")))["state"] == "ZOMBIE"  # TERM/KILL stay harmless
        with pytest.raises(NotPermitted):
            await pm.ask(m.Stat(pid, "bob"))
        assert (await pm.ask(m.Stat(pid, "ann")))["text"] is not None
    scenario(engine, 1, body)


def test_stop_then_cont_cannot_grow_the_run_queue_past_its_bound(engine):
    async def body(pm, ex):
        await spawn(pm, ex, n=50)
        a, b = await spawn(pm, ex, n=50), await spawn(pm, ex, n=50)
        with pytest.raises(Busy):
            await spawn(pm, ex, n=5)
        await pm.ask(m.Kill(a, "STOP", "ann"))
        await pm.ask(m.Kill(b, "STOP", "ann"))
        with pytest.raises(Busy):  # stopped, they still hold their places in the queue
            await spawn(pm, ex, n=5)
        await pm.ask(m.Kill(a, "KILL", "ann"))
        await spawn(pm, ex, n=5)  # a's place is free again
        await pm.ask(m.Kill(b, "CONT", "ann"))
        assert sum(len(i.queue) for i in pm.instances.values()) == 2
    scenario(engine, 1, body, KernelConfig(max_queue=2))


def test_a_process_that_outgrows_its_users_kv_cap_ends_with_edquot_keeping_its_output(engine):
    async def body(pm, ex):
        pid = await spawn(pm, ex, n=200, owner="cy")  # 3 prompt tokens: 1 block of 8 at first
        await ex.pump(pm, 40)
        res = await (await pm.ask(m.Wait(pid, "cy", reap=True)))
        assert res["finish_reason"] == "error" and res["error"]["error"] == "EDQUOT"
        assert "may hold at most 2" in res["error"]["message"]
        assert 8 <= len(res["token_ids"]) <= 16  # it ran until its context needed a third block
    scenario(engine, 1, body, KernelConfig(user_quotas="cy:kv_blocks=2"))


def test_a_session_keeps_its_context_and_its_second_turn_prefills_only_the_new_tokens(engine):
    async def body(pm, ex):
        pid = await pm.ask(m.Spawn("ann", "tiny", [ex], engine.encode("hello there"), 0,
                                   {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True},
                                   session=True, prompt="hello there"))
        await ex.pump(pm, 6)
        st = await pm.ask(m.Stat(pid, "root"))
        assert st["state"] == "BLOCKED" and st["kv_blocks"] > 0
        st_tokens = pm.table.get(pid).token_ids
        ref, enc = await pm.ask(m.PrepareTurn(pid, "ann", " and more", "user"))
        with pytest.raises(Busy):
            await pm.ask(m.PrepareTurn(pid, "ann", "again", "user"))  # one turn at a time
        ids = await (await ref.ask(enc))
        context_before = st["prompt_tokens"] + st["output_tokens"]
        q = await pm.ask(m.StartTurn(pid, "ann", ids))
        await ex.pump(pm, 6)
        items = [q.get_nowait() for _ in range(q.qsize())]
        end, turn = items[-1]
        assert end is END and turn["state"] == "BLOCKED" and turn["finish_reason"] == "length"
        assert (await pm.ask(m.Stat(pid, "root")))["prompt_tokens"] == context_before + len(ids)
        # only the new tokens: the turn's text, and the reply's last token (sampled, never yet computed)
        assert turn["stats"]["prefill_tokens"] == len(ids) + 1
        context = engine.encode("hello there") + st_tokens + ids
        assert turn["token_ids"] == greedy_reference(engine, context, 4)  # as a fresh spawn of the whole context
        res = await (await pm.ask(m.Close(pid, "ann")))
        assert res["finish_reason"] == "closed"
        assert not engine.seqs or pid not in engine.seqs
    scenario(engine, 4, body)


def test_several_processes_make_progress_in_the_same_step(engine):
    async def body(pm, ex):
        pids = [await spawn(pm, ex, n=10) for _ in range(3)]
        await ex.pump(pm, 2)
        outs = [(await pm.ask(m.Stat(p, "root")))["output_tokens"] for p in pids]
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
        assert (await pm.ask(m.Stat(queued, "root")))["output_tokens"] == 0
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


def test_durations_in_results_are_between_unix_times_whatever_the_scheduling_clock(engine):
    clock = Clock()  # a monotonic clock far from unix time, as the real one is

    async def body(pm, ex):
        pid = await spawn(pm, ex, n=4)
        queued = await spawn(pm, ex, n=2, queue_timeout=1.0)
        await ex.pump(pm, 2)
        clock.now += 2
        await pm.ask(m.Tick())  # the queued one times out
        await ex.pump(pm, 2)
        for p in (pid, queued):
            st = (await (await pm.ask(m.Wait(p, "ann", reap=True))))["stats"]
            assert 0 <= st["queue_time_s"] < 60 and 0 <= st["total_time_s"] < 60, st
        fin = (await pm.ask(m.Metrics()))["finished"]
        assert 0 <= fin["total_time_s"]["max"] < 60
    scenario(engine, 1, body, None, clock)


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
        pm.instances[ex.id] = None  # (gone: the invariant check skips it)
        del pm.instances[ex.id]
        for pid in (running, queued):
            res = await (await pm.ask(m.Wait(pid, "ann", reap=True)))
            assert res["finish_reason"] == "error" and res["error"]["error"] == "EIO"
    scenario(engine, 1, body)


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

    id, info = "parked", {"max_batch": 0}

    def tell(self, msg):
        pass


def test_ps_and_metrics_never_exceed_the_frame_limit_whatever_the_records_hold():
    async def main():
        pm = ProcessManager(tick_s=0).start()
        ex = Parked()
        await pm.ask(m.ExecutorReady(ex.id, ex, ex.info))
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
