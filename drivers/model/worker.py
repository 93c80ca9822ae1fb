"""The model worker: one OS process per loaded model instance, running the engine's step loop.

It connects a DEALER socket to the address its kernel bound for it and speaks MessagePack maps
with an ``op`` field (see docs/architecture.md, "Kernel <-> worker"). It never outlives the
kernel: Linux's parent-death signal kills it, and it also exits when its parent pid changes
or the kernel stops answering.
"""

from __future__ import annotations

import argparse
import gc
import json
import ctypes
import os
import signal
import sys
import time
import traceback

import zmq

from llmos.syscalls import codec
from llmos.syscalls.errors import Errno, LLMOSError

HEARTBEAT_S = 1.0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent-pid check in the loop still applies


class Worker:
    def __init__(self, address: str, model_path: str, device: str | None, options: dict) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(address)
        self.model_path = model_path
        self.device = device
        self.options = options
        self.parent = os.getppid()
        self.engine = None
        self.running = True

    def send(self, msg: dict) -> None:
        self.sock.send(codec.encode(msg))

    def serve(self) -> int:
        try:
            from transformers.utils import logging as hf_logging

            from llmos.drivers.model.engine import load_engine

            hf_logging.disable_progress_bar()
            t0 = time.time()
            self.engine = load_engine(self.model_path, self.device, **self.options)
            info = self.engine.info()
            info["load_s"] = time.time() - t0
            # the millions of objects torch and transformers created at import never die: keep the
            # cyclic collector from walking them again on every full collection during steps
            gc.collect()
            gc.freeze()
            self.send({"op": "ready", "info": info})
        except Exception as exc:
            self.send({"op": "failed", "errno": int(Errno.EIO),
                       "message": f"cannot load model {self.model_path}: {type(exc).__name__}: {exc}"})
            traceback.print_exc()
            return 1
        last_sent = time.time()
        while self.running:
            busy = self.engine.has_work()
            if self.sock.poll(0 if busy else int(HEARTBEAT_S * 1000 / 2)):
                self._drain()
            if not self.running:
                break
            if self.engine.has_work():
                t = time.perf_counter()
                events = self.engine.step()
                self.send({"op": "step", "events": [e.to_wire() for e in events], "running": self.engine.running,
                           "step_s": time.perf_counter() - t, "stats": self.engine.stats()})
                last_sent = time.time()
            elif time.time() - last_sent >= HEARTBEAT_S:
                self.send({"op": "hb", "running": 0, "stats": self.engine.stats()})
                last_sent = time.time()
            if os.getppid() != self.parent:
                return 2  # the kernel is gone
        return 0

    def _drain(self) -> None:
        while self.running:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(codec.decode(raw))

    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "encode":
            try:
                ids = self.engine.encode(msg.get("prompt"), msg.get("messages"), msg.get("prompt_ids"))
                self.send({"op": "encoded", "rid": msg["rid"], "ids": ids})
            except LLMOSError as exc:
                self.send({"op": "encoded", "rid": msg["rid"], **exc.to_wire()})
            except Exception as exc:
                self.send({"op": "encoded", "rid": msg["rid"], "errno": int(Errno.EINVAL), "error": "EINVAL",
                           "message": f"cannot encode input: {type(exc).__name__}: {exc}"})
        elif op == "add":
            try:
                self.engine.add(msg["pid"], msg["ids"], msg["params"], msg.get("user", ""), msg.get("priority", 0))
            except Exception as exc:
                err = exc.to_wire() if isinstance(exc, LLMOSError) else {
                    "errno": int(Errno.EIO), "error": "EIO", "message": repr(exc)}
                self.send({"op": "step", "events": [[msg["pid"], [], "", "error", "", err]],
                           "running": self.engine.running, "step_s": 0.0})
        elif op == "abort":
            event = self.engine.abort(msg["pid"])
            if event is not None:
                self.send({"op": "step", "events": [event.to_wire()], "running": self.engine.running,
                           "step_s": 0.0, "stats": self.engine.stats()})
        elif op == "shutdown":
            self.running = False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmos-worker", description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--options", default="{}", help="engine options as JSON (engine, max_batch, block_size, "
                                                   "num_blocks, max_tokens_per_step)")
    args = ap.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal belongs to the kernel/client
    worker = Worker(args.address, args.model, args.device, json.loads(args.options))
    try:
        return worker.serve()
    finally:
        worker.sock.close(linger=500)


if __name__ == "__main__":
    sys.exit(main())
