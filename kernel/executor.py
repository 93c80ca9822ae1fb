"""The kernel's side of one model worker: an actor that owns the worker process and its socket.

It starts the worker OS process, forwards ``Encode``/``Add``/``Abort`` to it, turns the
worker's frames into messages for the ProcessManager, and notices when the worker dies
(exit, or silence past the heartbeat deadline).

Whatever a worker sends, the kernel stays responsive: the reader takes at most
``FRAMES_PER_S`` frames and ``BYTES_PER_S`` bytes a second from one worker (token buckets; past
them it waits, and ZeroMQ's queues push the wait back to the worker). Whatever arrives for a
worker, no process is left waiting on a message that was never delivered: a message that cannot
be encoded ends its process (or its spawn) with an error.
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

from llmos.drivers.model import protocol as wp
from llmos.drivers.model.prompt import check_prompt_chars, check_prompt_ids
from llmos.kernel import capture
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor
from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import DeviceError, Errno, FrameTooLarge, LLMOSError, error_from_errno

WORKER_SILENCE_S = 60.0  # default: a worker that sends nothing for this long (not even heartbeats) is dead
# What the kernel reads from one worker, at most. A worker sends one frame per step that produced
# tokens (a tiny model on a CPU steps in ~1 ms; real models far slower), an `encoded` per spawn and
# a heartbeat a second; a burst of FRAMES_PER_S frames passes at once.
FRAMES_PER_S = 5000
BYTES_PER_S = 64 * 2**20
_ids = itertools.count(1)
WORKER_PROGRAM = (sys.executable, "-m", "llmos.drivers.model.worker")


class TokenBucket:
    """At most ``rate`` units a second on average, after a burst of ``burst``; the clock is injected.

    ``delay(n)`` takes ``n`` units and says how long to wait before using them (0 when they were
    there); the level may go into debt, so one unit larger than the burst still passes, later.
    """

    def __init__(self, rate: float, burst: float, clock: Any = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = burst
        self.at = clock()

    def delay(self, n: float) -> float:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate) - n
        self.at = now
        return 0.0 if self.level >= 0 else -self.level / self.rate


class Executor(Actor):
    """One model instance in one worker process. ``ready`` resolves once the model is loaded."""

    backend = "local"  # a worker process of the kernel's (kernel/ray_executor.py: a Ray actor)

    def __init__(self, ctx: zmq.asyncio.Context, run_dir: Path, model_path: str, procman: Actor,
                 on_gone: Any, log_dir: Path, options: dict[str, Any], device: str = "cpu",
                 silence_s: float = WORKER_SILENCE_S, frames_per_s: float = FRAMES_PER_S,
                 bytes_per_s: float = BYTES_PER_S) -> None:
        self.id = f"w{next(_ids)}"
        super().__init__(f"executor:{self.id}")
        self.model_path = model_path
        self.procman = procman
        self.on_gone = on_gone  # callable(executor): tells the model manager this executor is gone
        self.options = dict(options)
        self.max_batch = int(options.get("max_batch") or 0)  # 0 until the worker says (None: sized by the KV pool)
        self.device = device  # "cpu" or "cuda:N"; the worker sees only that GPU, as cuda:0
        self.silence_s = silence_s
        self.stats: dict[str, Any] = {}
        self.batch_sum = 0
        self.batch_max = 0
        self.stage = wp.LOAD_STAGES[0]  # the load stage the worker reported last, until Ready
        self.step_count = 0
        self.step_time = 0.0
        self.tokens_out = 0
        self.address = f"ipc://{run_dir / f'worker-{os.getpid()}-{self.id}.sock'}"
        self.home = run_dir.parent  # the kernel's $LLMOS_HOME: run_dir is home/run
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_TRANSPORT_BYTES)  # a memory guard, as on the bus
        self.frames = TokenBucket(frames_per_s, frames_per_s)
        self.frames_in = 0  # frames and bytes read from the worker (the reader task counts them)
        self.bytes_in = 0
        self.bytes = TokenBucket(bytes_per_s, protocol.MAX_FRAME_BYTES)  # one largest frame passes at once
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
    def launch(self, program: tuple[str, ...] = WORKER_PROGRAM) -> "Executor":
        """Bind the worker's socket and start the worker: ``program`` followed by the worker's flags
        (``--address``, ``--model``, ``--options``, ``--device``)."""
        self.sock.bind(self.address)
        cmd = [*program, "--address", self.address, "--model", self.model_path, "--options", json.dumps(self.options)]
        env = dict(os.environ)
        env["LLMOS_HOME"] = str(self.home)  # where a worker finds the store (a model loaded by name from it)
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
                self.sock.send(codec.encode(wp.Shutdown().to_wire()), zmq.NOBLOCK)
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
        match msg:
            case m.Encode():
                return self._encode(msg)
            case wp.Score():
                return self._score(msg)
            case wp.Add():
                try:
                    self._send(msg)
                except LLMOSError as exc:  # the worker will never hear of it: the process ends here
                    self.procman.tell(m.StepEvents(self.id, [wp.StepEvent(msg.pid, finish_reason="error", final_text="",
                                                                          error=exc.to_wire())]))
                return None
            case wp.Append() | wp.Preempt() | wp.Resume() | wp.Renice() | wp.Abort():
                try:
                    self._send(msg)
                except LLMOSError as exc:
                    self.log.error("op_undeliverable", op=msg.op, pid=msg.pid, error=exc.message)
                    if isinstance(msg, wp.Append):  # a turn too big to deliver ends the session, as an Add would
                        self.procman.tell(m.StepEvents(self.id, [wp.StepEvent(msg.pid, finish_reason="error",
                                                                              final_text="", error=exc.to_wire())]))
                return None
            case m.FromWorker():
                return self._from_worker(msg.msg)
            case m.Died():
                return self._died(msg.message, msg.errno)
            case m.Retire():
                if not self.dead:
                    self.dead = msg.reason
                    self.procman.tell(m.WorkerDied(self.id, msg.reason))
                return None
        raise TypeError(f"executor cannot handle {type(msg).__name__}")

    def _encode(self, msg: m.Encode) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.dead:
            fut.set_exception(DeviceError(self.dead))
            return fut
        if self.ready.done():
            try:
                if msg.prompt_ids is not None:
                    # token ids need no tokenizer: check them here instead of waiting for the worker
                    fut.set_result(check_prompt_ids(msg.prompt_ids, int(self.info["vocab_size"]),
                                                    int(self.info["context_len"])))
                    return fut
                # a prompt that cannot fit is refused before it costs the worker seconds of tokenising
                check_prompt_chars(msg.prompt, msg.messages, int(self.info.get("max_prompt_chars") or 0),
                                   self.info.get("context_len"))
            except LLMOSError as exc:
                # without its traceback: it would hold this frame, which holds the future and the
                # request (a million ids), in a cycle only the cyclic collector frees
                fut.set_exception(exc.with_traceback(None))
                return fut
        rid = next(self._rids)
        self._pending[rid] = fut
        try:
            self._send(wp.Encode(rid, msg.prompt, msg.messages, msg.prompt_ids, msg.add_special_tokens))
        except LLMOSError as exc:
            self._pending.pop(rid, None)
            if not fut.done():
                fut.set_exception(exc.with_traceback(None))
        return fut

    def _score(self, msg: wp.Score) -> asyncio.Future:
        """Forward a Score to the worker (as Encode goes): the future of its Scored reply, as a map."""
        fut = asyncio.get_running_loop().create_future()
        if self.dead:
            fut.set_exception(DeviceError(self.dead))
            return fut
        msg.rid = next(self._rids)
        self._pending[msg.rid] = fut
        try:
            self._send(msg)
        except LLMOSError as exc:
            self._pending.pop(msg.rid, None)
            if not fut.done():
                fut.set_exception(exc.with_traceback(None))
        return fut

    def _send(self, msg: Any) -> None:
        """Send a worker protocol message (``drivers/model/protocol.py``) to the worker, or raise.

        A message that cannot be encoded (a frame over the bounds) raises an LLMOSError (EMSGSIZE,
        else EIO) for the caller to end what waited on it. Never blocks the mailbox on a worker that
        is gone: a send that cannot go out means it died (its processes end with EIO).
        """
        if self.dead:
            return
        try:
            frame = codec.encode(msg.to_wire())
        except Exception as exc:
            errno = Errno.EMSGSIZE if isinstance(exc, FrameTooLarge) else Errno.EIO
            raise error_from_errno(errno, f"cannot deliver '{msg.op}' to the model worker: "
                                          f"{getattr(exc, 'message', exc)}") from None
        try:
            # an asyncio socket answers a send with a future, failed at once (EAGAIN) when the worker's queue is full
            sent = self.sock.send(frame, zmq.NOBLOCK)
            exc = sent.exception() if sent is not None and sent.done() else None
        except zmq.ZMQError as err:
            exc = err
        if exc is not None and not self.ready.done():  # its worker has not connected yet
            raise error_from_errno(Errno.EAGAIN, f"the model worker for {self.model_path} is still starting: "
                                                 f"retry in a moment")
        if exc is not None:
            self._died(f"model worker for {self.model_path} stopped taking messages ({exc})")

    def _from_worker(self, frame: dict) -> None:
        self.last_seen = time.monotonic()
        try:
            msg = wp.from_wire(frame)
        except ValueError as exc:
            self.log.error("bad_worker_frame", error=str(exc))
            return
        match msg:
            case wp.Step():
                if msg.stats:
                    self.stats = msg.stats
                self.running = msg.running
                if msg.step_s:
                    batch = self.stats.get("batch", 0)
                    steps = max(1, msg.steps)  # steps that produced nothing ride on the next frame
                    self.step_count += steps
                    self.batch_sum += batch * steps
                    self.batch_max = max(self.batch_max, batch)
                    self.step_time += msg.step_s
                if msg.events or msg.stats:
                    self.tokens_out += sum(len(e.token_ids) for e in msg.events)
                    self.procman.tell(m.StepEvents(self.id, msg.events, msg.stats))
            case wp.Encoded():
                fut = self._pending.pop(msg.rid, None)
                if fut is not None and not fut.done():
                    if msg.ids is not None:
                        fut.set_result(msg.ids)
                    else:
                        fut.set_exception(error_from_errno(msg.errno or Errno.EIO, msg.message or "encode failed"))
            case wp.Scored():
                fut = self._pending.pop(msg.rid, None)
                if fut is not None and not fut.done():
                    if msg.errno is None:
                        fut.set_result({"token_ids": msg.token_ids, "logprobs": msg.logprobs, "nll": msg.nll,
                                        "windows": msg.windows, "stride": msg.stride})
                    else:
                        fut.set_exception(error_from_errno(msg.errno, msg.message or "score failed"))
            case wp.Ready():
                self.info = msg.info
                self.max_batch = int(self.info.get("max_batch") or self.max_batch)
                self.log.info("worker_ready", **{k: self.info.get(k) for k in ("device", "parameters", "load_s")})
                self.procman.tell(m.ExecutorReady(self.id, self, self.info))  # before anyone can spawn on it
                if not self.ready.done():
                    self.ready.set_result(self)
            case wp.Failed():  # the load failed; its errno says whose fault (EINVAL: the model's files)
                self._died(str(msg.message), int(msg.errno or Errno.EIO))
            case wp.Captured() | wp.CaptureDone():  # captured intermediates: stored by kernel/capture.py
                capture.deliver(msg)
            case wp.Heartbeat():
                if not self.ready.done():  # loading: the worker says which stage began (drivers/model/worker.py)
                    self.stage = (msg.stats or {}).get("stage") or self.stage
                    return
                self.running = msg.running
                if msg.stats:
                    self.stats = msg.stats
                    self.procman.tell(m.StepEvents(self.id, [], msg.stats))

    def _died(self, message: str, errno: int = Errno.EIO) -> None:
        if self.dead:
            return
        self.dead = message
        self.log.error("worker_died", message=message)
        if not self.ready.done():
            self.ready.set_exception(error_from_errno(errno, message) if errno != Errno.EIO else DeviceError(message))
            self.ready.exception()  # mark retrieved: the waiter may be gone
        self._fail_all(message)
        # a worker that had loaded and then died crashed: the model manager starts another in its place
        self.procman.tell(m.WorkerDied(self.id, message, crashed=bool(self.info)))
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
            self.frames_in += 1
            self.bytes_in += len(raw)
            # past the worker's allowance, wait: ZeroMQ's queues fill and the worker's sends block
            wait = max(self.frames.delay(1), self.bytes.delay(len(raw)))
            # a recv that finds a frame waiting does not yield: yield anyway, so a burst never holds the loop
            await asyncio.sleep(wait)
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
                if self.proc:
                    self.proc.kill()

    @property
    def kv_total(self) -> int:
        return int(self.stats.get("kv_total") or self.info.get("kv_blocks") or 0)


    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {"model": self.model_path, "executor": self.id, "backend": self.backend, "node": "local",
                "worker_pid": self.proc.pid if self.proc else None,
                "running": self.running, "device": self.device, "engine": self.info.get("engine"),
                "parameters": self.info.get("parameters"), "context_len": self.info.get("context_len"),
                "max_prompt_chars": self.info.get("max_prompt_chars"),
                "has_chat_template": self.info.get("has_chat_template"),
                "ready": self.ready.done() and not self.dead, "max_batch": self.max_batch,
                "stage": None if self.ready.done() else self.stage,
                "kernels": self.info.get("kernels"), "kernel_path": self.info.get("kernel_path"),
                "dtype": self.info.get("dtype"), "prefix_cache": self.info.get("prefix_cache"),
                "kv_policy": self.info.get("kv_policy"), "kv_block_size": self.info.get("kv_block_size"),
                "kv_used": s.get("kv_used", 0), "kv_free": s.get("kv_free", self.info.get("kv_blocks", 0)),
                "kv_total": self.kv_total, "kv_bytes": s.get("kv_bytes"), "kv_per_user": s.get("kv_per_user", {}),
                "steps": self.step_count, "batch_last": s.get("batch", 0),
                "batch_mean": self.batch_sum / self.step_count if self.step_count else 0.0,
                "batch_max": self.batch_max, "tokens_out": self.tokens_out,
                "step_time_mean_s": self.step_time / self.step_count if self.step_count else 0.0,
                "preemptions": s.get("preemptions", 0), "parked": s.get("parked", 0),
                "swap_used": s.get("swap_used", 0), "swap_total": s.get("swap_total", self.info.get("swap_blocks", 0)),
                "swaps_out": s.get("swaps_out", 0), "swaps_in": s.get("swaps_in", 0),
                "recomputed_tokens": s.get("recomputed_tokens", 0), "spills": s.get("spills", 0),
                "spilled_blocks": s.get("spilled_blocks", 0), "spill_bytes_used": s.get("spill_bytes_used", 0),
                "spill_failures": s.get("spill_failures", 0),
                **{k: s.get(k, 0) for k in ("prefix_lookups", "prefix_hits", "prefix_hit_tokens",
                                            "prefix_cached_blocks", "prefix_evictions", "prefix_cow_copies")}}


def _tail(path: Path, limit: int = 400) -> str:
    try:
        data = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    lines = [ln for ln in data if ln.strip()]
    return lines[-1][-limit:] if lines else ""
