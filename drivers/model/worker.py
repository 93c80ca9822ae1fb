"""The model worker: one OS process per loaded model instance, running the engine's step loop.

It connects a DEALER socket to the address its kernel bound for it and speaks MessagePack maps
with an ``op`` field (see docs/architecture.md, "Kernel <-> worker"). It never outlives the
kernel: Linux's parent-death signal kills it, and it also exits when its parent pid changes
or the kernel stops answering.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import ctypes
import os
import queue
import signal
import sys
import threading
import time
import traceback

import zmq

from llmos.syscalls import codec
from llmos.syscalls.errors import Errno, LLMOSError

HEARTBEAT_S = 1.0
_pipes = itertools.count()  # inproc endpoints are released asynchronously: never reuse a name


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent-pid check in the loop still applies


class Worker:
    """The main thread loads the model and runs the step loop; once loaded, a socket thread owns the
    kernel socket. The socket thread answers ``encode`` itself (tokenising needs only the tokenizer),
    so a spawn never waits for a step in progress, and hands every other op to the main thread,
    which applies it between steps. The main thread's frames reach the kernel through an inproc pipe."""

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
        self.inbox: queue.Queue = queue.Queue()  # ops for the main thread, from the socket thread
        self.pipe: zmq.Socket | None = None  # the main thread's end of the pipe to the socket thread
        self.io: threading.Thread | None = None

    def send(self, msg: dict) -> None:
        """Send a frame to the kernel (from the main thread)."""
        if self.pipe is not None:
            self.pipe.send(codec.encode(msg))
        else:
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
        self._start_socket_thread()
        try:
            return self._step_loop()
        finally:
            self.running = False
            try:  # an empty frame stops the socket thread once it has sent what is queued
                self.pipe.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the pipe is full: the socket thread is stuck on the kernel; exiting ends it
            self.io.join(5)
            self.pipe.close(linger=0)

    def _step_loop(self) -> int:
        last_sent = time.time()
        while self.running:
            busy = self.engine.has_work()
            try:  # apply every op that arrived; when idle, wait for one (or for the next heartbeat)
                msg = self.inbox.get_nowait() if busy else self.inbox.get(timeout=HEARTBEAT_S / 2)
                while self.running:
                    self.handle(msg)
                    msg = self.inbox.get_nowait()
            except queue.Empty:
                pass
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

    # -- the socket thread -----------------------------------------------------------------
    def _start_socket_thread(self) -> None:
        endpoint = f"inproc://worker-pipe-{next(_pipes)}"
        self.pipe = self.ctx.socket(zmq.PAIR)
        self.pipe.bind(endpoint)
        far = self.ctx.socket(zmq.PAIR)
        far.connect(endpoint)
        self.io = threading.Thread(target=self._socket_loop, args=(far,), name="llmos-worker-socket", daemon=True)
        self.io.start()

    def _socket_loop(self, pipe: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if pipe in ready:
                    frame = pipe.recv()
                    if not frame:
                        return
                    self.sock.send(frame)
                if self.sock in ready:
                    msg = codec.decode(self.sock.recv())
                    if msg.get("op") == "encode":
                        self.sock.send(codec.encode(self._encode(msg)))
                    else:
                        self.inbox.put(msg)
        except Exception:  # the kernel must learn that this worker is gone, not wait on it
            traceback.print_exc()
            os._exit(3)
        finally:
            pipe.close(linger=0)

    def _encode(self, msg: dict) -> dict:
        try:
            ids = self.engine.encode(msg.get("prompt"), msg.get("messages"), msg.get("prompt_ids"))
            return {"op": "encoded", "rid": msg["rid"], "ids": ids}
        except LLMOSError as exc:
            return {"op": "encoded", "rid": msg["rid"], **exc.to_wire()}
        except Exception as exc:
            return {"op": "encoded", "rid": msg["rid"], "errno": int(Errno.EINVAL), "error": "EINVAL",
                    "message": f"cannot encode input: {type(exc).__name__}: {exc}"}

    # -- ops, applied by the main thread between steps --------------------------------------
    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "add":
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
        if worker.io is None or not worker.io.is_alive():  # never close a socket another thread still uses
            worker.sock.close(linger=500)


if __name__ == "__main__":
    sys.exit(main())
