"""Prefix caching on and off, same run: ``python -m benchmarks.prefix_cache``.

32 requests share a 256-token prefix (a system prompt) and end with a short distinct suffix; all are sent at
once, greedy, 48 output tokens each, through a kernel, to the ~40M Llama shape (context 512) loaded twice: once
as loaded by default (prefix cache on) and once with ``prefix_cache=False``. Each pass uses a prefix of its own
(a cold cache: the first request of the pass computes the prefix), on and off alternating, the same requests for
both; the time to first token is the client's (from the moment the 32 spawns are sent to the first streamed
token of each), the throughput the output tokens over the pass's wall time. It prints a markdown section for
docs/performance.md ("## Prefix caching (issue 13)") and checks the greedy tokens are identical on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import ensure_malloc_env, machine, start_kernel
from benchmarks.workload import make_model

PREFIX_TOKENS = 256
SUFFIX_TOKENS = (4, 16)
OUTPUT_TOKENS = 48


def requests(vocab: int, n: int, seed: int) -> list[list[int]]:
    """``n`` prompts: one shared PREFIX_TOKENS-token prefix, then a distinct suffix each (seeded)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(PREFIX_TOKENS)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(*SUFFIX_TOKENS))] for _ in range(n)]


async def one_pass(c, model: str, prompts: list[list[int]]) -> dict:
    """All prompts spawned at once, each streamed: TTFT per request (s), wall time (s), output token ids."""
    t0 = time.perf_counter()

    async def run(ids: list[int]) -> tuple[float, list[int]]:
        pid = await c.spawn(prompt_ids=ids, model=model, max_new_tokens=OUTPUT_TOKENS, temperature=0.0,
                            ignore_eos=True)
        first, tokens = None, []
        async for kind, payload in c.stream_frames(pid):
            if kind == "chunk" and payload.get("token_ids"):
                if first is None:
                    first = time.perf_counter() - t0
                tokens.extend(payload["token_ids"])
            elif kind == "ok":
                tokens = list(payload.get("token_ids") or tokens)
        return first if first is not None else float("nan"), tokens

    out = await asyncio.gather(*(run(p) for p in prompts))
    wall = time.perf_counter() - t0
    return {"ttft": [t for t, _ in out], "tokens": [toks for _, toks in out], "wall": wall}


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def bench(address: str, on_path: str, off_path: str, vocab: int, n: int, repeats: int) -> dict:
    from llmos import AsyncClient

    runs: dict[str, list[dict]] = {"on": [], "off": []}
    identical = True
    async with AsyncClient(address) as c:
        await c.model_load(on_path, keep_alive=-1)
        await c.model_load(off_path, keep_alive=-1, prefix_cache=False)
        for path in (on_path, off_path):  # warm-up, untimed, on a prompt that shares nothing with the passes
            await c.wait(await c.spawn(prompt_ids=[5] * 40, model=path, max_new_tokens=4, temperature=0.0))
        for rep in range(repeats):
            prompts = requests(vocab, n, seed=1000 + rep)  # a cold cache each pass: a prefix of its own
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            got = {}
            for mode in order:
                got[mode] = await one_pass(c, on_path if mode == "on" else off_path, prompts)
                runs[mode].append(got[mode])
            identical &= got["on"]["tokens"] == got["off"]["tokens"]
        info = {m: await c.model_info(p) for m, p in (("on", on_path), ("off", off_path))}
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {
            "p50": statistics.median(quantile(r["ttft"], 0.5) for r in rs),
            "p90": statistics.median(quantile(r["ttft"], 0.9) for r in rs),
            "tps": statistics.median(sum(len(t) for t in r["tokens"]) / r["wall"] for r in rs),
            "wall": statistics.median(r["wall"] for r in rs),
        }
    return {"summary": summary, "identical": identical, "info": info, "repeats": repeats, "n": n}


def report(r: dict, command: str, shape: str, load: tuple[float, float, float]) -> str:
    on, off = r["summary"]["on"], r["summary"]["off"]
    ttft_x, tps_x = off["p50"] / on["p50"], on["tps"] / off["tps"]
    verdict = lambda x, t: f"{x:.1f}x ({'met' if x >= t else f'short of {t}x'})"  # noqa: E731
    lines = [
        "## Prefix caching (issue 13)",
        "",
        f"`{command}`, {datetime.date.today().isoformat()}, load average {load[0]:.2f} at the start. "
        f"Machine: {machine()}.",
        "",
        f"{r['n']} requests share a {PREFIX_TOKENS}-token prefix and end with a distinct {SUFFIX_TOKENS[0]}-"
        f"{SUFFIX_TOKENS[1]}-token suffix, sent at once through a kernel, greedy, {OUTPUT_TOKENS} output tokens "
        f"each; the ~{shape} Llama shape, context 512, default load options but `prefix_cache`. Each pass has a "
        f"prefix of its own (the cache starts cold: its first request computes the prefix); medians of "
        f"{r['repeats']} passes each, on and off alternating. TTFT is the client's: from sending the spawns to "
        "each process's first streamed token.",
        "",
        "| prefix cache | p50 TTFT (s) | p90 TTFT (s) | tok/s | wall (s) |",
        "|---|---|---|---|---|",
        f"| on | {on['p50']:.3f} | {on['p90']:.3f} | {on['tps']:.0f} | {on['wall']:.2f} |",
        f"| off | {off['p50']:.3f} | {off['p90']:.3f} | {off['tps']:.0f} | {off['wall']:.2f} |",
        "",
        f"p50 TTFT {verdict(ttft_x, 3.0)} better (target 3x); throughput {verdict(tps_x, 1.5)} (target 1.5x). "
        f"Greedy tokens on and off: {'identical' if r['identical'] else 'DIFFERENT'}.",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="40M")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ensure_malloc_env("benchmarks.prefix_cache")
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="llmos-prefix-"))
    proc = None
    try:
        on_path = make_model(root, args.shape)
        off_path = root / f"{on_path.name}-off"  # another path: the kernel loads one instance per path
        shutil.copytree(on_path, off_path)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(on_path))
        proc, address = start_kernel(root / "home")
        r = asyncio.run(bench(address, str(on_path), str(off_path), vocab, args.requests, args.repeats))
        command = "python -m benchmarks.prefix_cache" + "".join(
            f" --{k} {v}" for k, v in (("shape", args.shape), ("requests", args.requests), ("repeats", args.repeats))
            if v != ap.get_default(k))
        print(report(r, command, args.shape, load))
        return 0 if r["identical"] else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
