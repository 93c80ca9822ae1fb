"""LLMOS against Hugging Face baselines, same seeded workload, same run: ``python -m benchmarks.run``.

For each model shape it measures, one after another on an otherwise idle machine:
- LLMOS end to end: a kernel process, a model worker process, this process as the client
  over the ZeroMQ bus (32 concurrent spawns by prompt_ids, then waits);
- the paged engine alone in this process (to show what the kernel and the bus cost);
- HF sequential ``generate``, HF padded static batch ``generate``, HF continuous batching;
- the bare decode step at batch 32 (the ceiling);
and the KV pool waste at the end of prefill. It prints a table and writes docs/performance.md.
"""

from __future__ import annotations

import argparse
import shutil
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def ensure_malloc_env(module: str = "benchmarks.run") -> None:
    """Run ``python -m module`` under the allocator settings the kernel gives its workers (fair comparison):
    re-exec it with them when they are not set."""
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, **MALLOC})


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def llmos_run(address: str, model: str, reqs, kernel_pid: int,
                    dtype: str | None = None) -> tuple[float, list[list[int]], list]:
    """One timed pass of ``reqs`` through a kernel at ``address`` (the model loaded once, in ``dtype``, with a
    4-token warm-up): (seconds, output token ids, [results, the model's metrics, CPU seconds by process])."""
    from llmos import AsyncClient

    async with AsyncClient(address) as c:
        opts = {"dtype": dtype} if dtype else {}
        info = await c.model_load(model, max_batch=len(reqs), keep_alive=-1, **opts)
        await c.wait(await c.spawn(prompt_ids=reqs[0].prompt_ids, model=model, max_new_tokens=4,
                                   temperature=0.0))  # warm-up, untimed
        worker_pid = info["executors"][0]["worker_pid"]
        cpu0 = {"kernel": cpu_seconds(kernel_pid), "worker": cpu_seconds(worker_pid),
                "client": cpu_seconds(os.getpid())}
        t = time.perf_counter()
        pids = await asyncio.gather(*(c.spawn(prompt_ids=r.prompt_ids, model=model, max_new_tokens=r.max_new_tokens,
                                              temperature=0.0, ignore_eos=True) for r in reqs))
        results = await asyncio.gather(*(c.wait(p) for p in pids))
        dt = time.perf_counter() - t
        cpu = {"kernel": cpu_seconds(kernel_pid) - cpu0["kernel"], "worker": cpu_seconds(worker_pid) - cpu0["worker"],
               "client": cpu_seconds(os.getpid()) - cpu0["client"]}
        metrics = [e for e in (await c.metrics())["models"] if e["model"] == model]
        if metrics:  # what the worker ran: the dtype "auto" picked, the kernel path
            metrics[0]["model_info"] = await c.model_info(model)
    return dt, [r.token_ids for r in results], [results, metrics, cpu]


def start_kernel(home: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """A kernel subprocess with ``home`` and ``flags``, once it answers: (process, address)."""
    home.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{home}/run/kernel.sock"
    log = open(home / "kernel.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel.main", "--home", str(home), "--address", address,
                             *flags], stdout=log, stderr=log)
    from llmos.embedded import try_connect

    for _ in range(600):
        c = try_connect(address, timeout=1.0)
        if c is not None:
            c.close()
            return proc, address
        time.sleep(0.05)
    raise RuntimeError("kernel did not start")


def engine_alone(path: Path, reqs, native: bool = True) -> tuple[float, float, list[tuple[int, int, float]], str]:
    """(seconds for the workload on the paged engine in this process, KV waste at the end of prefill,
    (batch, tokens, seconds) of every step, and the kernels it ran: native or torch).
    ``native=False``: the pure-torch forward (the fallback)."""
    from llmos.drivers.model.engine import load_engine

    e = load_engine(path, engine="paged", max_batch=len(reqs))
    if not native:
        e.ops = None
    # one untimed pass of the whole workload first: oneDNN builds a primitive per new batch shape once per
    # process, and the end-to-end numbers are medians over a worker that has already seen the workload
    for i, r in enumerate(reqs):
        e.add(-1 - i, r.prompt_ids, {"max_new_tokens": r.max_new_tokens, "temperature": 0.0, "ignore_eos": True})
    while e.has_work():
        e.step()
    waste = None
    steps = []
    t = time.perf_counter()
    for i, r in enumerate(reqs):
        e.add(i, r.prompt_ids, {"max_new_tokens": r.max_new_tokens, "temperature": 0.0, "ignore_eos": True})
    while e.has_work():
        ts = time.perf_counter()
        e.step()
        steps.append((e.last_batch, e.last_step_tokens, time.perf_counter() - ts))
        if waste is None and all(s.computed >= s.prompt_len for s in e.seqs.values()):
            allocated = e.pool.usage().used * e.pool.block_size
            waste = (allocated - sum(s.computed for s in e.seqs.values())) / allocated
    return time.perf_counter() - t, waste or 0.0, steps, e.info()["kernels"]


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def dtype_of(info: dict | None) -> str | None:
    """The dtype a model_info answer says the worker runs, wherever it says it."""
    if not info:
        return None
    for ex in info.get("executors") or [info]:
        if isinstance(ex, dict) and ex.get("dtype"):
            return str(ex["dtype"])
    return info.get("dtype")


def llmos_vs_static(path: Path, reqs, dtype: str, repeats: int, model=None) -> dict:
    """LLMOS end to end (a fresh kernel, the model loaded in ``dtype``) and HF's static batch in the same
    dtype, alternated ``repeats`` times (a noisy neighbour moves both alike): medians, runs, TTFT, CPU."""
    from benchmarks import baselines

    tokens = sum(r.max_new_tokens for r in reqs)
    model = model if model is not None else baselines.load(path, dtype)
    home = Path(tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp"))
    (home / "run").mkdir(mode=0o700)
    proc, address = start_kernel(home, "--max-batch", str(len(reqs)))
    llmos_dts, static_dts = [], []
    try:
        for _ in range(repeats):
            dt, outs, (results, metrics, cpu) = asyncio.run(llmos_run(address, str(path), reqs, proc.pid, dtype))
            llmos_dts.append(dt)
            static_dts.append(baselines.static_batch(model, reqs))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    m = metrics[0] if metrics else {}
    ttfts = sorted(r.stats.ttft_s for r in results)
    return {"llmos": tokens / median(llmos_dts), "llmos_runs": [round(tokens / d) for d in llmos_dts],
            "hf_static": tokens / median(static_dts), "hf_static_runs": [round(tokens / d) for d in static_dts],
            "llmos_ttft_p50": ttfts[len(ttfts) // 2], "llmos_ttft_max": ttfts[-1], "outs": outs, "cpu": cpu,
            "llmos_batch_mean": m.get("batch_mean"), "kernels": m.get("kernels"),
            "worker_step_s": m.get("step_time_mean_s", 0.0) * m.get("steps", 0),
            "worker_dtype": dtype_of(m.get("model_info")) or dtype}


def has_bf16_units() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def bench_shape(shape: str, root: Path, skip_sequential: bool, repeats: int, dtypes: list[str],
                peers: bool, peer_repeats: int) -> dict:
    from benchmarks import baselines
    from benchmarks.workload import NO_SEQUENTIAL, make_model, workload

    path = make_model(root, shape)
    model = baselines.load(path)
    reqs = workload(model.config.vocab_size)
    tokens = sum(r.max_new_tokens for r in reqs)
    params = sum(p.numel() for p in model.parameters())
    big = shape in NO_SEQUENTIAL
    row: dict = {"shape": shape, "params": params, "tokens": tokens, "by_dtype": {}}
    print(f"[{shape}] {params / 1e6:.1f}M parameters, {len(reqs)} requests, {tokens} output tokens", flush=True)

    for dt in dtypes:
        if dt != "float32" and big and not has_bf16_units():
            row["by_dtype"][dt] = {"skipped": "no bf16 units on this CPU: converted bf16 is ~3-5x slower here"}
            print(f"  {dt}: skipped on ~{shape} (no bf16 units)", flush=True)
            continue
        # big shapes run once (a static batch of ~350M takes minutes); so does a dtype this CPU only emulates
        reps = 1 if big or (dt != "float32" and not has_bf16_units()) else repeats
        r = llmos_vs_static(path, reqs, dt, reps, model if dt == "float32" else None)
        row["by_dtype"][dt] = r
        print(f"  llmos e2e {dt:9s}   {r['llmos']:8.0f} tok/s  (runs {r['llmos_runs']}; worker ran "
              f"{r['worker_dtype']}, kernels {r['kernels']}; last: cpu s kernel {r['cpu']['kernel']:.2f}, "
              f"worker {r['cpu']['worker']:.2f}, client {r['cpu']['client']:.2f})", flush=True)
        print(f"  hf static {dt:9s}   {r['hf_static']:8.0f} tok/s  (runs {r['hf_static_runs']})", flush=True)
    f32 = row["by_dtype"].get("float32")
    if f32 is None:
        raise SystemExit("--dtypes must include float32 (the issue 3 table and the targets are float32 here)")
    outs = f32["outs"]
    row.update({k: f32[k] for k in ("llmos", "llmos_runs", "hf_static", "hf_static_runs", "llmos_ttft_p50",
                                    "llmos_batch_mean", "cpu", "worker_step_s", "kernels")})
    dt_engine, row["kv_waste"], row["steps"], row["engine_kernels"] = engine_alone(path, reqs)
    row["engine"] = tokens / dt_engine
    print(f"  paged engine alone    {row['engine']:8.0f} tok/s  (KV waste after prefill {row['kv_waste']:.1%})",
          flush=True)
    if not big:
        dt_torch, _, _, _ = engine_alone(path, reqs, native=False)
        row["engine_torch"] = tokens / dt_torch
        print(f"  engine, torch only    {row['engine_torch']:8.0f} tok/s  (no native CPU kernels)", flush=True)
    if not (skip_sequential or big):
        dt, seq_outs = baselines.sequential(model, reqs)
        row["hf_sequential"] = tokens / dt
        row["greedy_match"] = sum(a == b for a, b in zip(outs, seq_outs))
        print(f"  hf sequential         {row['hf_sequential']:8.0f} tok/s  (LLMOS greedy output identical for "
              f"{row['greedy_match']}/{len(reqs)})", flush=True)
    if not big:
        dt, row["hf_cb_method"] = baselines.generate_batch(model, reqs)
        row["hf_generate_batch"] = tokens / dt
        print(f"  hf generate_batch     {row['hf_generate_batch']:8.0f} tok/s  ({row['hf_cb_method']})", flush=True)
    mean_ctx = sum(len(r.prompt_ids) + r.max_new_tokens // 2 for r in reqs) // len(reqs)
    row["ceiling"] = baselines.decode_ceiling(model, len(reqs), mean_ctx)
    row["ceiling_ctx"] = mean_ctx
    print(f"  decode ceiling (b=32) {row['ceiling']:8.0f} tok/s  (context {mean_ctx})", flush=True)
    del model
    if peers:
        from benchmarks import peers as peer_mod

        # ~350M: one pass each, and llama.cpp in f32 and bf16 only (q8_0 is shown on the smaller shapes)
        row["peers"] = peer_mod.run_peers(path, reqs, 512, 1 if big else peer_repeats,
                                          gguf_types=("f32", "bf16") if big else peer_mod.GGUF_TYPES)
        for p in row["peers"]:
            if p.get("outputs") and p["dtype"] in ("f32", "float32"):
                p["greedy_match"] = sum(a == b for a, b in zip(outs, p["outputs"]))
    shutil.rmtree(path, ignore_errors=True)
    return row


def bench_long(root: Path, peers: bool, peer_repeats: int) -> dict:
    """The long-context workload (workload.long_context) on the ~40M shape with a 4,352-token window, float32:
    LLMOS end to end against HF's static batch (one run each: the prompts are all 4,000 tokens, so the static
    batch pads nothing), the time to the first token of each, and the peers."""
    from benchmarks import baselines
    from benchmarks.workload import LONG_CONTEXT, long_context, make_model

    path = make_model(root, "40M", context=LONG_CONTEXT)
    model = baselines.load(path)
    reqs = long_context(model.config.vocab_size)
    tokens = sum(r.max_new_tokens for r in reqs)
    print(f"[long context] ~40M, context {LONG_CONTEXT}: {len(reqs)} x {len(reqs[0].prompt_ids)}-token prompts, "
          f"{reqs[0].max_new_tokens} output tokens each", flush=True)
    row = {"shape": "40M", "context": LONG_CONTEXT, "n": len(reqs), "prompt": len(reqs[0].prompt_ids),
           "output": reqs[0].max_new_tokens, "tokens": tokens}
    r = llmos_vs_static(path, reqs, "float32", 1, model)
    row.update({k: r[k] for k in ("llmos", "hf_static", "llmos_ttft_p50", "llmos_ttft_max", "cpu", "worker_dtype")})
    row["hf_prefill"] = baselines.static_prefill(model, reqs)
    print(f"  llmos e2e             {row['llmos']:8.0f} tok/s  (TTFT p50 {row['llmos_ttft_p50']:.2f} s, "
          f"max {row['llmos_ttft_max']:.2f} s)", flush=True)
    print(f"  hf static batch       {row['hf_static']:8.0f} tok/s  (prefill of the batch {row['hf_prefill']:.2f} s)",
          flush=True)
    del model
    if peers:
        from benchmarks import peers as peer_mod

        row["peers"] = peer_mod.run_peers(path, reqs, LONG_CONTEXT, peer_repeats, gguf_types=("f32",),
                                          ct2=["float32"])
    shutil.rmtree(path, ignore_errors=True)
    return row


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")  # what the kernels can use


def machine() -> str:
    cpu, flags = platform.processor() or "cpu", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    import torch

    simd = " ".join(f for f in SIMD_FLAGS if f in flags) or "none of " + " ".join(SIMD_FLAGS)
    return (f"{cpu} (flags: {simd}), {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")


def bf16_line() -> str:
    if has_bf16_units():
        return ("This CPU has bfloat16 units (" + " ".join(sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()))
                + "): the targets are judged on the bfloat16 figures where they are the faster.")
    return ("This CPU has no bf16 units (no avx512_bf16, no amx_bf16): bfloat16 runs by conversion and is "
            "expected to be slower than float32 here; the float32 figures are the ones the targets are judged on.")


def report(rows: list[dict], command: str, attention: list[str] | None = None, long: dict | None = None,
           load: tuple[str, str] = ("?", "?"), wall_s: float = 0.0) -> str:
    """docs/performance.md's first part; ``attention``: the lines of benchmarks.attention's table; ``long``: the
    long-context row; ``load``: the load averages (1, 5, 15 min) before and after the run."""
    lines = ["# Performance", "",
             f"Measured {datetime.date.today().isoformat()} on {machine()}. Load average before the run "
             f"{load[0]}, after {load[1]}; the run took {wall_s / 60:.1f} min.", "",
             f"Command: `{command}` (all numbers below come from one run of it).", "", bf16_line(), "",
             "Workload: 32 requests, seeded; prompts 8-96 random token ids, outputs 16-96 tokens, EOS ignored, "
             "greedy. Throughput = useful output tokens / wall time (static batch rows that run past their "
             "own length are not counted). LLMOS is measured end to end: this process is the client, over "
             "the ZeroMQ bus, to a kernel process and a model worker process; all 32 spawns are sent at once.",
             "",
             "| shape | LLMOS e2e tok/s | engine alone | HF sequential | HF static batch | HF generate_batch | "
             "ceiling b=32 | LLMOS / static | LLMOS / ceiling | LLMOS / generate_batch | KV waste |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seq = f"{r['hf_sequential']:.0f}" if "hf_sequential" in r else "skipped"
        gb = r.get("hf_generate_batch")
        gb_cell, gb_ratio = (f"{gb:.0f}", f"{r['llmos'] / gb:.2f}x") if gb else ("skipped", "-")
        lines.append(
            f"| ~{r['shape']} ({r['params'] / 1e6:.1f}M) | {r['llmos']:.0f} | {r['engine']:.0f} | {seq} | "
            f"{r['hf_static']:.0f} | {gb_cell} | {r['ceiling']:.0f} | "
            f"{r['llmos'] / r['hf_static']:.2f}x | {r['llmos'] / r['ceiling']:.2f}x | {gb_ratio} | "
            f"{r['kv_waste']:.1%} |")
    lines += ["", "LLMOS end to end and the HF static batch ran alternately; the table shows the median of the "
              "runs: " + "; ".join(f"~{r['shape']} LLMOS {r['llmos_runs']}, static {r['hf_static_runs']} tok/s"
                                   for r in rows) + ".", ""]
    lines += ["", "Targets (issue 3): ~40M: LLMOS >= 2.0x static batch and >= 0.6x the ceiling; ~5M: >= 1.5x static "
              "batch; KV waste < 10% at the end of prefill.", ""]
    for r in rows:
        over = 1 - r["llmos"] / r["engine"]
        c = r["cpu"]
        lines.append(f"- ~{r['shape']}: kernel + bus + client cost {over:.0%} of the engine-alone throughput; "
                     f"in the last run the worker used {c['worker']:.2f} CPU-s, the kernel {c['kernel']:.2f} "
                     f"CPU-s, the client {c['client']:.2f} CPU-s "
                     f"(TTFT p50 {r['llmos_ttft_p50'] * 1000:.0f} ms, mean batch {r['llmos_batch_mean'] or 0:.1f}). "
                     + (f"Greedy output identical to HF generate for {r['greedy_match']}/32 requests. "
                        if "greedy_match" in r else "")
                     + (f"HF continuous batching ran as: {r['hf_cb_method']}." if "hf_cb_method" in r else
                        "HF sequential, HF generate_batch and the torch-only engine skipped (too slow at this size)."))
    lines += peer_section(rows) + target_section(rows) + long_section(long)
    lines += ["", "## Where the time goes", "",
              "The paged engine alone on the same workload, step by step: prefill steps (prompt chunks, "
              "with the decodes of the sequences already in) and decode steps by batch size. The number of "
              "decode steps is fixed by the longest output (96 tokens); as requests finish the batch shrinks, "
              "and a small batch still streams every weight once per step.", "",
              "| shape | prefill steps | prefill s | decode steps | decode s | ms/step at batch 1-8 | 9-16 | 17-24 | "
              "25-32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pre = [x for x in r["steps"] if x[1] > x[0]]
        dec = [x for x in r["steps"] if x[1] == x[0] and x[0] > 0]
        cells = []
        for lo, hi in ((1, 8), (9, 16), (17, 24), (25, 32)):
            ts = [x[2] for x in dec if lo <= x[0] <= hi]
            cells.append(f"{1000 * sum(ts) / len(ts):.1f} ({len(ts)})" if ts else "-")
        lines.append(f"| ~{r['shape']} | {len(pre)} | {sum(x[2] for x in pre):.2f} | {len(dec)} | "
                     f"{sum(x[2] for x in dec):.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Native CPU kernels: the end-to-end runs used "
              + ", ".join(f"{r['kernels']} kernels (~{r['shape']})" for r in rows)
              + "; the first engine-alone runs used "
              + ", ".join(f"{r['engine_kernels']} kernels (~{r['shape']})" for r in rows)
              + ". The engine alone with them (decode attention read in place through the block tables; fused "
              "residual add + RMSNorm, SiLU-gate multiply and rotary embedding) against the same engine on the "
              "pure-torch path (gather + SDPA, one torch operator per step of the layer), same run: "
              + "; ".join(f"~{r['shape']} {r['engine']:.0f} vs {r['engine_torch']:.0f} tok/s "
                          f"({r['engine'] / r['engine_torch']:.2f}x)" for r in rows if "engine_torch" in r) + "."]
    if attention:
        lines += ["", "Decode attention alone (`python -m benchmarks.attention`, same run): one layer of the ~40M "
                  "shape (8 heads of 64, blocks of 8 tokens), pools of 4096 blocks per layer, best of 3 over 12 "
                  "layers. A context longer than 256 tokens is split over both cores.", "", *attention]
    return "\n".join(lines) + "\n"


def judged(r: dict) -> tuple[str, float]:
    """(dtype, tok/s) of LLMOS end to end that a shape's targets are judged on: float32 on a CPU without bf16
    units, the faster of the precisions measured otherwise."""
    runs = {d: x["llmos"] for d, x in r["by_dtype"].items() if "llmos" in x}
    if not has_bf16_units():
        return "float32", runs["float32"]
    d = max(runs, key=runs.__getitem__)
    return d, runs[d]


def best_reduced_llama(r: dict) -> dict | None:
    """The fastest of llama.cpp's reduced-precision rows that ran (bf16, q8_0)."""
    ok = [p for p in r.get("peers", []) if p["peer"].startswith("llama.cpp") and p["dtype"] != "f32" and "tok_s" in p]
    return max(ok, key=lambda p: p["tok_s"]) if ok else None


def peer_row(r: dict, peer: str, dtype: str) -> dict | None:
    return next((p for p in r.get("peers", []) if p["peer"].startswith(peer) and p["dtype"] == dtype
                 and "tok_s" in p), None)


def verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "not measured"
    if ratio >= target:
        return f"{ratio:.2f}x: met"
    return f"{ratio:.2f}x: short by {target - ratio:.2f}x (needs {target / ratio - 1:.0%} more)"


def peer_section(rows: list[dict]) -> list[str]:
    """Issue 13's table: LLMOS and HF in each precision, and the peers, on the same requests."""
    if not any(r.get("by_dtype") for r in rows):
        return []
    lines = ["", "## Precision and peers (issue 13)", "",
             "The same 32 seeded requests (token ids) through every engine, same run. LLMOS: end to end through "
             "the kernel, loaded with `dtype=`; HF: the padded static batch in the same dtype (the issue 3 "
             "table's baseline). llama.cpp: its server (`llama-server`, built from the llama.cpp source "
             "vendored in the llama-cpp-python sdist, `-DGGML_NATIVE=ON`), the model converted by that "
             "source's `convert_hf_to_gguf.py`; 32 slots (`-np 32`), continuous batching, 32 x 512 tokens of "
             "context, threads = cores, all 32 requests sent at once to `/completion` (prompt as token ids, "
             "`n_predict`, `ignore_eos`, greedy, `cache_prompt: false`), after an untimed warm-up (two "
             "requests, 4 tokens). "
             "CTranslate2: its TransformersConverter, all requests in one `generate_batch` (greedy, "
             "min_length = max_length = the longest output: one length per batch, so every row runs to the "
             "longest and only each request's own tokens count, as with HF's static batch), float32 and the "
             "reduced compute types this CPU supports. Throughput = useful output tokens / wall; medians of the "
             "runs listed. The last column: LLMOS end to end (the precision the targets are judged on) / the row.",
             "", "| shape | engine | precision | tok/s | runs | LLMOS / row | note |",
             "|---|---|---|---:|---|---:|---|"]
    for r in rows:
        jd, jv = judged(r)
        for d, x in r["by_dtype"].items():
            if "skipped" in x:
                lines.append(f"| ~{r['shape']} | LLMOS e2e | {d} | - | - | - | skipped: {x['skipped']} |")
                continue
            lines.append(f"| ~{r['shape']} | LLMOS e2e | {d} | {x['llmos']:.0f} | {x['llmos_runs']} | "
                         f"{jv / x['llmos']:.2f}x | worker ran {x['worker_dtype']}, {x['kernels']} kernels |")
        for d, x in r["by_dtype"].items():
            if "skipped" not in x:
                lines.append(f"| ~{r['shape']} | HF static batch | {d} | {x['hf_static']:.0f} | {x['hf_static_runs']} "
                             f"| {jv / x['hf_static']:.2f}x | LLMOS {d} / this: {x['llmos'] / x['hf_static']:.2f}x |")
        for p in r.get("peers", []):
            if "tok_s" in p:
                note = "; ".join(n for n in (
                    p.get("note"),
                    f"greedy output identical to LLMOS float32 for {p['greedy_match']}/32" if "greedy_match" in p
                    else None,
                    f"convert {p['convert_s']:.0f} s" if "convert_s" in p else None,
                    f"`{p['flags']}`" if "flags" in p else None) if n)
                lines.append(f"| ~{r['shape']} | {p['peer']} | {p['dtype']} | {p['tok_s']:.0f} | {p['runs']} | "
                             f"{jv / p['tok_s']:.2f}x | {note} |")
            else:
                lines.append(f"| ~{r['shape']} | {p['peer']} | {p['dtype']} | - | - | - | could not run: "
                             f"{p['error'][:200]} |")
    return lines


def target_section(rows: list[dict]) -> list[str]:
    """Issue 13's benchmark targets against this run: met, or short by how much."""
    by = {r["shape"]: r for r in rows if r.get("by_dtype")}
    lines = ["", "Targets (issue 13), judged on LLMOS end to end in "
             + ("float32 (no bf16 units here)" if not has_bf16_units() else "its faster precision") + ":", ""]
    if "40M" in by:
        r = by["40M"]
        jd, jv = judged(r)
        f32, red = peer_row(r, "llama.cpp", "f32"), best_reduced_llama(r)
        static = r["by_dtype"][jd]["hf_static"]
        lines += [f"- ~40M, >= 2.5x llama.cpp's server in float32: "
                  + verdict(jv / f32["tok_s"] if f32 else None, 2.5),
                  f"- ~40M, >= 2.0x llama.cpp's best reduced precision"
                  + (f" ({red['dtype']}, the faster of its reduced rows)" if red else "") + ": "
                  + verdict(jv / red["tok_s"] if red else None, 2.0),
                  f"- ~40M, >= 2.0x HF static batch in the same dtype ({jd}): " + verdict(jv / static, 2.0)]
    if "350M" in by:
        r = by["350M"]
        jd, jv = judged(r)
        f32 = peer_row(r, "llama.cpp", "f32")
        lines += [f"- ~350M, >= 2.0x HF static batch in the same dtype ({jd}): "
                  + verdict(jv / r["by_dtype"][jd]["hf_static"], 2.0),
                  "- ~350M, >= 1.5x llama.cpp's server (f32): " + verdict(jv / f32["tok_s"] if f32 else None, 1.5)]
    return lines if len(lines) > 3 else []


def long_section(long: dict | None) -> list[str]:
    if not long:
        return []
    lines = ["", "## Long context (issue 13)", "",
             f"{long['n']} sequences of {long['prompt']}-token prompts (random token ids), {long['output']} output "
             f"tokens each, greedy, EOS ignored, on the ~40M shape with a {long['context']}-token window, float32, "
             "one run each. LLMOS end to end (all spawns at once; TTFT from the spawn to the first token, over "
             "the bus) against HF's static batch (equal prompts: nothing padded; its prefill is the same "
             "`generate` with one new token); the peers as above, llama.cpp in f32 only.", "",
             "| engine | tok/s | time to first token | LLMOS / row |", "|---|---:|---|---:|",
             f"| LLMOS e2e | {long['llmos']:.0f} | p50 {long['llmos_ttft_p50']:.2f} s, "
             f"last {long['llmos_ttft_max']:.2f} s | 1.00x |",
             f"| HF static batch | {long['hf_static']:.0f} | {long['hf_prefill']:.2f} s (all 8, one forward) | "
             f"{long['llmos'] / long['hf_static']:.2f}x |"]
    for p in long.get("peers", []):
        if "tok_s" in p:
            first = f"server prompt time p50 {p['prefill_p50_s']:.2f} s" if "prefill_p50_s" in p else "-"
            lines.append(f"| {p['peer']} {p['dtype']} | {p['tok_s']:.0f} | {first} | "
                         f"{long['llmos'] / p['tok_s']:.2f}x |")
        else:
            lines.append(f"| {p['peer']} {p['dtype']} | could not run: {p['error'][:200]} | - | - |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="standard-workload shapes, comma-separated, or 'none'")
    ap.add_argument("--workloads", default="standard,long", help="standard (issue 3's 32 requests), long")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="LLMOS and HF static batch precisions")
    ap.add_argument("--peers", action="store_true", help="add llama.cpp's server and CTranslate2 (benchmarks.peers)")
    ap.add_argument("--skip-sequential", action="store_true", help="skip the slowest baseline")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/performance.md")
    ap.add_argument("--repeats", type=int, default=3, help="LLMOS and static-batch runs, alternated (median)")
    ap.add_argument("--peer-repeats", type=int, default=3, help="timed passes per peer (median)")
    args = ap.parse_args()
    ensure_malloc_env()
    import torch

    torch.set_num_threads(psutil.cpu_count(logical=False) or torch.get_num_threads())
    load0, t0 = " ".join(f"{x:.2f}" for x in os.getloadavg()), time.perf_counter()
    workloads = set(args.workloads.split(","))
    shapes = [] if args.shapes == "none" or "standard" not in workloads else args.shapes.split(",")
    dtypes = args.dtypes.split(",")
    root = Path(tempfile.mkdtemp(prefix="llmos-models-"))
    try:
        rows = [bench_shape(s, root, args.skip_sequential, args.repeats, dtypes, args.peers, args.peer_repeats)
                for s in shapes]
        long = bench_long(root, args.peers, max(1, args.peer_repeats // 3)) if "long" in workloads else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command = "python -m benchmarks.run" + (f" --shapes {args.shapes}" if args.shapes != DEFAULT_SHAPES else "") + \
        (f" --workloads {args.workloads}" if args.workloads != "standard,long" else "") + \
        (f" --dtypes {args.dtypes}" if args.dtypes != "float32,bfloat16" else "") + \
        (" --peers" if args.peers else "") + \
        (" --skip-sequential" if args.skip_sequential else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 3 else "") + \
        (f" --peer-repeats {args.peer_repeats}" if args.peer_repeats != 3 else "")
    from benchmarks import attention  # after the re-exec and the shapes: it builds its own pools

    timings = attention.measure() if rows else []  # [] without the native kernels
    load = (load0, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if not rows:
        print("\n" + "\n".join(long_section(long)))
        return 0
    text = report(rows, command, attention.table(timings) if timings else None, long, load,
                  time.perf_counter() - t0)
    print("\n" + text)
    if not args.no_write:
        doc = ROOT / "docs" / "performance.md"
        # the sections other benchmarks record (the scheduler's, the context switch) are kept as they are
        old = doc.read_text() if doc.exists() else ""
        kept = old[old.index(OTHER_SECTIONS):] if OTHER_SECTIONS in old else ""
        doc.write_text(text.rstrip("\n") + "\n\n" + kept if kept else text)
    return 0


DEFAULT_SHAPES = "5M,40M,350M"
OTHER_SECTIONS = "## The scheduler"


if __name__ == "__main__":
    sys.exit(main())
