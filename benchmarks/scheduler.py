"""The scheduler's benchmarks, baselines in the same run: ``python -m benchmarks.scheduler``.

1. Urgent latency: time to first token (TTFT) of a nice -10 process alone, then the worst of
   several while ``--batch`` (48) nice +10 processes with long outputs keep every one of 16
   batch slots busy; for the ``priority`` and ``fcfs`` policies (fcfs is the baseline: what a
   server without preemption gives). Also the batch load's throughput without and with the
   urgent arrivals.
2. Default against tuned: the issue-3 workload (32 requests) with the default configuration
   (no --max-batch: the batch sized by the KV pool and the step's token budget) against
   --max-batch 16, 32 and 64.

Every run is a real kernel subprocess, a real worker and this process as the client over the bus.
Prints markdown rows for docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.run import ensure_malloc_env, machine, start_kernel
from benchmarks.workload import make_model, workload


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except Exception:
        proc.kill()


async def urgent_alone(c, model: str, prompt: list[int], reps: int = 5) -> float:
    ttfts = []
    for _ in range(reps):
        r = await c.wait(await c.spawn(prompt_ids=prompt, model=model, max_new_tokens=4, temperature=0.0,
                                       priority=-10))
        ttfts.append(r.stats.ttft_s)
    return statistics.median(ttfts)


async def batch_load(c, model: str, reqs, urgent: list[int] | None, arrivals: int) -> tuple[float, list[float]]:
    """(throughput of the batch load in tokens/s, over its own makespan; the urgent processes' TTFTs)."""
    t0 = time.perf_counter()
    pids = await asyncio.gather(*(c.spawn(prompt_ids=r.prompt_ids, model=model, max_new_tokens=r.max_new_tokens,
                                          temperature=0.0, ignore_eos=True, priority=10) for r in reqs))
    ttfts: list[float] = []

    async def arrive() -> None:
        await asyncio.sleep(1.0)  # the batch is full and running
        for _ in range(arrivals):
            r = await c.wait(await c.spawn(prompt_ids=urgent, model=model, max_new_tokens=4, temperature=0.0,
                                           priority=-10))
            ttfts.append(r.stats.ttft_s)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(arrive()) if urgent is not None else None
    results = await asyncio.gather(*(c.wait(p) for p in pids))
    dt = time.perf_counter() - t0
    if task is not None:
        await task
        if len(ttfts) < arrivals:
            raise RuntimeError("the batch load ended before the urgent arrivals: give it longer outputs")
    return sum(len(r.token_ids) for r in results) / dt, ttfts


async def urgent_bench(address: str, model: str, batch: int, output: int, arrivals: int, repeats: int) -> dict:
    from llmos import AsyncClient

    reqs = workload(4096, n=batch, seed=1, prompt=(16, 48), output=(output, output))
    urgent = workload(4096, n=1, seed=2, prompt=(32, 32))[0].prompt_ids
    async with AsyncClient(address) as c:
        await c.model_load(model, keep_alive=-1)
        await c.wait(await c.spawn(prompt_ids=urgent, model=model, max_new_tokens=4, temperature=0.0))  # warm-up
        alone = await urgent_alone(c, model, urgent)
        plain, loaded, ttfts = [], [], []
        for _ in range(repeats):  # alternate, so drifts of the machine hit both alike
            plain.append((await batch_load(c, model, reqs, None, 0))[0])
            tput, t = await batch_load(c, model, reqs, urgent, arrivals)
            loaded.append(tput)
            ttfts += t
        metrics = await c.metrics()
    preempt = sum(e.get("preemptions", 0) for e in metrics["models"])
    return {"alone": alone, "worst": max(ttfts), "ttfts": ttfts, "tput_plain": statistics.median(plain),
            "tput_urgent": statistics.median(loaded), "preemptions": preempt}


async def throughput(address: str, model: str, max_batch: int | None, repeats: int) -> float:
    """Median tokens/s over ``repeats`` runs of the issue-3 workload (32 requests at once)."""
    from llmos import AsyncClient

    reqs = workload(4096, n=32, seed=0)
    out = []
    async with AsyncClient(address) as c:
        await c.model_load(model, keep_alive=-1, **({"max_batch": max_batch} if max_batch else {}))
        await c.wait(await c.spawn(prompt_ids=reqs[0].prompt_ids, model=model, max_new_tokens=4, temperature=0.0))
        for _ in range(repeats):
            t = time.perf_counter()
            pids = await asyncio.gather(*(c.spawn(prompt_ids=r.prompt_ids, model=model,
                                                  max_new_tokens=r.max_new_tokens, temperature=0.0, ignore_eos=True)
                                          for r in reqs))
            results = await asyncio.gather(*(c.wait(p) for p in pids))
            out.append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - t))
    return statistics.median(out)


def main() -> int:
    ensure_malloc_env("benchmarks.scheduler")
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scheduler", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="5M", choices=("5M", "40M"), help="model shape (benchmarks/workload.py)")
    ap.add_argument("--batch", type=int, default=48, help="nice +10 processes in the batch load")
    ap.add_argument("--output", type=int, default=160, help="tokens each batch process generates")
    ap.add_argument("--arrivals", type=int, default=4, help="urgent processes arriving during the load")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions (medians for throughput; the urgent "
                    "TTFT is the worst over all of them)")
    ap.add_argument("--policies", default="priority,fcfs", help="comma-separated policies to compare")
    ap.add_argument("--skip-tuning", action="store_true", help="only the urgent-latency benchmark")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmos-sched-") as tmp:
        root = Path(tmp)
        model = str(make_model(root, args.shape))
        for policy in args.policies.split(","):
            proc, address = start_kernel(root / f"k-{policy}", "--max-batch", "16", "--sched-policy", policy)
            try:
                r = asyncio.run(urgent_bench(address, model, args.batch, args.output, args.arrivals, args.repeats))
            finally:
                stop(proc)
            rows.append((policy, r))
            print(f"{policy}: urgent TTFT alone {r['alone'] * 1e3:.0f} ms, worst under load "
                  f"{r['worst'] * 1e3:.0f} ms ({r['worst'] / r['alone']:.1f}x; all: {[round(t * 1e3) for t in r['ttfts']]} ms); batch {r['tput_plain']:.0f} tok/s "
                  f"plain, {r['tput_urgent']:.0f} with urgent arrivals "
                  f"({(1 - r['tput_urgent'] / r['tput_plain']) * 100:+.1f}% drop); preemptions {r['preemptions']}",
                  flush=True)
        tuning = []
        if not args.skip_tuning:
            for mb in (None, 16, 32, 64):
                proc, address = start_kernel(root / f"k-mb{mb}", *(["--max-batch", str(mb)] if mb else []))
                try:
                    tuning.append((mb, asyncio.run(throughput(address, model, mb, args.repeats))))
                finally:
                    stop(proc)
                print(f"max_batch {mb or 'default'}: {tuning[-1][1]:.0f} tok/s", flush=True)
    print()
    print(f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; `python -m benchmarks.scheduler --shape {args.shape}` ({args.batch} x {args.output} tokens "
          f"at nice +10 in 16 slots, {args.arrivals} nice -10 arrivals per load, {args.repeats} repeats)")
    print()
    print("| policy | urgent TTFT alone | worst urgent TTFT under load | ratio | batch tok/s (median) | with urgent | drop |")
    print("|---|---|---|---|---|---|---|")
    for policy, r in rows:
        print(f"| {policy} | {r['alone'] * 1e3:.0f} ms | {r['worst'] * 1e3:.0f} ms | {r['worst'] / r['alone']:.1f}x | "
              f"{r['tput_plain']:.0f} | {r['tput_urgent']:.0f} | {(1 - r['tput_urgent'] / r['tput_plain']) * 100:.1f}% |")
    if tuning:
        best = max(t for _, t in tuning)
        print()
        print("| max_batch | tok/s | of the best |")
        print("|---|---|---|")
        for mb, t in tuning:
            print(f"| {mb or 'default (sized by the KV pool)'} | {t:.0f} | {t / best:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
