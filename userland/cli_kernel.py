"""``llmos kernel start|stop|status``: the kernel as a daemon."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmos import embedded
from llmos._command import address_of, home_of
from llmos.client import Client
from llmos.kernel.config import add_flags as add_kernel_flags


def _kernel_flags(args: argparse.Namespace) -> list[str]:
    from llmos.kernel.config import to_argv

    return to_argv(args)


def cmd_kernel_start(args: argparse.Namespace) -> int:
    address, home = address_of(args), home_of(args)
    if args.foreground:
        from llmos.kernel.main import main as kernel_main

        return kernel_main(["--home", str(home), "--address", address, *_kernel_flags(args)])
    keys = embedded.own_keys(home, address)  # None: a tcp kernel that never ran in this home (no keys yet)
    client = embedded.try_connect(address, **keys) if keys is not None else None
    if client is not None:
        said = {"pid": client.kernel["pid"], "address": address, "started": False, "warnings": []}
        client.close()
        print(json.dumps(said) if args.json else f"llmos kernel already running: pid {said['pid']} at {address}")
        return 0
    try:
        proc, client = embedded.launch(address, home, embedded=False, extra=_kernel_flags(args))
    except embedded.KernelExited as exc:
        print(f"llmos: {exc.message}", file=sys.stderr)
        return exc.code if exc.code in (2, 3, 4) else 1  # the kernel's own refusal codes pass through
    pid = client.kernel["pid"]
    try:
        warnings = _start_warnings(client) if proc and getattr(args, "group", None) else []
    finally:
        client.close()
    if args.json:
        print(json.dumps({"pid": pid, "address": address, "started": proc is not None, "warnings": warnings}))
    else:
        print(f"llmos kernel {'started' if proc else 'already running'}: pid {pid} at {address}")
    for w in warnings:
        print(f"llmos: warning: {w}", file=sys.stderr)
    return 0


def _start_warnings(client: Client, wait_s: float = 2.0) -> list[str]:
    """What the new kernel warned about at its start that its owner must act on: a directory that keeps
    --group's members from the socket. Read from its log once its kernel_started line is there (lines reach
    the log in order)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [json.loads(line) for line in client.dmesg(n=200)]
        if any(ln.get("event") == "kernel_started" for ln in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return [f"members of group {ln.get('group')} cannot reach the kernel's socket: {ln.get('directory')} is closed "
            f"to them ({ln.get('fix')})" for ln in lines if ln.get("event") == "group_cannot_reach_socket"]


def cmd_kernel_stop(args: argparse.Namespace) -> int:
    address = address_of(args)
    client = embedded.try_connect(address)
    if client is None:
        print(json.dumps({"address": address, "stopped": False, "pid": None}) if args.json
              else f"no kernel running at {address}")
        return 0
    pid = client.kernel["pid"]
    embedded.stop(client, None, pid)
    print(json.dumps({"address": address, "stopped": True, "pid": pid}) if args.json
          else f"llmos kernel stopped: pid {pid}")
    return 0


def cmd_kernel_status(args: argparse.Namespace) -> int:
    address = address_of(args)
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
    print(f"  admin: {info.get('owner', '?')} (and root); you are {client.kernel.get('user')} via "
          f"{client.kernel.get('transport')}")
    for lst in info.get("listeners", [])[1:]:
        print(f"  also at {lst['address']} ({lst['transport']})")
    if info.get("group"):
        print(f"  shared with group {info['group']} (its members reach the ipc socket)")
    if info.get("delegates"):
        print(f"  may act for other users: {info['delegates']} (--delegate)")
    if info.get("metrics_url"):
        print(f"  Prometheus metrics: {info['metrics_url']}")
    if info.get("ray"):
        ray = info["ray"]
        print(f"  Ray: {ray['address']} ({'started by the kernel' if ray.get('started_local') else 'joined'}; "
              f"actors reach the kernel at {ray.get('kernel_ip')})")
    print(f"  processes: {procs}")
    for mdl in info["models"]:
        where = f"node {mdl['node']}, " if mdl.get("backend") == "ray" else ""
        print(f"  model {mdl['model']}: {mdl.get('backend', 'local')} worker pid {mdl['worker_pid']}, {where}"
              f"{mdl['device']}, running {mdl['running']}")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``kernel start|stop|status`` to ``llmos``."""
    k = sub.add_parser("kernel", help="start, stop or inspect the kernel daemon")
    ksub = k.add_subparsers(dest="action", required=True)
    ks = ksub.add_parser("start", parents=[common], help="start the kernel as a daemon")
    ks.add_argument("--foreground", action="store_true", help="stay attached to the terminal (default: a daemon)")
    ks.add_argument("--json", action="store_true", help="print {pid, address, started, warnings}")
    add_kernel_flags(ks)
    ks.set_defaults(fn=cmd_kernel_start)
    kp = ksub.add_parser("stop", parents=[common], help="stop the kernel and its model workers")
    kp.add_argument("--json", action="store_true", help="print {address, stopped, pid}")
    kp.set_defaults(fn=cmd_kernel_stop)
    kst = ksub.add_parser("status", parents=[common], help="is a kernel running; its pid, address, uptime")
    kst.add_argument("--json", action="store_true")
    kst.set_defaults(fn=cmd_kernel_status)
