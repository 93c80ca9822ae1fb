"""The model worker: one OS process per loaded model instance, running the engine's step loop.

It connects a DEALER socket to the address its kernel bound for it and speaks the messages of
``protocol.py`` (MessagePack maps with an ``op`` field; see docs/architecture.md, "Kernel <->
worker"): every frame is decoded with ``protocol.from_wire`` and dispatched by an explicit
``match`` on its class. It never outlives the
kernel: Linux's parent-death signal kills it, and it also exits when its parent pid changes
or the kernel stops answering.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from llmos.drivers.model import protocol as p
from llmos.drivers.model.prompt import check_prompt_ids
from llmos.drivers.model.score import ScoreJob
from llmos.syscalls import codec
from llmos.syscalls.errors import Errno, InvalidArgument, LLMOSError, quote, wire_error

HEARTBEAT_S = 1.0
KERNEL_LOST_S = 10.0  # a worker watching its kernel's connection exits once it has been down this long
ENCODE_THREADS = 2  # a long prompt being tokenised leaves a thread for everyone else's
_pipes = itertools.count()  # inproc endpoints are released asynchronously: never reuse a name


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent-pid check in the loop still applies


class Worker:
    """The main thread loads the model and runs the step loop; once loaded, a socket thread owns the
    kernel socket. The socket thread hands ``encode`` to a small pool of encoder threads (tokenising
    needs only the tokenizer, which the engine does not change), so a spawn never waits for a step
    in progress nor for another client's long prompt, and every other op to the main thread, which
    applies it between steps. ZeroMQ sockets are not thread-safe: the main thread's frames reach the
    socket thread through an inproc pipe, and each encoder thread's replies through an inproc PUSH
    socket of its own."""

    def __init__(self, address: str, model_path: str, device: str | None, options: dict,
                 curve: dict[str, str] | None = None, watch_kernel: bool = False) -> None:
        """``curve``: {server_key, public_key, secret_key} (Z85) for a tcp connection (a Ray actor's);
        ``watch_kernel``: exit once the kernel's connection has been down KERNEL_LOST_S (a worker that is not
        the kernel's child: no parent-death signal reaches it)."""
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        if curve:
            self.sock.curve_serverkey = curve["server_key"].encode()
            self.sock.curve_publickey = curve["public_key"].encode()
            self.sock.curve_secretkey = curve["secret_key"].encode()
        # a peer gone without a FIN (a node cut off) is noticed by ZMTP heartbeats
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self.monitor = (self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
                        if watch_kernel else None)
        self.kernel_lost_at: float | None = None  # when the kernel's connection went down (watch_kernel)
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
        self.encoder: ThreadPoolExecutor | None = None
        self._encoded_endpoint = ""  # where encoder threads push their replies for the socket thread
        self._local = threading.local()
        self._encoder_socks: list[zmq.Socket] = []  # one per encoder thread, closed once the pool has ended
        self.scoring: deque[ScoreJob] = deque()  # Score ops tokenised, run one window per loop turn (main thread)

    def send(self, msg: Any) -> None:
        """Send a protocol message to the kernel (from the main thread)."""
        frame = codec.encode(msg.to_wire())
        if self.pipe is not None:
            self.pipe.send(frame)
        else:
            self.sock.send(frame)

    def _stage(self, stage: str) -> None:
        """Tell the kernel which load stage has begun (a heartbeat before Ready: model_info's ``stage``)."""
        self.send(p.Heartbeat(0, {"stage": stage}))

    def serve(self) -> int:
        try:
            self._stage(p.LOAD_STAGES[1])
            from transformers.utils import logging as hf_logging

            from llmos.drivers.model import from_store
            from llmos.drivers.model.engine import load_engine

            hf_logging.disable_progress_bar()
            t0 = time.time()
            # a model in the store (store:/models/<name>) is mapped from $LLMOS_HOME/store, opened read-only here
            load = from_store.load_engine if from_store.ref_name(self.model_path) else load_engine
            self.engine = load(self.model_path, self.device, on_stage=self._stage,
                               **{**self.options, "spill_dir": self._spill_dir()})
            self.engine.urgent_waiting = self._urgent_waiting  # the paged engine's steps yield to urgent arrivals
            info = self.engine.info()
            info["load_s"] = time.time() - t0
            # the millions of objects torch and transformers created at import never die: keep the
            # cyclic collector from walking them again on every full collection during steps
            gc.collect()
            gc.freeze()
            self.send(p.Ready(info))
        except Exception as exc:
            detail = exc.message if isinstance(exc, LLMOSError) else f"{type(exc).__name__}: {exc}"
            self.send(p.Failed(**wire_error(load_errno(exc), f"cannot load model {quote(self.model_path)}: {detail}")))
            traceback.print_exc()
            return 1
        self._start_socket_thread()
        try:
            return self._step_loop()
        finally:
            self.running = False
            self.engine.close()  # its spill area's files
            self.encoder.shutdown(wait=True, cancel_futures=True)
            for sock in self._encoder_socks:  # their threads have ended
                sock.close(linger=0)
            try:  # an empty frame stops the socket thread once it has sent what is queued
                self.pipe.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the pipe is full: the socket thread is stuck on the kernel; exiting ends it
            self.io.join(5)
            self.pipe.close(linger=0)

    @staticmethod
    def _spill_dir() -> str:
        """This worker's spill area, ``$LLMOS_HOME/store/spill/<pid>`` or ``$LLMOS_SPILL_ROOT/<pid>`` (created at the
        first spill), after removing those of dead workers (one killed with -9 could not remove its own)."""
        from llmos.drivers.model.spill import remove_stale, spill_root
        from llmos.syscalls.address import llmos_home

        # a Ray actor's is node-local (LLMOS_SPILL_ROOT): a home shared between nodes must not mix their pids
        root = Path(os.environ["LLMOS_SPILL_ROOT"]) if os.environ.get("LLMOS_SPILL_ROOT") else spill_root(llmos_home())
        remove_stale(root)
        return str(root / str(os.getpid()))

    def _step_loop(self) -> int:
        """Step while something can run; otherwise block on the inbox (up to a heartbeat), never spin.

        A step that produced no event sends no frame (its time and count ride on the next frame);
        a heartbeat goes out whenever nothing else has for HEARTBEAT_S, busy or not.
        """
        last_sent = time.monotonic()
        stalled = False  # the last step ran nothing: wait for an op (or a heartbeat) before trying again
        steps, step_s = 0, 0.0
        while self.running:
            wait = (stalled or not self.engine.has_work()) and not self.scoring
            try:  # apply every op that arrived
                msg = self.inbox.get(timeout=HEARTBEAT_S) if wait else self.inbox.get_nowait()
                while self.running:
                    self.handle(msg)
                    stalled = False
                    msg = self.inbox.get_nowait()
            except queue.Empty:
                stalled = False  # a heartbeat's wait without news: try the step again (a pool may grow)
            if not self.running:
                break
            if self.engine.has_work() and not stalled:
                t = time.perf_counter()
                events = self.engine.step()
                steps, step_s = steps + 1, step_s + time.perf_counter() - t
                stalled = not events and not self.engine.last_step_tokens
                if events:
                    self._send_captures()
                    self.send(p.Step(events, self.engine.running, step_s, steps, self.engine.stats()))
                    steps, step_s = 0, 0.0
                    last_sent = time.monotonic()
            if self.scoring:
                self._score_window()
            if time.monotonic() - last_sent >= HEARTBEAT_S:
                self.send(p.Heartbeat(self.engine.running, self.engine.stats()))
                last_sent = time.monotonic()
            if os.getppid() != self.parent:
                return 2  # the kernel is gone
            if self.kernel_lost_at is not None and time.monotonic() - self.kernel_lost_at > KERNEL_LOST_S:
                print("llmos-worker: the kernel's connection is gone: exiting", file=sys.stderr)
                return 2
        return 0

    # -- the socket thread -----------------------------------------------------------------
    def _start_socket_thread(self) -> None:
        n = next(_pipes)
        endpoint = f"inproc://worker-pipe-{n}"
        self.pipe = self.ctx.socket(zmq.PAIR)
        self.pipe.bind(endpoint)
        far = self.ctx.socket(zmq.PAIR)
        far.connect(endpoint)
        self._encoded_endpoint = f"inproc://worker-encoded-{n}"
        encoded = self.ctx.socket(zmq.PULL)
        encoded.bind(self._encoded_endpoint)
        self.encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="llmos-encode")
        self.io = threading.Thread(target=self._socket_loop, args=(far, encoded), name="llmos-worker-socket",
                                   daemon=True)
        self.io.start()

    def _socket_loop(self, pipe: zmq.Socket, encoded: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        poller.register(encoded, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self.monitor is not None and self.monitor in ready:
                    self._connection_event()
                if pipe in ready:
                    frame = pipe.recv()
                    if not frame:
                        return
                    self.sock.send(frame)
                if encoded in ready:
                    self.sock.send(encoded.recv())
                if self.sock in ready:
                    msg = self._decode(self.sock.recv())
                    if isinstance(msg, p.Encode):
                        self.encoder.submit(self._encode_and_reply, msg)
                    elif isinstance(msg, p.Score):  # tokenised off the main thread, then scored between steps
                        self.encoder.submit(self._prepare_score, msg)
                    elif msg is not None:
                        self.inbox.put(msg)
        except Exception:  # the kernel must learn that this worker is gone, not wait on it
            traceback.print_exc()
            os._exit(3)
        finally:
            pipe.close(linger=0)
            encoded.close(linger=0)
            if self.monitor is not None:
                self.sock.disable_monitor()
                self.monitor.close(linger=0)

    def _connection_event(self) -> None:
        """On the socket thread: note when the kernel's connection went down (None again once it is back)."""
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(self.monitor)["event"]
        if event == zmq.EVENT_DISCONNECTED:
            self.kernel_lost_at = self.kernel_lost_at or time.monotonic()
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.kernel_lost_at = None

    @staticmethod
    def _decode(frame: bytes) -> Any:
        """The protocol message a frame holds; None (and a line on stderr) for one that is not."""
        try:
            return p.from_wire(codec.decode(frame))
        except Exception as exc:  # a kernel bug, not a reason to die: say so once and go on
            print(f"llmos-worker: ignoring a bad frame: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
            return None

    def _encode_and_reply(self, msg: p.Encode) -> None:
        """On an encoder thread: tokenise, and push the reply to the socket thread (this thread's socket)."""
        try:
            frame = codec.encode(self._encode(msg).to_wire())
        except Exception as exc:  # a reply too large for a frame: the kernel still gets one
            frame = codec.encode(p.Encoded(msg.rid, **wire_error(Errno.E2BIG, f"the encoded prompt does not fit a "
                                                                              f"frame: {exc}")).to_wire())
        self._push(frame)

    def _push(self, frame: bytes) -> None:
        """On an encoder thread: send a frame to the kernel through this thread's socket to the socket thread."""
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = self.ctx.socket(zmq.PUSH)
            sock.connect(self._encoded_endpoint)
            self._encoder_socks.append(sock)
        sock.send(frame)

    def _encode(self, msg: p.Encode) -> p.Encoded:
        try:
            return p.Encoded(msg.rid, ids=self.engine.encode(msg.prompt, msg.messages, msg.prompt_ids,
                                                             msg.add_special_tokens))
        except LLMOSError as exc:
            return p.Encoded(msg.rid, **exc.to_wire())
        except Exception as exc:
            return p.Encoded(msg.rid, **wire_error(Errno.EINVAL, f"cannot encode input: {type(exc).__name__}: {exc}"))

    def _prepare_score(self, msg: p.Score) -> None:
        """On an encoder thread: tokenise a Score's text (or check its ids) and queue it for the main thread;
        a refusal is answered from here."""
        try:
            if (msg.text is None) == (msg.prompt_ids is None):
                raise InvalidArgument("give exactly one of 'text' and 'prompt_ids'")
            if msg.prompt_ids is not None:
                # any length: a text longer than the context is scored window by window
                ids = check_prompt_ids(msg.prompt_ids, int(self.engine.model.config.vocab_size), 2**62)
            else:
                ids = list(self.engine.tokenizer(msg.text, add_special_tokens=msg.add_special_tokens)["input_ids"])
            self.inbox.put(ScoreJob(msg.rid, ids, int(self.engine.context_len)))
        except Exception as exc:
            err = exc.to_wire() if isinstance(exc, LLMOSError) else wire_error(
                Errno.EINVAL, f"cannot score input: {type(exc).__name__}: {exc}")
            self._push(codec.encode(p.Scored(msg.rid, **err).to_wire()))

    def _score_window(self) -> None:
        """Run the first queued Score's next window; send its reply once it is done (or failed)."""
        job = self.scoring[0]
        try:
            job.step(self.engine.model, self.engine.device)
            if job.done:
                self.scoring.popleft()
                self.send(job.reply())
        except Exception as exc:
            self.scoring.popleft()
            err = exc.to_wire() if isinstance(exc, LLMOSError) else wire_error(Errno.EIO, f"scoring failed: {exc!r}")
            self.send(p.Scored(job.rid, **err))

    # -- ops, applied by the main thread between steps --------------------------------------
    def _urgent_waiting(self, floor: int) -> bool:
        """True when an op waiting in the inbox brings a sequence into the batch (add, resume) with a priority
        strictly better than ``floor``: the step in flight then yields (called between layers)."""
        with self.inbox.mutex:
            return any(isinstance(msg, (p.Add, p.Resume)) and msg.priority < floor for msg in self.inbox.queue)

    def handle(self, msg: Any) -> None:
        """Apply one kernel message (a ``protocol`` message, or its wire map) to the engine."""
        if isinstance(msg, dict):
            msg = p.from_wire(msg)
        engine = self.engine
        match msg:
            case p.Add(pid=pid, prompt_ids=ids, params=params, user=user, priority=priority, session=session,
                       output_ids=out):
                self._apply(pid, lambda: engine.add(pid, ids, params, user, priority, session, out))
            case p.Append(pid=pid, prompt_ids=ids, params=params):
                self._apply(pid, lambda: engine.append(pid, ids, params))
            case p.Preempt(pid=pid, mode=mode):
                event = self._apply(pid, lambda: engine.preempt(pid, mode))
                if event is not None:  # an unknown pid (it just ended) needs no answer
                    self._events([event])
            case p.Resume(pid=pid, priority=priority):
                engine.resume(pid, priority)
            case p.Renice(pid=pid, priority=priority):
                engine.renice(pid, priority)
            case p.Abort(pid=pid):
                # a pid the engine does not know (its add never arrived, or it just finished) still gets a final
                # event, so a TERM always ends the process; the kernel ignores it for one already ended
                event = engine.abort(pid)
                self._events([event if event is not None else p.StepEvent(pid, finish_reason="killed",
                                                                           final_text="")])
            case ScoreJob():
                if msg.done:  # nothing to score (a text of one token): answered at once
                    self.send(msg.reply())
                else:
                    self.scoring.append(msg)
            case p.Shutdown():
                self.running = False
            case _:
                print(f"llmos-worker: ignoring {type(msg).__name__}: not an op for the step loop", file=sys.stderr)

    def _apply(self, pid: int, op: Any) -> Any:
        """Run ``op``; a refusal ends that sequence with an error event (the kernel's bug or a bad request)."""
        try:
            return op()
        except Exception as exc:
            err = exc.to_wire() if isinstance(exc, LLMOSError) else wire_error(Errno.EIO, repr(exc))
            event = self.engine.abort(pid) or p.StepEvent(pid, final_text="")
            event.finish_reason, event.error = "error", err
            self._events([event])
            return None

    def _events(self, events: list[p.StepEvent]) -> None:
        self._send_captures()
        self.send(p.Step(events, self.engine.running, 0.0, 0, self.engine.stats()))

    def _send_captures(self) -> None:
        """Send the captures of the sequences that ended (capture.py's frames, then CaptureDone each) before
        the step frame that ends them: the kernel stores them before the process's result is visible."""
        ended, self.engine.captured = self.engine.captured, []
        for pid, capture in ended:
            try:
                for msg in capture.frames(pid):
                    self.send(msg)
            except Exception as exc:  # a capture that cannot be sent is lost, not the worker: the kernel is told
                traceback.print_exc()
                self.send(p.CaptureDone(pid, capture.spec.key, 0, 0, [], [f"capture lost in the worker: {exc!r}"[:300]]))


# huggingface_hub's strict dataclasses (transformers' configs): a field of the wrong type, or fields that
# disagree (a hidden size its heads do not divide)
_CONFIG_VALIDATION_ERRORS = frozenset({"StrictDataclassFieldValidationError", "StrictDataclassClassValidationError"})


def load_errno(exc: BaseException) -> Errno:
    """Whose fault a failed load is: ENOMEM for memory, EINVAL for the model's files (unreadable,
    malformed or inconsistent config, tokenizer or weights), EIO for anything else."""
    if isinstance(exc, LLMOSError):
        return exc.errno
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return Errno.ENOMEM
    if isinstance(exc, (OSError, ValueError, KeyError, UnicodeDecodeError)) or type(exc).__name__ == "SafetensorError":
        return Errno.EINVAL
    if any(c.__name__ in _CONFIG_VALIDATION_ERRORS for c in type(exc).__mro__):
        return Errno.EINVAL  # transformers' typed configs refuse a value of config.json
    if isinstance(exc, RuntimeError) and ("size mismatch" in str(exc) or "state_dict" in str(exc)):
        return Errno.EINVAL  # weights whose shapes do not match the config
    return Errno.EIO


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmos-worker", description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--options", default="{}", help="engine options as JSON (engine, max_batch, block_size, "
                                                   "num_blocks, max_tokens_per_step, spill_bytes, "
                                                   "spill_below_bytes)")
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
