"""One bench request's bookkeeping (llmos.bench_run.one_request) without a kernel: what it does when the kernel
refuses half-way."""

import asyncio

from llmos.bench_run import one_request
from llmos.bench_workload import BenchRequest
from llmos.syscalls.errors import KernelGone


class HalfWay:
    """A client whose stream breaks after the spawn (the kernel's answer to a stream can be an error)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def spawn(self, **kw):
        self.calls.append(("spawn",))
        return 7

    async def stream_frames(self, pid):
        raise KernelGone("kernel stopped: test")
        yield  # an async generator

    async def kill(self, pid, sig):
        self.calls.append(("kill", pid, sig))

    async def wait(self, pid, timeout=None):
        self.calls.append(("wait", pid))


def test_a_request_whose_stream_fails_is_ended_and_reaped_and_recorded_as_an_error():
    client, live = HalfWay(), set()
    rec = asyncio.run(one_request(client, BenchRequest([1, 2, 3], 4), {}, 0.0, live))
    assert rec.error == "EPIPE" and live == set()
    assert client.calls == [("spawn",), ("kill", 7, "TERM"), ("wait", 7)]


class SpawnAnsweredLater:
    """A client whose spawn is answered when the test says so."""

    def __init__(self) -> None:
        self.answer: asyncio.Future | None = None

    async def spawn(self, **kw):
        self.answer = asyncio.get_running_loop().create_future()
        return await self.answer


def test_a_request_cancelled_as_its_spawn_is_answered_leaves_its_pid_where_ctrl_c_finds_it():
    """Ctrl-C cancels the requests; one whose spawn answer has just come (the call is done, the request not yet
    resumed) must leave the pid in ``live`` or its call in ``spawns``: otherwise nobody ends that process."""

    async def go():
        client, live, spawns = SpawnAnsweredLater(), set(), set()
        task = asyncio.create_task(one_request(client, BenchRequest([1, 2, 3], 4), {}, 0.0, live, spawns))
        while client.answer is None:
            await asyncio.sleep(0)
        (spawning,) = spawns
        client.answer.set_result(7)
        while not spawning.done():
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return live, {f.result() for f in spawns if f.done()}

    live, answered = asyncio.run(go())
    assert 7 in live | answered
