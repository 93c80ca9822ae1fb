"""The kernel's side of one model worker: an actor that owns the worker process and its socket.

It starts the worker OS process, forwards ``Encode``/``Add``/``Abort`` to it, turns the
worker's frames into messages for the ProcessManager, and notices when the worker dies
(exit, or silence past the heartbeat deadline).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from llmos.drivers.model.prompt import check_prompt_ids
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor
from llmos.syscalls import codec
from llmos.syscalls.errors import DeviceError, LLMOSError, error_from_errno

WORKER_SILENCE_S = 60.0  # default: a worker that sends nothing for this long (not even heartbeats) is dead
_ids = itertools.count(1)


class Executor(Actor):
    """One model instance in one worker process. ``ready`` resolves once the model is loaded."""

    def __init__(self, ctx: zmq.asyncio.Context, run_dir: Path, model_path: str, procman: Actor,
                 on_gone: Any, log_dir: Path, options: dict[str, Any], device: str = "cpu",
                 silence_s: float = WORKER_SILENCE_S) -> None:
        self.id = f"w{next(_ids)}"
        super().__init__(f"executor:{self.id}")
        self.model_path = model_path
        self.procman = procman
        self.on_gone = on_gone  # callable(executor): tells the model manager this executor is gone
        self.options = dict(options)
        self.max_batch = int(options.get("max_batch", 16))
        self.device = device  # "cpu" or "cuda:N"; the worker sees only that GPU, as cuda:0
        self.silence_s = silence_s
        self.stats: dict[str, Any] = {}
        self.batch_sum = 0
        self.batch_max = 0
        self.step_count = 0
        self.step_time = 0.0
        self.tokens_out = 0
        self.address = f"ipc://{run_dir / f'worker-{os.getpid()}-{self.id}.sock'}"
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.log_path = log_dir / f"worker-{self.id}.log"
        self.proc: subprocess.Popen | None = None
        self.ready: asyncio.Future = asyncio.get_event_loop().create_future()
        self.info: dict[str, Any] = {}
        self.dead: str | None = None
        self.last_seen = time.monotonic()
        self.running = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._rids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------------------------
    def launch(self) -> "Executor":
        self.sock.bind(self.address)
        cmd = [sys.executable, "-m", "llmos.drivers.model.worker", "--address", self.address,
               "--model", self.model_path, "--options", json.dumps(self.options)]
        env = dict(os.environ)
        # big step buffers are reused instead of being mapped and faulted in again every step
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(4 << 30))
        if self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.split(":", 1)[1]
            cmd += ["--device", "cuda:0"]
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            cmd += ["--device", "cpu"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.log.info("worker_started", worker_pid=self.proc.pid, model=self.model_path)
        self.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]
        return self

    async def on_stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.proc and self.proc.poll() is None:
            try:
                self.sock.send(codec.encode({"op": "shutdown"}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + 3.0
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.sock.close(linger=0)
        self._fail_all("executor stopped")
        if not self.ready.done():  # stopped while loading: whoever waits for the model learns it
            self.ready.set_exception(DeviceError(self.dead or f"model {self.model_path} was unloaded while loading"))
            self.ready.exception()
        path = self.address[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)

    # -- messages --------------------------------------------------------------------------
    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, m.Encode):
            fut = asyncio.get_running_loop().create_future()
            if self.dead:
                fut.set_exception(DeviceError(self.dead))
                return fut
            if msg.prompt_ids is not None and self.ready.done():
                # token ids need no tokenizer: check them here instead of waiting for the worker's step to end
                try:
                    fut.set_result(check_prompt_ids(msg.prompt_ids, int(self.info["vocab_size"]),
                                                    int(self.info["context_len"])))
                except LLMOSError as exc:
                    fut.set_exception(exc)
                return fut
            rid = next(self._rids)
            self._pending[rid] = fut
            self._send({"op": "encode", "rid": rid, "prompt": msg.prompt, "messages": msg.messages,
                        "prompt_ids": msg.prompt_ids})
            return fut
        if isinstance(msg, m.Add):
            self._send({"op": "add", "pid": msg.pid, "ids": msg.prompt_ids, "params": msg.params,
                        "user": msg.user, "priority": msg.priority})
            return None
        if isinstance(msg, m.Abort):
            self._send({"op": "abort", "pid": msg.pid})
            return None
        if isinstance(msg, m.FromWorker):
            return self._from_worker(msg.msg)
        if isinstance(msg, m.Died):
            return self._died(msg.message)
        raise TypeError(f"executor cannot handle {type(msg).__name__}")

    def _send(self, msg: dict) -> None:
        """Never block the mailbox on a worker that is gone: a send that cannot go out means it died."""
        if self.dead:
            return
        try:
            self.sock.send(codec.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._died(f"model worker for {self.model_path} stopped taking messages ({exc})")

    def _from_worker(self, msg: dict) -> None:
        self.last_seen = time.monotonic()
        op = msg.get("op")
        if "stats" in msg:
            self.stats = msg["stats"]
        if op == "step":
            self.running = msg.get("running", 0)
            if msg.get("step_s"):
                batch = self.stats.get("batch", 0)
                self.step_count += 1
                self.batch_sum += batch
                self.batch_max = max(self.batch_max, batch)
                self.step_time += msg["step_s"]
            self.tokens_out += sum(len(e[1]) for e in msg["events"])
            self.procman.tell(m.StepEvents(self.id, msg["events"], self.running))
        elif op == "encoded":
            fut = self._pending.pop(msg["rid"], None)
            if fut is not None and not fut.done():
                if "ids" in msg:
                    fut.set_result(msg["ids"])
                else:
                    fut.set_exception(error_from_errno(msg["errno"], msg["message"]))
        elif op == "ready":
            self.info = msg["info"]
            self.log.info("worker_ready", **{k: self.info.get(k) for k in ("device", "parameters", "load_s")})
            if not self.ready.done():
                self.ready.set_result(self)
        elif op == "failed":
            self._died(msg["message"])
        elif op == "hb":
            pass

    def _died(self, message: str) -> None:
        if self.dead:
            return
        self.dead = message
        self.log.error("worker_died", message=message)
        if not self.ready.done():
            self.ready.set_exception(DeviceError(message))
            self.ready.exception()  # mark retrieved: the waiter may be gone
        self._fail_all(message)
        self.procman.tell(m.WorkerDied(self.id, message))
        self.on_gone(self)

    def _fail_all(self, message: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(DeviceError(message))
        self._pending.clear()

    # -- background tasks (they only talk to the actor by messages) --------------------------
    async def _read(self) -> None:
        while True:
            raw = await self.sock.recv()
            try:
                msg = codec.decode(raw)
            except Exception as exc:
                self.log.error("bad_worker_frame", error=repr(exc))
                continue
            if isinstance(msg, dict):
                self.tell(m.FromWorker(msg))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            code = self.proc.poll() if self.proc else None
            if code is not None:
                tail = _tail(self.log_path)
                self.tell(m.Died(f"model worker for {self.model_path} exited with code {code}"
                                 + (f": {tail}" if tail else "")))
                return
            if self.ready.done() and time.monotonic() - self.last_seen > self.silence_s:  # loading may be long
                self.proc.kill()

    @property
    def kv_total(self) -> int:
        return int(self.stats.get("kv_total") or self.info.get("kv_blocks") or 0)

    @property
    def kv_block_size(self) -> int:
        return int(self.info.get("kv_block_size") or 8)

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {"model": self.model_path, "executor": self.id,
                "worker_pid": self.proc.pid if self.proc else None,
                "running": self.running, "device": self.device, "engine": self.info.get("engine"),
                "parameters": self.info.get("parameters"), "context_len": self.info.get("context_len"),
                "ready": self.ready.done() and not self.dead, "max_batch": self.max_batch,
                "kernels": self.info.get("kernels"),
                "kv_policy": self.info.get("kv_policy"), "kv_block_size": self.info.get("kv_block_size"),
                "kv_used": s.get("kv_used", 0), "kv_free": s.get("kv_free", self.info.get("kv_blocks", 0)),
                "kv_total": self.kv_total, "kv_bytes": s.get("kv_bytes"), "kv_per_user": s.get("kv_per_user", {}),
                "steps": self.step_count, "batch_last": s.get("batch", 0),
                "batch_mean": self.batch_sum / self.step_count if self.step_count else 0.0,
                "batch_max": self.batch_max, "tokens_out": self.tokens_out,
                "step_time_mean_s": self.step_time / self.step_count if self.step_count else 0.0,
                "preemptions": s.get("preemptions", 0)}


def _tail(path: Path, limit: int = 400) -> str:
    try:
        data = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    lines = [ln for ln in data if ln.strip()]
    return lines[-1][-limit:] if lines else ""
