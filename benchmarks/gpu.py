"""On a machine with an NVIDIA GPU: the checks this project's CPU-only CI cannot make, and the serving
benchmark on CUDA beside the CPU, in one run: ``python -m benchmarks.gpu [--out DIR] [--shape 40M]``.

1. Devices: ``llmos devices`` lists exactly the GPUs NVML reports, with their memory (tests use a FakeGPU).
2. Placement: a model loaded with ``device="cuda:0"`` runs on the GPU (its worker holds GPU memory, which
   NVML shows), beside a copy of it loaded on the CPU.
3. Correctness: the same random-weight model gives the same greedy tokens on CUDA (``--dtype``, default
   auto: bfloat16 where the GPU has it) as on the CPU (float32): the count of identical sequences, and where
   others first differ; and HF ``generate`` on the same GPU in the same dtype against LLMOS.
4. Speed: ``llmos bench`` (closed loop at several concurrencies, 128-token prompts and outputs) against the
   CUDA model and against the CPU copy: output tok/s, TTFT and TPOT p50/p99; HF's padded static batch on the
   same GPU in the same dtype (the same request count and lengths).
5. Metrics: the Prometheus text has the GPU's device memory gauges.

Prints a report in Markdown and writes it, with the raw numbers, to DIR (gpu.md, gpu.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.run import start_kernel
from benchmarks.workload import make_model, workload


def _nvml() -> dict[str, Any]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no NVIDIA driver (a dry run of this script on a CPU machine)
        return {"gpus": [], "driver": None}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_total_bytes": pynvml.nvmlDeviceGetMemoryInfo(h).total,
                         "processes": {p.pid: p.usedGpuMemory for p in
                                       pynvml.nvmlDeviceGetComputeRunningProcesses(h)}})
        return {"gpus": gpus, "driver": pynvml.nvmlSystemGetDriverVersion()}
    finally:
        pynvml.nvmlShutdown()


def _bench(address: str, model: Path, concurrency: str, n: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmos", "--address", address, "bench", "--model", str(model), "--concurrency",
           concurrency, "-n", str(n), "--prompt-len", "128", "--output-len", "128", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if out.returncode != 0:
        raise RuntimeError(f"llmos bench exited {out.returncode}: {out.stderr[-800:]}")
    return json.loads(out.stdout)


def _hf_static(model_dir: Path, args: argparse.Namespace, report: dict) -> dict[str, Any]:
    """HF's padded static batch on the GPU model's device and dtype: the bench's request count, 128-token
    prompts and outputs (llmos bench's shape), greedy; useful output tokens per second, and HF's greedy
    tokens for the first sequences against LLMOS's in the same dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmos.client import Client
    from llmos.drivers.model.precision import resolve

    dev = torch.device(args.gpu_device)
    dtype = getattr(torch, resolve(args.dtype, dev.type))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size
    reqs = workload(vocab, n=args.requests, seed=2, prompt=(128, 128), output=(128, 128))
    ids = torch.tensor([r.prompt_ids for r in reqs], device=dev)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                             do_sample=False, pad_token_id=0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t
    hf = out[:, ids.shape[1]:].tolist()
    c = Client(report.get("address") or "")
    same = 0
    for r, ref in list(zip(reqs, hf))[:args.greedy]:
        pid = c.spawn(prompt_ids=r.prompt_ids, model=str(model_dir), max_new_tokens=128, temperature=0,
                      ignore_eos=True)
        same += c.wait(pid, timeout=300).token_ids == ref
    c.close()
    return {"dtype": str(dtype).replace("torch.", ""), "requests": len(reqs), "tok_per_s": len(reqs) * 128 / dt,
            "greedy_same_as_llmos": f"{same}/{min(args.greedy, len(reqs))}"}


def _step(report: dict, name: str, fn: Any) -> Any:
    t0 = time.time()
    try:
        value = fn()
        report["steps"][name] = {"ok": True, "seconds": round(time.time() - t0, 2)}
        return value
    except Exception as exc:  # one failed check must not hide the others
        report["steps"][name] = {"ok": False, "seconds": round(time.time() - t0, 2), "error": repr(exc)[:1500],
                                 "traceback": traceback.format_exc()[-3000:]}
        print(f"[{name}] FAILED: {exc!r}", flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."), help="where gpu.md and gpu.json go (default .)")
    ap.add_argument("--shape", default="40M", help="the random-weight model's shape (benchmarks.workload.SHAPES)")
    ap.add_argument("--concurrency", default="1,8,32", help="bench points (default 1,8,32)")
    ap.add_argument("--greedy", type=int, default=8, help="sequences compared token by token (default 8)")
    ap.add_argument("--requests", type=int, default=32, help="requests per bench point (default 32)")
    ap.add_argument("--gpu-device", default="cuda:0", help="the device of the 'GPU' model (cpu: a dry run of "
                    "this script where there is no GPU; default cuda:0)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                    help="the GPU model's precision (model_load's dtype; auto: bfloat16 where the GPU has it, "
                         "else float16); HF's static batch runs in the same one (default auto)")
    args = ap.parse_args()
    import torch

    from llmos.client import Client

    report: dict[str, Any] = {"steps": {}, "torch": torch.__version__, "cuda": torch.version.cuda,
                              "date": time.strftime("%Y-%m-%d")}
    root = Path(tempfile.mkdtemp(prefix="llmos-gpu-"))
    proc = None
    try:
        gpu_model = make_model(root, args.shape)
        cpu_model = root / f"{gpu_model.name}-cpu"
        shutil.copytree(gpu_model, cpu_model)
        proc, address = start_kernel(root / "home")
        report["address"] = address
        c = Client(address)
        nv = _nvml()
        report["nvml"] = {"driver": nv["driver"], "gpus": [{k: g[k] for k in ("index", "name", "memory_total_bytes")}
                                                           for g in nv["gpus"]]}

        def devices() -> dict:
            devs = c.devices()
            listed = [d["name"] for d in devs if d["kind"] == "gpu"]
            assert listed == [f"cuda:{g['index']}" for g in nv["gpus"]], (listed, nv["gpus"])
            return {"listed": listed, "first_gpu": next((d for d in devs if d["kind"] == "gpu"), None)}
        report["devices"] = _step(report, "devices", devices)

        def load() -> dict:
            t0 = time.time()
            g = c.model_load(str(gpu_model), device=args.gpu_device, keep_alive=-1, dtype=args.dtype)
            t1 = time.time()
            k = c.model_load(str(cpu_model), device="cpu", keep_alive=-1)
            t2 = time.time()
            worker = g["executors"][0]["worker_pid"]
            held = (_nvml()["gpus"] or [{"processes": {}}])[0]["processes"]
            return {"gpu_load_s": t1 - t0, "cpu_load_s": t2 - t1, "gpu_device": g["device"],
                    "cpu_device": k["device"], "estimate_bytes": g["estimate"]["total_bytes"],
                    "worker_pid": worker, "worker_gpu_bytes_nvml": held.get(worker),
                    "kv_blocks_gpu": g["executors"][0]["kv_total"], "kv_blocks_cpu": k["executors"][0]["kv_total"],
                    "gpu_dtype": g["executors"][0].get("dtype"), "gpu_kernel_path": g["executors"][0].get("kernel_path")}
        report["load"] = _step(report, "load", load)

        def greedy() -> dict:
            vocab = json.loads((gpu_model / "config.json").read_text())["vocab_size"]
            reqs = workload(vocab, n=args.greedy, seed=1, prompt=(8, 64), output=(48, 48))
            same, first_diff = 0, []
            for r in reqs:
                ids, outs = r.prompt_ids, []
                for m in (gpu_model, cpu_model):
                    pid = c.spawn(prompt_ids=ids, model=str(m), max_new_tokens=r.max_new_tokens, temperature=0,
                                  ignore_eos=True)
                    outs.append(c.wait(pid, timeout=300).token_ids)
                if outs[0] == outs[1]:
                    same += 1
                else:
                    first_diff.append(next(i for i, (a, b) in enumerate(zip(*outs)) if a != b))
            return {"sequences": len(reqs), "identical": same, "first_difference_at": first_diff}
        report["greedy"] = _step(report, "greedy", greedy)

        report["bench_gpu"] = _step(report, "bench_gpu", lambda: _bench(address, gpu_model, args.concurrency, args.requests))
        report["hf_gpu"] = _step(report, "hf_gpu", lambda: _hf_static(gpu_model, args, report))
        report["bench_cpu"] = _step(report, "bench_cpu", lambda: _bench(address, cpu_model, args.concurrency, args.requests))

        def metrics() -> list[str]:
            lines = [ln for ln in c.prometheus().splitlines() if f'device="{args.gpu_device}"' in ln]
            assert any(ln.startswith("llmos_device_memory_reserved_bytes") for ln in lines), lines[:5]
            return lines[:12]
        report["prometheus"] = _step(report, "prometheus", metrics)
        c.close()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log = root / "home" / "kernel.log"
        if log.exists():
            report["kernel_log_tail"] = log.read_text(errors="replace")[-3000:]
        shutil.rmtree(root, ignore_errors=True)
    text = render(report, args)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text(text)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(s["ok"] for s in report["steps"].values()) else 1


def render(report: dict, args: argparse.Namespace) -> str:
    gpus = ", ".join(f"{g['name']} ({g['memory_total_bytes'] / 2**30:.0f} GiB)" for g in
                     (report.get("nvml") or {}).get("gpus", []))
    lines = [f"## On a GPU: `python -m benchmarks.gpu --shape {args.shape} --concurrency {args.concurrency} "
             f"--requests {args.requests}`", "",
             f"{report['date']}; {gpus}; driver {(report.get('nvml') or {}).get('driver')}; torch {report['torch']} "
             f"(CUDA {report['cuda']}); a random-weight {args.shape} Llama ({(report.get('load') or {}).get('gpu_dtype')} "
             "on the GPU, float32 on the CPU), "
             "128-token prompts and outputs.",
             "", "| check | result |", "|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {'ok' if step['ok'] else 'FAILED: ' + step['error'][:200]} ({step['seconds']} s) |")
    load, greedy = report.get("load") or {}, report.get("greedy") or {}
    if load:
        lines += ["", f"Load: {load['gpu_load_s']:.1f} s on {load['gpu_device']}, {load['cpu_load_s']:.1f} s on "
                      f"{load['cpu_device']}; the kernel reserved {load['estimate_bytes'] / 2**20:.0f} MiB for the GPU "
                      f"instance, NVML shows its worker holding "
                      f"{(load['worker_gpu_bytes_nvml'] or 0) / 2**20:.0f} MiB; KV blocks {load['kv_blocks_gpu']} "
                      f"(GPU) and {load['kv_blocks_cpu']} (CPU)."]
    if greedy:
        lines += ["", f"Greedy tokens, CUDA vs CPU: {greedy['identical']} of {greedy['sequences']} sequences "
                      f"identical" + (f"; the others first differ at tokens {greedy['first_difference_at']}"
                                      if greedy["first_difference_at"] else "") + "."]
    rows = []
    for where in ("gpu", "cpu"):
        b = report.get(f"bench_{where}")
        for p in (b or {}).get("points", []):
            ttft, tpot = p.get("ttft_ms") or {}, p.get("tpot_ms") or {}
            rows.append(f"| {where} | {p['load']['value']} | {p['completed']}/{p['requests']} | "
                        f"{p['output_throughput']:.0f} | {ttft.get('p50', 0):.1f} / {ttft.get('p99', 0):.1f} | "
                        f"{tpot.get('p50', 0):.2f} / {tpot.get('p99', 0):.2f} |")
    if rows:
        lines += ["", "| device | concurrency | done | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |",
                  "|---|---:|---:|---:|---:|---:|", *rows]
    hf = report.get("hf_gpu")
    if hf:
        lines += ["", f"HF padded static batch on the same GPU, {hf['dtype']}, {hf['requests']} requests of 128 + 128 "
                      f"tokens: {hf['tok_per_s']:.0f} tok/s; greedy tokens identical to LLMOS's (same dtype): "
                      f"{hf['greedy_same_as_llmos']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
