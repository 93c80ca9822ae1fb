"""What identity and encryption cost: call round trips and the issue 3 workload over ipc, CURVE tcp and plain tcp.

``python -m benchmarks.identity [--shape 40M] [--rounds 3] [--pings 2000]``: one kernel serves ipc (the peer's
uid from SO_PEERCRED on every message), a CURVE tcp listener (encrypted, the key checked at the handshake
and mapped to its user on every message) and, in a second kernel, a plain --insecure tcp listener; the
transports take turns. Reported: sequential ping round trips per second on each, and useful tokens per
second of the 32-request workload (benchmarks/workload.py) on ipc and on CURVE, with the ratio. Writes the
"## Identity and CURVE" section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ensure_malloc_env, llmos_run, machine
from benchmarks.storage import write_section

SECTION = "## Identity and CURVE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home: Path, *flags: str) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "kernel.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel.main", "--home", str(home), "--address",
                             f"ipc://{home}/run/kernel.sock", *flags], stdout=log, stderr=log)
    from llmos.embedded import try_connect

    for _ in range(600):
        c = try_connect(f"ipc://{home}/run/kernel.sock", timeout=1.0)
        if c is not None:
            c.close()
            return proc
        time.sleep(0.05)
    raise RuntimeError("kernel did not start")


def ping_rate(address: str, n: int, **keys: str) -> float:
    from llmos.client import Client

    with Client(address, **keys) as c:
        for _ in range(50):  # warm-up
            c.ping()
        t = time.perf_counter()
        for _ in range(n):
            c.ping()
        return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.identity", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="40M", help="model shape from benchmarks/workload.py (default 40M)")
    ap.add_argument("--rounds", type=int, default=3, help="the transports alternate this many times (medians)")
    ap.add_argument("--pings", type=int, default=2000, help="sequential pings per transport and round")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = ap.parse_args(argv)
    ensure_malloc_env("benchmarks.identity")
    from benchmarks.workload import make_model, workload

    root = Path(tempfile.mkdtemp(prefix="llmos-bench-id-", dir="/tmp"))
    path = make_model(root, args.shape)
    from transformers import AutoConfig

    reqs = workload(AutoConfig.from_pretrained(path).vocab_size)
    tokens = sum(r.max_new_tokens for r in reqs)
    curve, plain = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    home = root / "home"
    procs = []
    pings: dict[str, list[float]] = {"ipc": [], "curve": [], "plain": []}
    rates: dict[str, list[float]] = {"ipc": [], "curve": []}
    outputs: dict[str, list] = {}
    try:
        procs.append(start(home, "--listen", curve, "--max-batch", str(len(reqs))))
        procs.append(start(root / "home-insecure", "--insecure", "--listen", plain))
        keys = {"server_key": str(home / "keys" / "kernel.key"), "client_key": str(home / "keys" / "client.key_secret")}
        ipc = f"ipc://{home}/run/kernel.sock"
        for _ in range(args.rounds):
            pings["ipc"].append(ping_rate(ipc, args.pings))
            pings["curve"].append(ping_rate(curve, args.pings, **keys))
            pings["plain"].append(ping_rate(plain, args.pings, insecure=True))
            print("pings/s " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in pings.items()), flush=True)
        os.environ.update(LLMOS_SERVER_KEY=keys["server_key"], LLMOS_CLIENT_KEY=keys["client_key"])
        for _ in range(args.rounds):  # turns, so that a noisy neighbour moves both alike
            for name, address in (("ipc", ipc), ("curve", curve)):
                dt, outs, _ = asyncio.run(llmos_run(address, str(path), reqs, procs[0].pid))
                rates[name].append(tokens / dt)
                outputs[name] = outs
                print(f"workload over {name:5}: {tokens / dt:7.0f} tok/s", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in {**{f"ping_{k}": v for k, v in pings.items()}, **rates}.items()}
    ratio = med["curve"] / med["ipc"]
    same = outputs["ipc"] == outputs["curve"]
    text = "\n".join([
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.", "",
        f"Command: `python -m benchmarks.identity --shape {args.shape} --rounds {args.rounds} --pings {args.pings}` "
        "(one kernel serving ipc and a CURVE tcp listener, a second kernel an --insecure tcp listener; the "
        "transports take turns; medians).", "",
        "| transport | identity | ping round trips/s | workload tok/s |",
        "|---|---|---:|---:|",
        f"| ipc | the peer's uid (SO_PEERCRED), every message | {med['ping_ipc']:.0f} | {med['ipc']:.0f} |",
        f"| tcp, CURVE | the client's key (ZAP at the handshake, mapped on every message) | {med['ping_curve']:.0f} | "
        f"{med['curve']:.0f} |",
        f"| tcp, --insecure (loopback) | none: everyone is anonymous | {med['ping_plain']:.0f} | - |", "",
        f"The workload over CURVE runs at {ratio:.2f}x its rate over ipc; greedy outputs were "
        f"{'identical' if same else 'DIFFERENT'} on both. A ping is a call with no work: its rate is the bus's own "
        f"cost per call (decode, identify, access check, reply), which the model's step time dwarfs in real work.",
        "",
    ])
    print(text)
    if not args.no_write:
        write_section(text, section=SECTION)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
