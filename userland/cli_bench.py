"""The ``llmos bench`` command (issue 11): a serving benchmark against a running kernel.

A seeded workload (llmos.bench_workload) is offered at each load point of a sweep (llmos.bench_run) while the
kernel's and its workers' resources are sampled (llmos.bench_sample); the report (llmos.bench_report) is a
table, or JSON with ``--json``, and ``--plot`` draws latency percentiles against load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
from pathlib import Path
from typing import Any, Callable

from llmos._command import connect
from llmos._args import positive, syscall_arg
from llmos.bench_workload import DISTRIBUTIONS, Lengths, requests, token_pool
from llmos.syscalls.errors import InvalidArgument, LLMOSError

WARMUP_TOKENS = 4


def _list_of(convert: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list of values each > 0 ("1,2,4")."""
    def parse(text: str) -> list[Any]:
        out = []
        for part in text.split(","):
            try:
                v = convert(part.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {what} separated by commas, got {text!r}") from None
            if not v > 0 or (isinstance(v, float) and math.isnan(v)):
                raise argparse.ArgumentTypeError(f"each value must be more than 0, got {part.strip()!r}")
            out.append(v)
        return out

    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number 0..1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be 0..1 (a fraction of the mean), got {text!r}")
    return v


def _png_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"no directory to write {text} in")
    return path


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``llmos bench`` to ``llmos``."""
    b = sub.add_parser(
        "bench", parents=[common], help="a serving benchmark: throughput, TTFT/TPOT percentiles, resource use",
        description="Offer a seeded workload to the running kernel and report throughput (requests/s, tokens/s), "
        "TTFT, TPOT and end-to-end latency percentiles, errors, and the CPU, memory (RSS of the kernel and its "
        "workers) and GPU use sampled during the run. Load is a request rate (Poisson arrivals) or a "
        "concurrency (closed loop); give several values for a sweep, and --plot to draw it. Outputs ignore EOS, "
        "so every request generates exactly its output length. Accuracy is `llmos eval` (perplexity).")
    load = b.add_mutually_exclusive_group()
    load.add_argument("--rate", "--rates", dest="rates", type=_list_of(float, "requests/s"), default=None,
                      metavar="R[,R...]", help="requests per second, Poisson arrivals; 'inf' sends them all at "
                      "once; several (1,2,4) make a sweep (default: inf)")
    load.add_argument("--concurrency", type=_list_of(int, "whole numbers"), default=None, metavar="C[,C...]",
                      help="closed loop: C requests in flight, the next sent as one ends; several (1,2,4) make a "
                      "sweep (default: --rate inf)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("-n", "--requests", type=positive(int), metavar="N", default=None,
                      help="requests per load point (default 32)")
    size.add_argument("--duration", type=positive(float), metavar="S", default=None,
                      help="seconds each load point sends requests for, those in flight then waited for (default: --requests 32)")
    b.add_argument("--prompt-len", type=positive(int), metavar="TOKENS", default=128, help="mean prompt length, tokens (default 128)")
    b.add_argument("--prompt-len-spread", type=_fraction, metavar="FRACTION", default=0.0,
                   help="prompt length spread, a fraction of the mean (default 0: fixed length)")
    b.add_argument("--output-len", type=syscall_arg("spawn", "max_new_tokens"), metavar="TOKENS", default=128,
                   help="mean output length, tokens: max_new_tokens with EOS ignored (default 128)")
    b.add_argument("--output-len-spread", type=_fraction, metavar="FRACTION", default=0.0,
                   help="output length spread, a fraction of the mean (default 0: fixed length)")
    b.add_argument("--len-dist", choices=DISTRIBUTIONS, default="uniform",
                   help="length distribution with a spread: uniform over mean*(1 +- spread), or normal with "
                   "standard deviation mean*spread clipped to 1..2*mean (default uniform)")
    b.add_argument("--data", default=None, metavar="NAME",
                   help="cut the prompts from stored data set NAME (llmos data import) instead of seeded random "
                   "English text (default)")
    b.add_argument("--seed", type=syscall_arg("spawn", "seed"), metavar="N", default=0,
                   help="workload seed: the same seed, the same prompts, lengths and arrivals (default 0)")
    b.add_argument("--model", default=None, help="model directory or store name (default: the default model)")
    b.add_argument("-p", "--priority", type=syscall_arg("spawn", "priority"), metavar="NICE", default=0,
                   help="nice value of every request, -20..19 (default 0; below 0 only the admin)")
    b.add_argument("--temperature", type=syscall_arg("spawn", "temperature"), metavar="T", default=0.0,
                   help="sampling temperature (default 0: greedy)")
    b.add_argument("--sample-interval", type=positive(float), metavar="S", default=0.5,
                   help="seconds between resource samples (default 0.5)")
    b.add_argument("--plot", type=_png_path, default=None, metavar="FILE.png",
                   help="write a PNG of TTFT and TPOT p50/p99 and output tok/s against load (default: no plot)")
    b.add_argument("--json", action="store_true", help="print the report as JSON (for programs) instead of a table")
    b.set_defaults(fn=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """``llmos bench``: build the seeded workload, run each load point against the running kernel, print the
    table (or --json), draw --plot. Exit 0; 1 on a refusal (one errno line); 130/143 on Ctrl-C/TERM."""
    from llmos.bench_report import TIMING_NOTE, format_table, plot

    prompt = Lengths(args.prompt_len, args.prompt_len_spread, args.len_dist)
    output = Lengths(args.output_len, args.output_len_spread, args.len_dist)
    loads = _loads(args)
    with connect(args) as client:
        with _status("loading the model and warming it up"):
            model, context, pids = _prepare(client, args)
        if prompt.max + output.max > context:
            raise InvalidArgument(f"prompts up to {prompt.max} tokens and outputs up to {output.max} do not fit "
                                  f"the model's context of {context} tokens: shorten --prompt-len/--output-len or "
                                  f"their spread")
        records = client.data.iter(args.data) if args.data else None
        with _status("making the prompts (the kernel tokenises their text)"):
            pool = token_pool(lambda text: client.score(text, args.model, add_special_tokens=False)["token_ids"],
                              max(4 * prompt.max, 256), args.seed, records)
        params = {"model": args.model, "priority": args.priority, "temperature": args.temperature}
        points = []
        for load in loads:
            points.append(_run(client, load, pool, prompt, output, params, args, pids))
    report = {"model": model, "workload": {
        "requests_per_point": None if args.duration else (args.requests or 32), "duration_s": args.duration,
        "prompt_len": prompt.to_json(), "output_len": output.to_json(),
        "prompts": f"data set {args.data}" if args.data else "seeded random English text",
        "temperature": args.temperature, "priority": args.priority, "seed": args.seed,
        "ignore_eos": True}, "points": points, "timing": TIMING_NOTE}
    if args.plot:
        plot(report, args.plot)
        report["plot"] = str(args.plot.resolve())
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        if args.plot:
            print(f"plot: {report['plot']}")
    return 0


def _loads(args: argparse.Namespace) -> list[Any]:
    from llmos.bench_run import Load

    if args.concurrency:
        return [Load("concurrency", c) for c in args.concurrency]
    return [Load("rate", r) for r in (args.rates or [math.inf])]


def _prepare(client: Any, args: argparse.Namespace) -> tuple[str, int, list[int] | None]:
    """Load and warm the model (one short request, untimed: a worker's first steps build what later ones reuse).
    Returns (the model as the kernel names it, its context in tokens, the pids to sample: the kernel's and the
    model's workers', None when the kernel is not on this machine)."""
    pid = client.spawn(prompt="Warm up", model=args.model, priority=args.priority, max_new_tokens=WARMUP_TOKENS,
                       temperature=0.0, ignore_eos=True)
    client.wait(pid, timeout=600)
    info = client.model_info(args.model)
    executors = info.get("executors") or []
    context = min((ex.get("context_len") or math.inf for ex in executors), default=math.inf)
    host = client.address.split("://", 1)[-1]
    local = client.address.startswith("ipc://") or host.startswith(("127.", "localhost", "[::1]"))
    # a Ray instance on another node is not this machine's process to sample
    here = [ex for ex in executors if ex.get("backend", "local") == "local" or ex.get("hostname") == socket.gethostname()]
    pids = [client.kernel["pid"], *(ex["worker_pid"] for ex in here if ex.get("worker_pid"))] if local else None
    return info["model"], context, pids


def _run(client: Any, load: Any, pool: list[int], prompt: Lengths, output: Lengths, params: dict[str, Any],
         args: argparse.Namespace, pids: list[int] | None) -> dict[str, Any]:
    """One load point: the same seeded requests as every other point, the resources sampled meanwhile."""
    from llmos.aclient import AsyncClient
    from llmos.bench_report import summarise
    from llmos.bench_run import run_point
    from llmos.bench_sample import Sampler

    n = None if args.duration else (args.requests or 32)
    live: set[int] = set()

    async def go(progress: Callable[..., None]) -> tuple[list, float]:
        spawns: set[asyncio.Future] = set()
        async with AsyncClient(client.address) as ac:
            point = asyncio.ensure_future(run_point(ac, requests(pool, prompt, output, args.seed), load, params,
                                                    requests=n, duration=args.duration, seed=args.seed,
                                                    on_done=progress, live=live, spawns=spawns))
            # Ctrl-C is handled here, not by cancelling at a random await: the spawns on their way are waited for
            # (their pids join the live ones), and only then is the point stopped and everything live ended
            interrupted = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, interrupted.set)
            stop = asyncio.ensure_future(interrupted.wait())
            try:
                await asyncio.wait({point, stop}, return_when=asyncio.FIRST_COMPLETED)
                if point.done():
                    return point.result()
                for pid in await asyncio.gather(*spawns, return_exceptions=True):
                    if isinstance(pid, int):
                        live.add(pid)
                point.cancel()
                await asyncio.gather(point, return_exceptions=True)
                raise KeyboardInterrupt
            finally:
                stop.cancel()
                loop.remove_signal_handler(signal.SIGINT)

    sampler = Sampler(pids, args.sample_interval).start()
    try:
        with _progress(load.describe(), n, args.duration) as progress:
            records, wall = asyncio.run(go(progress))
    except BaseException:
        sampler.stop()
        _end(client, live)  # Ctrl-C: the requests in flight are ours to end
        raise
    _end(client, live)  # none should be left (one_request ends its own failures); if one is, it is ours to end
    return summarise(records, wall, load, sampler.stop())


def _end(client: Any, pids: set[int]) -> None:
    """TERM every process of ours still in flight, then reap them: all signalled first, so they end together at
    the next step rather than one step each."""
    for pid in list(pids):
        try:
            client.kill(pid, "TERM")
        except LLMOSError:  # ended and reaped meanwhile (ESRCH), or the kernel is gone
            pids.discard(pid)
    for pid in list(pids):
        try:
            client.wait(pid, timeout=30)
        except LLMOSError:
            pass


def _status(text: str) -> Any:
    """A rich spinner with ``text`` on stderr while a setup step runs (a model load takes seconds); nothing when
    stderr is not a terminal."""
    from rich.console import Console

    console = Console(stderr=True)
    return console.status(text) if console.is_terminal else contextlib.nullcontext()


class _progress:
    """A rich progress bar on stderr while a point runs (requests done of n, or seconds of --duration); nothing
    when stderr is not a terminal. Used as ``with _progress(...) as done: done(record)``."""

    def __init__(self, label: str, n: int | None, duration: float | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[errors]} errors"), TimeElapsedColumn(), console=console,
                            transient=True, disable=not console.is_terminal)
        self.task = self.bar.add_task(label, total=n, errors=0)
        self.errors = 0
        self.label = label

    def __enter__(self) -> Callable[..., None]:
        self.bar.start()
        return self.done

    def done(self, record: Any) -> None:
        self.errors += record.error is not None
        self.bar.update(self.task, advance=1, errors=self.errors)

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()
