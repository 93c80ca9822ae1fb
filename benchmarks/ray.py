"""What the Ray backend costs: the per-step transport, one machine against the local backend, two simulated nodes.

``python -m benchmarks.ray [--shape 40M] [--repeats 3] [--skip-cluster] [--out docs/performance.md]``

1. Transport. One kernel <-> worker exchange of a realistic frame (a ``protocol.Step`` of 8 one-token
   StepEvents with the engine's stats, ``codec.encode``d) sent and echoed back, ROUND_TRIPS times after WARMUP,
   this process on asyncio as the kernel is: (a) a local process's DEALER over ipc (kernel/executor.py); (b) a
   Ray actor's DEALER over tcp with CURVE to a socket this process bound on Ray's node address (the Ray
   backend, kernel/ray_executor.py); (c) a Ray actor method call, ``await actor.echo.remote(frame)``; (d) a Ray
   streaming generator, one frame per yield: one way only, from the yield to its arrival here. Medians and
   p99 in microseconds; "overhead" is the difference to (a), what each step would cost more (for (d) against
   half of (a)'s round trip).
2. One machine. The issue 3 workload (32 requests, benchmarks/workload.py, greedy, EOS ignored) on a kernel
   started with ``--ray``: copy A of the model on ``backend="local"``, copy B (same weights, another path) on
   ``backend="ray"``, one instance of ``os.cpu_count()`` CPUs, so both run torch on every core. One untimed pass
   each, then they take turns ``--repeats`` times; useful output tokens per second, medians, and B / A
   (target: >= 0.90). Greedy tokens must be identical.
3. Two simulated nodes (``ray.cluster_utils.Cluster``: a head and a worker node of ``cpu_count() // 2`` CPUs each,
   a kernel joining with ``--ray ADDRESS``): one instance of ``cpu_count() // 2`` CPUs against two spread one per
   node, loaded in turn; the ratio (target: >= 1.6x where the machine has the cores, CLUSTER_CORES or more: the
   simulated nodes share this machine's cores with the kernel, this client and Ray's own processes).

How to read it: (b) less (a) is what the Ray backend adds to every step frame, to be set against a step's
time (milliseconds on CPU); (c) and (d) are what Ray's own calls would add instead. Part 2 is the cost of the
whole path (actor, tcp, CURVE) on real work; its note gives each side's niceness, because Ray starts its
workers at nice 15 and a busy machine then takes their cores first. The load averages say how busy the
machine was (others' work moves every number). Part 3 on too few cores measures the sharing of those cores.

Everything it starts (kernels, Ray instances, actors) is stopped, and checked gone, before it writes the
"## Ray backend (issue 12)" section of ``--out``. Exit status 1 when greedy outputs differ or a process is left.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq
import zmq.asyncio

from benchmarks.run import ROOT, ensure_malloc_env, machine, start_kernel
from benchmarks.storage import write_section

SECTION = "## Ray backend (issue 12)"
ROUND_TRIPS, WARMUP = 2000, 200
STREAM_GAP_S = 0.001  # between yields: each frame arrives before the next leaves (latency, not a queue)
MAX_BATCH = 32  # benchmarks.run's: the whole workload in one batch
CLUSTER_CORES = 8  # from here each simulated node has >= 4 cores, enough beside the kernel and Ray's daemons
OBJECT_STORE = 128 << 20  # Ray's shared-memory store per node: frames of a few KiB need little
STOP = b"stop"


def step_frame(events: int = 8) -> bytes:
    """A Step frame as a worker sends one at batch ``events``: one token each, the engine's stats."""
    from llmos.drivers.model import protocol as wp
    from llmos.syscalls import codec

    stats = {"running": events, "parked": 0, "batch": events, "step_tokens": events, "kv_used": 211, "kv_free": 3885,
             "kv_total": 4096, "kv_block_size": 8, "kv_bytes": 201326592, "kv_per_user": {"0": 211}, "steps": 1234,
             "step_yields": 0, "preemptions": 0, "kv_policy": "static", "swap_used": 0, "swap_total": 0,
             "swaps_out": 0, "swaps_in": 0, "recomputed_tokens": 0, "prefill_tokens_per_s": 5321.7, "spills": 0,
             "spilled_blocks": 0, "spill_bytes_used": 0, "spill_failures": 0}
    evs = [wp.StepEvent(pid=1000 + i, token_ids=[4000 + i], text=" word") for i in range(events)]
    return codec.encode(wp.Step(evs, events, 0.012, 1, stats).to_wire())


def echo_peer(address: str, curve: dict[str, bytes] | None = None) -> int:
    """The worker's side: a DEALER connected to ``address`` sends back every frame until STOP; the frames echoed.
    ``curve``: {server_key, public_key, secret_key} (Z85) for a CURVE connection, as a Ray actor's."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if curve:
        sock.curve_serverkey, sock.curve_publickey = curve["server_key"], curve["public_key"]
        sock.curve_secretkey = curve["secret_key"]
    sock.connect(address)
    sock.send(b"hello")  # the kernel's side times nothing before the connection (and its handshake) is up
    n = 0
    while (frame := sock.recv()) != STOP:
        sock.send(frame)
        n += 1
    sock.close(linger=1000)
    ctx.term()
    return n


class Peer:
    """The Ray actor of part 1 (wrapped with ``ray.remote``)."""

    def zmq_echo(self, address: str, curve: dict[str, bytes]) -> int:
        return echo_peer(address, curve)

    def echo(self, frame: bytes) -> bytes:
        return frame

    def stream(self, frame: bytes, n: int, gap_s: float):
        for _ in range(n):
            time.sleep(gap_s)
            # perf_counter is CLOCK_MONOTONIC, one clock for every process of this machine
            yield time.perf_counter_ns(), frame


async def round_trips(send, n: int) -> list[float]:
    """Microseconds of ``n`` awaited ``send()`` round trips after WARMUP untimed ones."""
    out = []
    for i in range(WARMUP + n):
        t = time.perf_counter_ns()
        await send()
        if i >= WARMUP:
            out.append((time.perf_counter_ns() - t) / 1000)
    return out


async def dealer_round_trips(sock: zmq.asyncio.Socket, frame: bytes, n: int) -> list[float]:
    assert await sock.recv() == b"hello"

    async def send() -> None:
        await sock.send(frame)
        await sock.recv()

    times = await round_trips(send, n)
    await sock.send(STOP)
    return times


async def transport(frame: bytes, n: int, root: Path, procs: "Started") -> dict[str, list[float]]:
    """Part 1: microseconds per exchange of ``frame`` for (a) to (d) (the module's docstring), ``n`` of each."""
    import ray

    ctx = zmq.asyncio.Context()
    res: dict[str, list[float]] = {}
    sock = ctx.socket(zmq.DEALER)
    sock.bind(f"ipc://{root}/echo.sock")
    peer = subprocess.Popen([sys.executable, "-c", "import sys; from benchmarks.ray import echo_peer; "
                             "echo_peer(sys.argv[1])", f"ipc://{root}/echo.sock"], cwd=ROOT)
    try:
        res["a"] = await dealer_round_trips(sock, frame, n)
        peer.wait(30)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        sock.close(linger=0)

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING", object_store_memory=OBJECT_STORE)
    try:
        actor = ray.remote(Peer).options(num_cpus=1).remote()
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        sock = ctx.socket(zmq.DEALER)
        sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, server_public, server_secret
        ip = ray.util.get_node_ip_address()  # where the kernel binds its actors' sockets
        port = sock.bind_to_random_port(f"tcp://{ip}")
        served = actor.zmq_echo.remote(f"tcp://{ip}:{port}", {"server_key": server_public, "public_key": client_public,
                                                              "secret_key": client_secret})
        procs.note()
        res["b"] = await dealer_round_trips(sock, frame, n)
        assert await served == WARMUP + n
        sock.close(linger=0)

        async def call() -> None:
            await actor.echo.remote(frame)

        res["c"] = await round_trips(call, n)
        res["d"] = []
        async for ref in actor.stream.options(num_returns="streaming").remote(frame, WARMUP + n, STREAM_GAP_S):
            sent, _ = await ref
            res["d"].append((time.perf_counter_ns() - sent) / 1000)
        res["d"] = res["d"][WARMUP:]
        ray.kill(actor)
    finally:
        ray.shutdown()
        ctx.term()
    return res


# -- the workload ---------------------------------------------------------------------------------------------
async def timed(c, model: str, reqs) -> tuple[float, list[list[int]]]:
    """(seconds, greedy tokens of each request) for the whole workload on ``model``, all spawns sent at once."""
    t = time.perf_counter()
    pids = await asyncio.gather(*(c.spawn(prompt_ids=r.prompt_ids, model=model, max_new_tokens=r.max_new_tokens,
                                          temperature=0.0, ignore_eos=True) for r in reqs))
    results = await asyncio.gather(*(c.wait(p) for p in pids))
    return time.perf_counter() - t, [r.token_ids for r in results]


async def one_machine(address: str, local: str, on_ray: str, reqs, repeats: int, procs: "Started") -> dict:
    from llmos import AsyncClient

    tokens = sum(r.max_new_tokens for r in reqs)
    models = {"local": local, "ray": on_ray}
    rates: dict[str, list[float]] = {"local": [], "ray": []}
    outs: dict[str, list] = {}
    async with AsyncClient(address) as c:
        await c.model_load(local, backend="local", max_batch=MAX_BATCH, keep_alive=-1)
        await c.model_load(on_ray, backend="ray", instances=1, num_cpus=os.cpu_count(), max_batch=MAX_BATCH,
                           keep_alive=-1)
        procs.note()
        execs = {k: (await c.model_info(m))["executors"] for k, m in models.items()}
        assert {k: [e["backend"] for e in v] for k, v in execs.items()} == {"local": ["local"], "ray": ["ray"]}
        # Ray starts its workers at nice 15 (RAY_worker_niceness): on a busy machine they yield their cores
        nice = {k: psutil.Process(v[0]["worker_pid"]).nice() for k, v in execs.items()}
        for m in models.values():
            await timed(c, m, reqs)  # untimed: oneDNN builds a primitive per new batch shape once per process
        for i in range(repeats):
            for name in (("local", "ray") if i % 2 == 0 else ("ray", "local")):  # ABBA: drift moves both alike
                dt, outs[name] = await timed(c, models[name], reqs)
                rates[name].append(tokens / dt)
                print(f"  one machine, {name:5}: {tokens / dt:7.0f} tok/s", flush=True)
    return {"rates": rates, "outs": outs, "nice": nice}


async def two_nodes(address: str, model: str, reqs, repeats: int, half: int, procs: "Started") -> dict:
    from llmos import AsyncClient

    tokens = sum(r.max_new_tokens for r in reqs)
    rates: dict[int, list[float]] = {1: [], 2: []}
    outs: dict[int, list] = {}
    split: dict[int, list[int]] = {}
    async with AsyncClient(address) as c:
        for i in range(repeats):
            for n in ((1, 2) if i % 2 == 0 else (2, 1)):
                await c.model_load(model, backend="ray", instances=n, num_cpus=half, placement="spread",
                                   max_batch=MAX_BATCH, keep_alive=-1)
                procs.note()
                nodes = {e["node_id"] for e in (await c.model_info(model))["executors"]}
                assert len(nodes) == n, f"{n} instances spread over {len(nodes)} node(s)"
                await timed(c, model, reqs)  # untimed, as in one_machine: a new worker process each load
                before = [e["tokens_out"] for e in (await c.model_info(model))["executors"]]
                dt, outs[n] = await timed(c, model, reqs)
                after = [e["tokens_out"] for e in (await c.model_info(model))["executors"]]
                split[n] = [b - a for a, b in zip(before, after)]
                rates[n].append(tokens / dt)
                print(f"  two nodes, {n} instance(s): {tokens / dt:7.0f} tok/s (tokens per instance {split[n]})",
                      flush=True)
                await c.model_unload(model)
    return {"rates": rates, "outs": outs, "split": split}


def cluster_run(root: Path, model: str, reqs, repeats: int, procs: "Started") -> dict:
    from ray.cluster_utils import Cluster

    half = max(1, (os.cpu_count() or 2) // 2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": half, "include_dashboard": False,
                                                            "object_store_memory": OBJECT_STORE})
    proc = None
    try:
        cluster.add_node(num_cpus=half, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        proc, address = start_kernel(root / "home-cluster", "--max-batch", str(MAX_BATCH), "--ray", cluster.address)
        out = asyncio.run(two_nodes(address, model, reqs, repeats, half, procs))
    finally:
        stop(proc)
        cluster.shutdown()
    out["half"] = half
    return out


class Started:
    """Every process this run started, directly or not (kernels, Ray's daemons, its workers and actors), as seen
    at each ``note()`` while they ran: ``left()`` waits for them all to end and names any that did not."""

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}

    def note(self) -> None:
        for p in psutil.Process().children(recursive=True):
            self.seen.setdefault(p.pid, p)

    def left(self, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            alive = []
            for p in self.seen.values():
                try:  # is_running also says no for a new process that took a dead one's pid
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid} {p.name()}")
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()  # the kernel unloads its models, ends its actors and the Ray it started
        proc.wait(60)


# -- the report -----------------------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def section(t: dict[str, list[float]], one: dict, two: dict | None, shape: str, repeats: int, command: str,
            loads: list[float]) -> str:
    base = med(t["a"])
    rows = [("a", "local worker process, DEALER over ipc (kernel/executor.py)", base),
            ("b", "Ray actor, DEALER over tcp + CURVE to the kernel (the Ray backend)", base),
            ("c", "Ray actor method call, `await actor.echo.remote(frame)`", base),
            ("d", "Ray streaming generator, one yield (one way; overhead against (a) / 2)", base / 2)]
    r = {k: med(v) for k, v in one["rates"].items()}
    ratio = r["ray"] / r["local"]
    same = one["outs"]["local"] == one["outs"]["ray"]
    lines = [SECTION, "",
             f"Measured {datetime.date.today().isoformat()} on {machine()}.", "",
             f"Command: `{command}` (all numbers from one run of it; {len(t['a'])} round trips per transport "
             f"after {WARMUP} of warm-up; the workload's runs take turns, medians of {repeats}). The 1-minute load "
             f"average as each part began and at the end: {', '.join(f'{x:.1f}' for x in loads)}.", "",
             f"Per-step transport: one Step frame ({len(step_frame())} bytes of MessagePack: 8 StepEvents of one token "
             "and the engine's stats) sent to the worker's side and echoed back, this process on asyncio as the "
             "kernel is. Overhead = the median less (a)'s: what every frame would cost more.", "",
             "| transport | median µs | p99 µs | overhead per frame, µs |", "|---|---:|---:|---:|"]
    lines += [f"| ({k}) {text} | {med(t[k]):.0f} | {p99(t[k]):.0f} | {med(t[k]) - ref:+.0f} |" for k, text, ref in rows]
    lines += ["", f"One machine, the issue 3 workload (~{shape}, 32 requests, greedy, EOS ignored) on one kernel "
              f"started with `--ray`: the model on `backend=\"local\"` (a worker process, torch on every core) and a "
              f"copy on `backend=\"ray\"` (one actor of {os.cpu_count()} CPUs: OMP_NUM_THREADS = "
              f"{os.cpu_count()}), max_batch {MAX_BATCH}.", "",
              "| backend | output tok/s (median) | runs |", "|---|---:|---|",
              f"| local | {r['local']:.0f} | {', '.join(f'{x:.0f}' for x in one['rates']['local'])} |",
              f"| ray, 1 instance | {r['ray']:.0f} | {', '.join(f'{x:.0f}' for x in one['rates']['ray'])} |", "",
              f"Ray / local: {ratio:.2f}x (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}); greedy tokens "
              f"{'identical' if same else 'DIFFERENT'} for the 32 requests. The local worker ran at nice "
              f"{one['nice']['local']}, the Ray actor at nice {one['nice']['ray']}"
              + (" (Ray's default for its workers, RAY_worker_niceness: on a busy machine the actor yields its cores "
                 "to everything else running there)." if one["nice"]["ray"] > one["nice"]["local"] else ".")]
    if two is None:
        lines += ["", "Two simulated nodes: skipped (--skip-cluster)."]
    else:
        r2 = {k: med(v) for k, v in two["rates"].items()}
        ratio2 = r2[2] / r2[1]
        same2 = two["outs"][1] == two["outs"][2] == one["outs"]["local"]
        cores = os.cpu_count() or 0
        verdict = (f"target >= 1.6x: {'met' if ratio2 >= 1.6 else 'NOT met'}" if cores >= CLUSTER_CORES else
                   f"the 1.6x target is not judged on {cores} cores (it needs {CLUSTER_CORES} or more: the two "
                   f"simulated nodes, the kernel, this client and Ray's daemons all share this machine's cores); "
                   f"what this machine can show is the Ray backend's cost on one machine, above: Ray / local "
                   f"{ratio:.2f}x")
        lines += ["", f"Two simulated nodes (`ray.cluster_utils.Cluster`: a head and a worker node of {two['half']} "
                  f"CPU(s) each, on this one machine; the kernel joins with `--ray ADDRESS`): one instance of "
                  f"{two['half']} CPU(s) against two spread one per node, loaded in turn, an untimed pass after each "
                  f"load.", "",
                  "| instances | output tok/s (median) | runs | share of the tokens per instance (last run) |",
                  "|---|---:|---|---|"]
        for n in (1, 2):
            shares = " + ".join(f"{x / max(1, sum(two['split'][n])):.0%}" for x in two["split"][n])
            lines.append(f"| {n} | {r2[n]:.0f} | {', '.join(f'{x:.0f}' for x in two['rates'][n])} | {shares} |")
        lines += ["", f"Two / one: {ratio2:.2f}x; {verdict}. Greedy tokens "
                  f"{'identical' if same2 else 'DIFFERENT'} to the local backend's with one and two instances."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ray", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="40M", choices=("5M", "40M"),
                    help="model shape (benchmarks/workload.py; default 40M)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each configuration, in turns (median; default 3)")
    ap.add_argument("--skip-cluster", action="store_true", help="leave out part 3, the two simulated nodes")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"),
                    help="the file the section goes to (default docs/performance.md)")
    ap.add_argument("--no-write", action="store_true", help="print the section, write no file")
    args = ap.parse_args(argv)
    ensure_malloc_env("benchmarks.ray")
    from transformers import AutoConfig

    from benchmarks.workload import make_model, workload

    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="llmos-ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    # every Ray started here (this process's, the kernels', the cluster's) keeps its session files in root
    os.environ.update(RAY_TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0")
    procs = Started()
    proc = None
    try:
        loads = [os.getloadavg()[0]]  # others' work on a shared machine shows here
        print("part 1: per-step transport", flush=True)
        t = asyncio.run(transport(step_frame(), ROUND_TRIPS, root, procs))
        for k, v in t.items():
            print(f"  ({k}) median {med(v):7.0f} µs  p99 {p99(v):7.0f} µs", flush=True)
        loads.append(os.getloadavg()[0])
        print("part 2: one machine, local against ray", flush=True)
        local = make_model(root, args.shape)
        on_ray = Path(shutil.copytree(local, root / f"{local.name}-on-ray"))
        reqs = workload(AutoConfig.from_pretrained(local).vocab_size)
        proc, address = start_kernel(root / "home", "--max-batch", str(MAX_BATCH), "--ray")
        one = asyncio.run(one_machine(address, str(local), str(on_ray), reqs, args.repeats, procs))
        stop(proc)
        two = None
        if not args.skip_cluster:
            loads.append(os.getloadavg()[0])
            print("part 3: two simulated nodes", flush=True)
            two = cluster_run(root, str(on_ray), reqs, args.repeats, procs)
        loads.append(os.getloadavg()[0])
    finally:
        stop(proc)
        left = procs.left()
        shutil.rmtree(root, ignore_errors=True)
    flags = (f" --shape {args.shape}" if args.shape != "40M" else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 3 else "") + (" --skip-cluster" if args.skip_cluster else "")
    text = section(t, one, two, args.shape, args.repeats, "python -m benchmarks.ray" + flags, loads)
    print("\n" + text)
    print(f"wall time {time.monotonic() - t0:.0f} s; {len(procs.seen)} processes started, "
          f"{len(left)} left{': ' + ', '.join(left) if left else ''}", flush=True)
    if not args.no_write:
        write_section(text, doc=Path(args.out), section=SECTION)
    same = one["outs"]["local"] == one["outs"]["ray"] and (two is None or two["outs"][1] == two["outs"][2])
    return 0 if same and not left else 1


if __name__ == "__main__":
    sys.exit(main())
