"""The ``llmos`` command: kernel start/stop/status, run, ps, kill, wait, stat."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmos import embedded
from llmos.client import Client
from llmos.kernel.config import add_flags as add_kernel_flags
from llmos.syscalls.address import llmos_home, resolve_address
from llmos.syscalls.errors import KernelUnavailable, LLMOSError
from llmos.types import ProcessInfo


def _address(args: argparse.Namespace) -> str:
    return resolve_address(args.address, _home(args))


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser().resolve() if getattr(args, "home", None) else llmos_home()


def _connect(args: argparse.Namespace) -> Client:
    client = embedded.try_connect(_address(args))
    if client is None:
        raise KernelUnavailable(f"no kernel running at {_address(args)} (start one: llmos kernel start)")
    return client


# -- kernel --------------------------------------------------------------------------------
def _kernel_flags(args: argparse.Namespace) -> list[str]:
    from llmos.kernel.config import to_argv

    return to_argv(args)


def cmd_kernel_start(args: argparse.Namespace) -> int:
    address, home = _address(args), _home(args)
    if args.foreground:
        from llmos.kernel.main import main as kernel_main

        return kernel_main(["--home", str(home), "--address", address, *_kernel_flags(args)])
    client = embedded.try_connect(address)
    if client is not None:
        print(f"llmos kernel already running: pid {client.kernel['pid']} at {address}")
        client.close()
        return 0
    proc, client = embedded.launch(address, home, embedded=False, extra=_kernel_flags(args))
    pid = client.kernel["pid"]
    client.close()
    print(f"llmos kernel {'started' if proc else 'already running'}: pid {pid} at {address}")
    return 0


def cmd_kernel_stop(args: argparse.Namespace) -> int:
    address = _address(args)
    client = embedded.try_connect(address)
    if client is None:
        print(f"no kernel running at {address}")
        return 0
    pid = client.kernel["pid"]
    embedded.stop(client, None, pid)
    print(f"llmos kernel stopped: pid {pid}")
    return 0


def cmd_kernel_status(args: argparse.Namespace) -> int:
    address = _address(args)
    client = embedded.try_connect(address)
    if client is None:
        if args.json:
            print(json.dumps({"running": False, "address": address}))
        else:
            print(f"no kernel running at {address}")
        return 1
    with client:
        info = client.kernel_info()
    info["running"] = True
    if args.json:
        print(json.dumps(info))
        return 0
    procs = ", ".join(f"{k.lower()} {v}" for k, v in info["processes"].items() if v) or "none"
    print(f"llmos kernel {info['version']}: pid {info['pid']} at {info['address']}, up {info['uptime_s']:.0f} s")
    print(f"  processes: {procs}")
    for mdl in info["models"]:
        print(f"  model {mdl['model']}: worker pid {mdl['worker_pid']}, {mdl['device']}, running {mdl['running']}")
    return 0


# -- processes -----------------------------------------------------------------------------
def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.stop:
        params["stop"] = args.stop
    if args.ignore_eos:
        params["ignore_eos"] = True
    return params


def cmd_run(args: argparse.Namespace) -> int:
    from llmos.llmos import LLMOS

    os_ = LLMOS(model_path=args.model, address=args.address)
    try:
        kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat \
            else {"prompt": args.prompt}
        pid = os_.spawn(priority=args.priority, **kwargs, **_params(args))
        stream = os_.stream(pid)
        try:
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            os_.kill(pid, "TERM")
            sys.stdout.write("\n")
            print(f"[pid {pid} terminated]", file=sys.stderr)
            return 130
        sys.stdout.write("\n")
        result = stream.result
        if result is not None:
            os_.wait(pid, timeout=30)  # reap it
            if result.finish_reason == "error":
                print(f"llmos: pid {pid} failed: {result.error['message'] if result.error else ''}", file=sys.stderr)
                return 1
            if args.verbose:
                s = result.stats
                print(f"[pid {pid}: {result.finish_reason}, {s.output_tokens} tokens, ttft {s.ttft_s or 0:.3f} s]",
                      file=sys.stderr)
        return 0
    finally:
        os_.close()


def format_ps(procs: list[ProcessInfo]) -> str:
    lines = [f"{'PID':>6}  {'STATE':<8} {'PRI':>4} {'OWNER':<10} {'IN':>6} {'OUT':>6}  MODEL"]
    for p in procs:
        lines.append(f"{p.pid:>6}  {p.state:<8} {p.priority:>4} {p.owner[:10]:<10} {p.prompt_tokens:>6} "
                     f"{p.output_tokens:>6}  {p.model}")
    return "\n".join(lines)


def cmd_ps(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        procs = c.ps()
    if args.json:
        print(json.dumps([p.__dict__ for p in procs]))
    else:
        print(format_ps(procs))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        state = c.kill(args.pid, args.signal.upper().removeprefix("SIG"))
    print(f"pid {args.pid}: {state}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        r = c.wait(args.pid, timeout=args.timeout)
    print(json.dumps({"pid": r.pid, "finish_reason": r.finish_reason, "text": r.text,
                      "stats": r.stats.__dict__, "error": r.error}) if args.json else r.text)
    return 0 if r.finish_reason != "error" else 1


def cmd_stat(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        print(json.dumps(c.stat(args.pid).__dict__, indent=2))
    return 0


def _mib(n: Any) -> str:
    return f"{(n or 0) / 2**20:.0f} MiB"


def format_models(models: list[dict[str, Any]]) -> str:
    lines = [f"{'MODEL':<48} {'DEVICE':<7} {'INST':>4} {'KEEP':>6} {'KV USED/TOTAL':>14} {'BATCH':>6} {'MEM':>9}"]
    for d in models:
        exs = d.get("executors") or []
        used = sum(e.get("kv_used", 0) for e in exs)
        total = sum(e.get("kv_total", 0) for e in exs)
        batch = max((e.get("batch_last", 0) for e in exs), default=0)
        keep = "pinned" if d.get("keep_alive") == -1 else f"{d.get('keep_alive', 0):.0f}s"
        lines.append(f"{d['model'][-48:]:<48} {d.get('device', ''):<7} {len(exs):>4} {keep:>6} "
                     f"{f'{used}/{total}':>14} {batch:>6} {_mib(d['estimate']['total_bytes']):>9}")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        models = c.models()
    print(json.dumps(models) if args.json else format_models(models))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    opts = {k: getattr(args, k) for k in ("device", "instances", "kv_policy", "kv_blocks", "kv_max_blocks",
                                          "user_cap_blocks", "max_batch", "keep_alive", "engine")}
    with _connect(args) as c:
        d = c.model_load(args.model, **{k: v for k, v in opts.items() if v is not None})
    print(json.dumps(d) if args.json else format_models([d]))
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        d = c.model_unload(args.model, force=args.force)
    print(f"unloaded {d['model']}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        print(json.dumps(c.model_info(args.model), indent=2))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        devices = c.devices()
    if args.json:
        print(json.dumps(devices))
        return 0
    for d in devices:
        if d["kind"] == "cpu":
            print(f"cpu: {d['cores_logical']} cores, load {d['load_avg'][0]:.2f}, RAM {_mib(d['memory_available_bytes'])}"
                  f" free of {_mib(d['memory_total_bytes'])}; models hold {_mib(d['reserved_bytes'])} of a "
                  f"{_mib(d['budget_bytes'])} budget")
        else:
            print(f"{d['name']}: {d['model']}, {_mib(d['memory_total_bytes'])}, models hold {_mib(d['reserved_bytes'])}")
    if not any(d["kind"] == "gpu" for d in devices):
        print("gpus: none")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        print(json.dumps(c.metrics(), indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmos", description="LLMOS: an operating-system-style kernel for LLMs")
    ap.add_argument("--address", default=None, help="kernel bus address (default: $LLMOS_ADDRESS or ipc under "
                                                    "$LLMOS_HOME/run)")
    ap.add_argument("--home", default=None, help="state directory (default: $LLMOS_HOME or ~/.llmos)")
    sub = ap.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernel", help="start, stop or inspect the kernel daemon")
    ksub = k.add_subparsers(dest="action", required=True)
    ks = ksub.add_parser("start", help="start the kernel as a daemon")
    ks.add_argument("--foreground", action="store_true", help="stay attached to the terminal")
    add_kernel_flags(ks)
    ks.set_defaults(fn=cmd_kernel_start)
    ksub.add_parser("stop", help="stop the kernel and its model workers").set_defaults(fn=cmd_kernel_stop)
    kst = ksub.add_parser("status", help="is a kernel running; its pid, address, uptime")
    kst.add_argument("--json", action="store_true")
    kst.set_defaults(fn=cmd_kernel_status)

    r = sub.add_parser("run", help="generate from a prompt, streaming tokens to stdout")
    r.add_argument("prompt")
    r.add_argument("--model", default=None, help="model directory (default: the shipped default model)")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--priority", type=int, default=0, help="nice value -20..19, lower runs first")
    r.add_argument("--temperature", type=float, default=None)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true")
    r.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    r.add_argument("-v", "--verbose", action="store_true", help="print finish reason and timings to stderr")
    r.set_defaults(fn=cmd_run)

    p = sub.add_parser("ps", help="list processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ps)
    kl = sub.add_parser("kill", help="signal a process (TERM keeps partial output; KILL ends it at once)")
    kl.add_argument("pid", type=int)
    kl.add_argument("signal", nargs="?", default="TERM")
    kl.set_defaults(fn=cmd_kill)
    w = sub.add_parser("wait", help="wait for a process and print its output")
    w.add_argument("pid", type=int)
    w.add_argument("--timeout", type=float, default=None)
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_wait)
    st = sub.add_parser("stat", help="one process's record and stats")
    st.add_argument("pid", type=int)
    st.set_defaults(fn=cmd_stat)

    ms = sub.add_parser("models", help="list loaded models")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(fn=cmd_models)
    ld = sub.add_parser("load", help="load a model: device, instances, KV memory policy, keep-alive")
    ld.add_argument("model", nargs="?", default=None, help="model directory (default: the default model)")
    ld.add_argument("--device", default=None, help="cpu, cuda:N or auto")
    ld.add_argument("--instances", type=int, default=None)
    ld.add_argument("--kv-policy", choices=("static", "dynamic", "isolated"), default=None)
    ld.add_argument("--kv-blocks", type=int, default=None)
    ld.add_argument("--kv-max-blocks", type=int, default=None)
    ld.add_argument("--user-cap-blocks", type=int, default=None)
    ld.add_argument("--max-batch", type=int, default=None)
    ld.add_argument("--keep-alive", type=float, default=None, help="seconds once idle; -1 pins, 0 unloads after use")
    ld.add_argument("--engine", choices=("auto", "paged", "sequential"), default=None)
    ld.add_argument("--json", action="store_true")
    ld.set_defaults(fn=cmd_load)
    ul = sub.add_parser("unload", help="unload a model")
    ul.add_argument("model", nargs="?", default=None)
    ul.add_argument("--force", action="store_true", help="also end its live processes")
    ul.set_defaults(fn=cmd_unload)
    mi = sub.add_parser("model-info", help="describe a model: memory estimate, instances, KV pool")
    mi.add_argument("model", nargs="?", default=None)
    mi.set_defaults(fn=cmd_model_info)
    dv = sub.add_parser("devices", help="cpu and gpus, with what models hold")
    dv.add_argument("--json", action="store_true")
    dv.set_defaults(fn=cmd_devices)
    mt = sub.add_parser("metrics", help="process and model metrics")
    mt.add_argument("--json", action="store_true")
    mt.set_defaults(fn=cmd_metrics)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LLMOSError as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
