"""One load point of ``llmos bench``: send the workload's requests to the kernel (open loop at a rate, or closed
loop at a concurrency) over one AsyncClient and time each one from the stream.

Times are the client's: a request's clock starts just before its ``spawn`` is sent; its first token is the
first stream chunk carrying token ids; it ends with the stream's final frame (the result). The kernel's own
stats of each result (ttft_s, tpot_s, queue_time_s) are kept beside them for the cross-check.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from llmos.bench_workload import BenchRequest, arrival_gaps
from llmos.syscalls import protocol
from llmos.syscalls.errors import LLMOSError
from llmos.types import ProcessResult


@dataclass(frozen=True)
class Load:
    """How requests are offered: ``kind`` "rate" (requests/s, Poisson; inf: all at once) or "concurrency"
    (that many in flight, each sent when one ends)."""

    kind: str
    value: float

    def describe(self) -> str:
        if self.kind == "rate":
            return "rate inf" if math.isinf(self.value) else f"rate {self.value:g}/s"
        return f"concurrency {int(self.value)}"

    def wire(self) -> dict[str, Any]:
        """For JSON (which has no infinity): a rate of inf is the string "inf"."""
        value = "inf" if math.isinf(self.value) else self.value if self.kind == "rate" else int(self.value)
        return {"kind": self.kind, "value": value}


@dataclass
class Record:
    """One request's outcome; times in seconds (None where not reached), ``sent`` from the point's start."""

    sent: float
    prompt_tokens: int
    asked_tokens: int  # max_new_tokens sent
    output_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    kernel_ttft_s: float | None = None
    kernel_tpot_s: float | None = None
    kernel_queue_s: float | None = None
    finished: float | None = None  # from the point's start
    error: str | None = None  # the errno name (EAGAIN...), or "killed"; None for a request that completed
    warnings: list[str] = field(default_factory=list)


async def _end_one(client: Any, pid: int, live: set[int]) -> None:
    """TERM and reap a request that failed half-way (its stream or its reap raised): a bench leaves nothing."""
    try:
        await client.kill(pid, "TERM")
        await client.wait(pid, timeout=30)
    except LLMOSError:  # ended and reaped meanwhile (ESRCH), or the kernel is gone
        pass
    live.discard(pid)


async def one_request(client: Any, req: BenchRequest, params: dict[str, Any], t0: float,
                      live: set[int] | None = None, spawns: set[asyncio.Future] | None = None) -> Record:
    """Spawn ``req``, stream it to its end, reap it; never raises an LLMOSError (it is the record's ``error``).
    ``live``: the pids spawned and not yet reaped are kept in it (for whoever must end them on Ctrl-C);
    ``spawns``: the spawn calls whose pid is not in ``live`` yet (on their way, or answered but not collected: the
    kernel answers a spawn once its journal has it, and the process may already run)."""
    live = set() if live is None else live
    sent = time.perf_counter()
    rec = Record(sent - t0, len(req.prompt_ids), req.max_new_tokens)
    first = last = None
    pid = None
    try:
        spawning = asyncio.ensure_future(client.spawn(prompt_ids=req.prompt_ids, max_new_tokens=req.max_new_tokens,
                                                      ignore_eos=True, **params))
        if spawns is not None:
            spawns.add(spawning)
        pid = await asyncio.shield(spawning)  # a Ctrl-C's cancel leaves the call to whoever collects its pid
        # in one step, with no await between: a call leaves ``spawns`` only as its pid joins ``live`` (a done
        # callback would leave it in neither for a loop turn, where a Ctrl-C's cancel loses the process)
        live.add(pid)
        if spawns is not None:
            spawns.discard(spawning)
        result = None
        # frames, not AsyncClient.stream's text: a first token may decode to no text yet (a character split
        # over tokens), and the result comes last
        async for kind, payload in client.stream_frames(pid):
            now = time.perf_counter()
            if kind == protocol.OK:
                result = ProcessResult.from_wire(payload)
                break
            if payload.get("token_ids"):
                first = first if first is not None else now
                last = now
        end = time.perf_counter()
        assert result is not None, "a stream ends with the process's result"
        await client.wait(pid, timeout=30)  # reap: a bench leaves no zombies
        live.discard(pid)
    except LLMOSError as exc:
        rec.error = exc.errno.name
        rec.finished = time.perf_counter() - t0
        if pid is not None and pid in live:
            await _end_one(client, pid, live)
        return rec
    rec.finished = end - t0
    rec.latency_s = end - sent
    rec.output_tokens = len(result.token_ids)
    rec.warnings = list(result.warnings)
    s = result.stats
    rec.kernel_ttft_s, rec.kernel_tpot_s, rec.kernel_queue_s = s.ttft_s, s.tpot_s, s.queue_time_s
    if result.finish_reason in ("error", "killed"):
        rec.error = (result.error or {}).get("error") or result.finish_reason
        return rec
    if first is not None:
        rec.ttft_s = first - sent
        if rec.output_tokens > 1:
            rec.tpot_s = (last - first) / (rec.output_tokens - 1)
    return rec


async def run_point(client: Any, workload: Iterator[BenchRequest], load: Load, params: dict[str, Any], *,
                    requests: int | None = None, duration: float | None = None, seed: int = 0,
                    on_done: Callable[[Record], None] | None = None,
                    live: set[int] | None = None,
                    spawns: set[asyncio.Future] | None = None) -> tuple[list[Record], float]:
    """Offer ``workload`` at ``load`` until ``requests`` were sent or ``duration`` seconds passed (exactly one
    of them), then wait for those in flight. Returns (records in the order sent, wall seconds from the first
    send to the last end). ``params``: spawn's other arguments (model, priority, temperature...); ``live`` and
    ``spawns``: as one_request's."""
    assert (requests is None) != (duration is None), "a point is bounded by requests or by duration"
    t0 = time.perf_counter()
    records: list[Record] = []

    async def send(req: BenchRequest) -> None:
        rec = await one_request(client, req, params, t0, live, spawns)
        records.append(rec)
        if on_done is not None:
            on_done(rec)

    tasks: list[asyncio.Task] = []
    sent = 0
    if load.kind == "rate":
        gaps = arrival_gaps(load.value, seed)
        due = 0.0
        while requests is None or sent < requests:
            due += next(gaps)
            if duration is not None and due >= duration:
                break
            wait = due - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)  # the arrival schedule itself, not a synchronisation
            tasks.append(asyncio.create_task(send(next(workload))))
            sent += 1
        await asyncio.gather(*tasks)
    else:
        lock = asyncio.Lock()  # workload is one iterator: each worker takes the next request under it

        async def worker() -> None:
            nonlocal sent
            while True:
                async with lock:
                    if (requests is not None and sent >= requests) or \
                            (duration is not None and time.perf_counter() - t0 >= duration):
                        return
                    req = next(workload)
                    sent += 1
                await send(req)

        await asyncio.gather(*(worker() for _ in range(int(load.value))))
    wall = max((r.finished or 0.0) for r in records) if records else 0.0
    records.sort(key=lambda r: r.sent)
    return records, wall
