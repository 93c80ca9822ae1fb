"""``llmos models``, ``load``, ``unload``, ``model-info``, ``devices`` and ``metrics``: the models the kernel
holds, the devices they hold, and what they do."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llmos._args import syscall_arg
from llmos._command import address_of, connect
from llmos.client import Client
from llmos.progress import LoadBar, Stages, model_name
from llmos.shell_views import format_devices, format_metrics


def _mib(n: Any) -> str:
    return f"{(n or 0) / 2**20:.0f} MiB"


def format_models(models: list[dict[str, Any]]) -> str:
    """The ``llmos models`` table; memory is the estimate per instance and, in the last column, for all of them."""
    lines = [f"{'MODEL':<48} {'DEVICE':<7} {'INST':>4} {'KEEP':>6} {'KV USED/TOTAL':>14} {'BATCH':>6} "
             f"{'MEM/INST':>9} {'MEM TOTAL':>10}"]
    for d in models:
        exs = d.get("executors") or []
        used = sum(e.get("kv_used", 0) for e in exs)
        total = sum(e.get("kv_total", 0) for e in exs)
        batch = max((e.get("batch_last", 0) for e in exs), default=0)
        if exs and not all(e.get("ready") for e in exs):  # no pool yet: say so, not 0/0
            used_total, batch = "loading", "-"
        else:
            used_total = f"{used}/{total}"
        keep = "pinned" if d.get("keep_alive") == -1 else f"{d.get('keep_alive', 0):.0f}s"
        each = d["estimate"]["total_bytes"]
        lines.append(f"{d['model'][-48:]:<48} {d.get('device', ''):<7} {len(exs):>4} {keep:>6} "
                     f"{used_total:>14} {batch:>6} {_mib(each):>9} {_mib(each * len(exs)):>10}")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    with connect(args) as c:
        models = c.models()
    print(json.dumps(models) if args.json else format_models(models))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    opts = {k: getattr(args, k) for k in ("device", "instances", "kv_policy", "kv_blocks", "kv_max_blocks",
                                          "user_cap_blocks", "max_batch", "keep_alive", "engine", "backend",
                                          "num_cpus", "num_gpus", "placement", "dtype", "prefix_cache")}
    address = address_of(args)
    stages = Stages(lambda: Client(address), args.model, spawning=True, ready="ready")
    try:
        with connect(args) as c, LoadBar(f"loading model {model_name(args.model)}", poll=stages.load):
            d = c.model_load(args.model, **{k: v for k, v in opts.items() if v is not None})
    finally:
        stages.close()
    print(json.dumps(d) if args.json else format_models([d]))
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with connect(args) as c:
        d = c.model_unload(args.model, force=args.force)
    print(json.dumps(d) if args.json else f"unloaded {d['model']}")
    return 0


def format_model_info(d: dict[str, Any]) -> str:
    """``llmos model-info`` for people: a loaded model's table row and instances, or an unloaded one's estimate."""
    est = d.get("estimate") or {}
    sizes = ", ".join(f"{k.removesuffix('_bytes')} {_mib(v)}" for k, v in est.items()
                      if k.endswith("_bytes") and k != "total_bytes" and isinstance(v, (int, float)))
    lines = [f"model {d['model']}: {'loaded' if d.get('loaded') else 'not loaded'}",
             f"  memory per instance: {_mib(est.get('total_bytes'))}" + (f" ({sizes})" if sizes else "")]
    if est.get("kv_tokens"):
        lines.append(f"  KV pool: {est['kv_tokens']} tokens")
    if d.get("loaded"):
        keep = "pinned" if d.get("keep_alive") == -1 else f"{d.get('keep_alive', 0):.0f} s once idle"
        lines.append(f"  device {d.get('device')}, kv policy {d.get('kv_policy')}, keep-alive {keep}")
        for ex in d.get("executors") or []:
            state = "ready" if ex.get("ready") else f"loading{': ' + ex['stage'] if ex.get('stage') else ''}"
            lines.append(f"  instance {ex.get('executor')}: worker pid {ex.get('worker_pid')}, {state}, engine "
                         f"{ex.get('engine')}, {ex.get('dtype') or 'dtype ?'}, context {ex.get('context_len')} tokens, "
                         f"KV {ex.get('kv_used', 0)}/{ex.get('kv_total', 0)} blocks, running {ex.get('running', 0)}")
            if ex.get("kernel_path"):
                lines.append(f"    kernels: {ex['kernel_path']}")
            if ex.get("prefix_cache") is not None:
                lines.append("    prefix cache: " + (
                    f"on, {ex.get('prefix_hits', 0)} hits ({ex.get('prefix_lookups', 0)} lookups), "
                    f"{ex.get('prefix_hit_tokens', 0)} tokens not recomputed, {ex.get('prefix_cached_blocks', 0)} "
                    f"blocks cached, {ex.get('prefix_evictions', 0)} evicted" if ex["prefix_cache"] else "off"))
    return "\n".join(lines)


def cmd_model_info(args: argparse.Namespace) -> int:
    with connect(args) as c:
        d = c.model_info(args.model)
    print(json.dumps(d) if args.json else format_model_info(d))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with connect(args) as c:
        devices = c.devices()
    print(json.dumps(devices) if args.json else format_devices(devices))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.prometheus:
        with connect(args) as c:
            sys.stdout.write(c.prometheus())
        return 0
    with connect(args) as c:
        m = c.metrics()
    print(json.dumps(m) if args.json else format_metrics(m))  # the shell's table (llmos top: the live view)
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the model, device and metrics commands to ``llmos``."""
    ms = sub.add_parser("models", parents=[common], help="list loaded models")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(fn=cmd_models)
    ld = sub.add_parser("load", parents=[common], help="load a model: device, instances, KV memory policy, keep-alive")
    ld.add_argument("model", nargs="?", default=None, help="model directory (default: the default model)")
    ld.add_argument("--device", default=None, help="cpu, cuda:N or auto: the device with room, GPUs first (default "
                    "auto)")
    ld.add_argument("--instances", type=syscall_arg("model_load", "instances"), default=None,
                    help="model instances, each a worker process (default 1)")
    ld.add_argument("--kv-policy", choices=("static", "dynamic", "isolated"), default=None,
                    help="KV memory: static (a fixed pool), dynamic (grows with demand, shrinks when idle), isolated "
                    "(fixed, with a cap per user) (default: the kernel's --kv-policy)")
    ld.add_argument("--kv-blocks", type=syscall_arg("model_load", "kv_blocks"), default=None,
                    help="KV pool size in blocks (the initial size under dynamic; default: sized to memory)")
    ld.add_argument("--kv-max-blocks", type=syscall_arg("model_load", "kv_max_blocks"), default=None,
                    help="the dynamic policy's largest pool, in blocks (default: the initial size, --kv-blocks)")
    ld.add_argument("--user-cap-blocks", type=syscall_arg("model_load", "user_cap_blocks"), default=None,
                    help="the isolated policy's cap per user, in blocks (default: no cap)")
    ld.add_argument("--max-batch", type=syscall_arg("model_load", "max_batch"), default=None,
                    help="most processes in one step (default: as many as the KV pool allows)")
    ld.add_argument("--keep-alive", type=syscall_arg("model_load", "keep_alive"), default=None, help="seconds it stays loaded once idle; -1 pins, 0 unloads after use (default 300)")
    ld.add_argument("--engine", choices=("auto", "paged", "sequential"), default=None,
                    help="the engine: paged (continuous batching, paged KV), sequential, or auto (default)")
    ld.add_argument("--backend", choices=("local", "ray", "auto"), default=None,
                    help="local: worker processes of the kernel; ray: Ray actors on the cluster's nodes (a kernel "
                    "started with --ray); auto: ray when the kernel has Ray (default local)")
    ld.add_argument("--num-cpus", type=syscall_arg("model_load", "num_cpus"), default=None,
                    help="--backend ray: CPUs (and torch threads) per instance (default 1)")
    ld.add_argument("--num-gpus", type=syscall_arg("model_load", "num_gpus"), default=None,
                    help="--backend ray: GPUs per instance, 0 to 1 (default 0: a CPU instance)")
    ld.add_argument("--placement", choices=("spread", "pack"), default=None,
                    help="--backend ray: spread instances over nodes or pack them onto few (default spread)")
    ld.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                    help="weights' and KV cache's precision: auto (default: bfloat16 where the CPU has AMX or "
                         "AVX512-BF16 or the GPU has bfloat16, else float32 on a CPU), float32, bfloat16, float16")
    ld.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_const", const=False, default=None,
                    help="do not share the KV blocks of identical prompt prefixes between processes (default: "
                         "shared; off is for comparison)")
    ld.add_argument("--json", action="store_true")
    ld.set_defaults(fn=cmd_load)
    ul = sub.add_parser("unload", parents=[common], help="unload a model")
    ul.add_argument("model", nargs="?", default=None, help="a loaded model's directory or store name (default: "
                    "the default model)")
    ul.add_argument("--force", action="store_true", help="also end its live processes (default: EBUSY while it "
                    "has any)")
    ul.add_argument("--json", action="store_true", help="print what was unloaded as JSON")
    ul.set_defaults(fn=cmd_unload)
    mi = sub.add_parser("model-info", parents=[common], help="describe a model: memory estimate, instances, KV pool")
    mi.add_argument("model", nargs="?", default=None, help="a model directory or store name (default: the default "
                    "model)")
    mi.add_argument("--json", action="store_true", help="the kernel's description as one JSON object")
    mi.set_defaults(fn=cmd_model_info)
    dv = sub.add_parser("devices", parents=[common], help="cpu and gpus, with what models hold")
    dv.add_argument("--json", action="store_true")
    dv.set_defaults(fn=cmd_devices)
    mt = sub.add_parser("metrics", parents=[common], help="process and model metrics")
    mt.add_argument("--json", action="store_true", help="the kernel's metrics reply as one JSON object (default: "
                    "tables for people: processes, latency percentiles in ms, one row per model instance)")
    mt.add_argument("--prometheus", action="store_true", help="the Prometheus text format, as kernel start "
                    "--metrics-port serves it (counters, gauges, TTFT/TPOT histograms in seconds)")
    mt.set_defaults(fn=cmd_metrics)
