"""Context switch: swap-out + swap-in against recompute, for a process with 512 tokens of context.

    python -m benchmarks.context_switch [--shape 40M] [--tokens 512] [--repeats 7] [--engine paged]

A random-weight Llama of the benchmark shape (``benchmarks/workload.py``; its context widened so that
512 tokens fit with room to decode) runs one sequence until its context holds ``--tokens`` tokens. Each
repetition then switches it out and back in, both ways, through the engine's own API, and times
until it has its next token:

- swap: ``preempt(pid, "swap")`` (its KV blocks copied to the host swap area, pool blocks freed),
  ``resume``, and the step that copies the blocks back and decodes one token;
- recompute: ``preempt(pid, "recompute")``, ``resume``, and the step that prefills its whole context
  again and samples the next token.

The copies alone (``_swap_out``, the swap-in inside ``_ensure``) are timed too. Medians are printed,
with their ratio (the target: swap >= 2x faster than recompute), and a markdown row for
docs/performance.md. Both paths must give the token an uninterrupted run gives (checked every time).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.workload import make_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def switch(engine, pid: int, mode: str) -> tuple[float, float, int]:
    """Switch ``pid`` out with ``mode`` and back in, until its next token: (seconds, copy seconds, token)."""
    seq = engine.seqs[pid]
    t0 = time.perf_counter()
    ev = engine.preempt(pid, mode)
    t1 = time.perf_counter()
    assert ev.preempted == mode, ev
    engine.resume(pid, 0)
    t2 = time.perf_counter()
    if mode == "swap":  # the swap-in alone: what the step's room-making does first
        assert engine._ensure(seq, seq.computed + 1)
    t3 = time.perf_counter()
    events = engine.step()
    t4 = time.perf_counter()
    token = [t for e in events if e.pid == pid for t in e.token_ids]
    assert len(token) == 1, events
    copy = (t1 - t0) + (t3 - t2) if mode == "swap" else 0.0
    return t4 - t0, copy, token[0]


def bench(path: Path, engine_kind: str, tokens: int, repeats: int) -> dict:
    from llmos.drivers.model.engine import load_engine

    e = load_engine(path, device="cpu", engine=engine_kind, max_tokens_per_step=2 * tokens,
                    num_blocks=4 * (tokens // 8 + 2) + 1, max_batch=4)
    vocab = int(e.model.config.vocab_size)
    rng = random.Random(0)
    prompt = [rng.randrange(3, vocab) for _ in range(tokens - 1)]
    # the uninterrupted run: the tokens each switched run must reproduce
    e.add(1, prompt, {**GREEDY, "max_new_tokens": 2 * repeats + 2})
    ref = []
    while e.has_work():
        ref += [t for ev in e.step() for t in ev.token_ids]
    e.add(1, prompt, {**GREEDY, "max_new_tokens": 2 * repeats + 2})
    first = e.step()  # the prompt's prefill: the context now holds ``tokens`` tokens (the last one pending)
    assert [t for ev in first for t in ev.token_ids] == ref[:1]
    got = ref[:1]
    times: dict[str, list[float]] = {"swap": [], "recompute": [], "copy": []}
    for _ in range(repeats):
        for mode in ("swap", "recompute"):
            assert len(e.seqs[1].tokens) - 1 >= tokens - 1
            total, copy, token = switch(e, 1, mode)
            got.append(token)
            times[mode].append(total)
            if mode == "swap":
                times["copy"].append(copy)
    assert got == ref[:len(got)], "a switched run differs from the uninterrupted one"
    e.abort(1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"engine": engine_kind, "tokens": tokens, "swap_s": med["swap"], "copy_s": med["copy"],
            "recompute_s": med["recompute"], "ratio": med["recompute"] / med["swap"],
            "kv_bytes": tokens * e.kv_token_bytes, "swap_bytes_per_s": e.info()["swap_bytes_per_s"],
            "prefill_tokens_per_s": e.info()["prefill_tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.context_switch", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="40M")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--engine", default="paged", choices=["paged", "sequential"])
    args = ap.parse_args(argv)
    from benchmarks.run import machine

    root = Path(tempfile.mkdtemp(prefix="llmos-bench-switch-"))
    try:
        path = make_model(root, args.shape, context=2 * args.tokens)
        r = bench(path, args.engine, args.tokens, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command = "python -m benchmarks.context_switch" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                       if (argv if argv is not None else sys.argv[1:]) else "")
    print(f"{args.shape} Llama, {r['engine']} engine, {r['tokens']} tokens of context "
          f"({r['kv_bytes'] / 2**20:.1f} MiB of KV), median of {args.repeats}:")
    print(f"  swap out + in, to the next token: {r['swap_s'] * 1e3:8.2f} ms (the copies alone: {r['copy_s'] * 1e3:.2f} ms)")
    print(f"  recompute, to the next token:     {r['recompute_s'] * 1e3:8.2f} ms")
    print(f"  swap is {r['ratio']:.1f}x faster (target >= 2x); measured at load: swap "
          f"{r['swap_bytes_per_s'] / 1e9:.2f} GB/s, prefill {r['prefill_tokens_per_s']:.0f} tokens/s")
    print(f"  machine: {machine()}")
    print()
    print("| Context switch | Context | Swap out + in (to next token) | Copies alone | Recompute (to next token) "
          "| Swap speed-up | Command |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.shape} Llama, {r['engine']} | {r['tokens']} tokens ({r['kv_bytes'] / 2**20:.1f} MiB KV) "
          f"| {r['swap_s'] * 1e3:.1f} ms | {r['copy_s'] * 1e3:.1f} ms | {r['recompute_s'] * 1e3:.1f} ms "
          f"| {r['ratio']:.1f}x | `{command}` |")
    return 0 if r["ratio"] >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
