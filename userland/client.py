"""The synchronous client: one DEALER socket to the kernel, one method per syscall.

Not thread-safe: give each thread its own Client. Every wait on the socket has a finite
poll; while a call is pending and the kernel is silent, the client pings it, and a kernel
that answers nothing for DEAD_AFTER_S seconds raises KernelGone.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import zmq

from llmos._wire import Calls, current_user, model_arg, spawn_args
from llmos.syscalls.address import connect_address, resolve_address
from llmos.syscalls import protocol
from llmos.syscalls.address import ipc_path
from llmos.syscalls.errors import KernelGone, KernelUnavailable, LLMOSError, TimedOut
from llmos.types import ProcessInfo, ProcessResult


class Client:
    def __init__(self, address: str | None = None, *, connect_timeout: float = 5.0,
                 user: str | None = None, client_name: str = "llmos.Client") -> None:
        self.address = resolve_address(address)  # InvalidArgument for an unusable one
        self.user = user or current_user()
        path = ipc_path(self.address)
        if path is not None and not path.exists():
            raise KernelUnavailable(f"no kernel at {self.address} (socket file does not exist)")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(connect_address(self.address))
        self._calls = Calls()
        self.kernel: dict[str, Any] = {}
        try:
            self.kernel = self.hello(client=client_name, timeout=connect_timeout)
        except (TimedOut, KernelGone) as exc:
            self.close()
            raise KernelUnavailable(f"no kernel answers at {self.address}: {exc.message}") from None
        except BaseException:
            self.close()
            raise

    # -- transport -------------------------------------------------------------------------
    def call(self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Make one syscall and return its result (raises the llmos error it answers with)."""
        rid = self._send(name, args or {})
        for kind, payload in self._frames(rid, timeout):
            if kind == protocol.OK:
                return payload
        raise AssertionError("unreachable")

    def call_stream(self, name: str, args: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """Yield ("chunk", data) frames, then ("ok", result)."""
        rid = self._send(name, args)
        yield from self._frames(rid, None)

    def _send(self, name: str, args: dict[str, Any]) -> int:
        if self._sock.closed:
            raise KernelGone("client is closed")
        rid, frame = self._calls.request(name, args)
        self._sock.send(frame)
        return rid

    def _frames(self, rid: int, timeout: float | None) -> Iterator[tuple[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        last_heard = time.monotonic()
        pinged = False
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimedOut(f"no reply from the kernel within {timeout} s")
            wait = protocol.HEARTBEAT_S if deadline is None else min(protocol.HEARTBEAT_S, deadline - now)
            if not self._sock.poll(int(wait * 1000) + 1):
                silent = time.monotonic() - last_heard
                if silent > protocol.DEAD_AFTER_S:
                    raise KernelGone(f"kernel at {self.address} stopped answering")
                if not pinged:
                    self._send("ping", {})
                    pinged = True
                continue
            got, kind, payload = self._calls.interpret(self._sock.recv())
            last_heard, pinged = time.monotonic(), False
            if got != rid:
                continue  # a ping reply, or a reply to a call abandoned earlier
            if kind == "err":
                raise payload
            yield kind, payload
            if kind == protocol.OK:
                return

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- syscalls (one method per entry of llmos.syscalls.table) -----------------------------
    def hello(self, client: str = "llmos.Client", timeout: float | None = 5.0) -> dict[str, Any]:
        return self.call("hello", {"version": protocol.PROTOCOL_VERSION, "client": client, "user": self.user},
                         timeout=timeout)

    def ping(self, timeout: float | None = 5.0) -> dict[str, Any]:
        return self.call("ping", timeout=timeout)

    def kernel_info(self) -> dict[str, Any]:
        return self.call("kernel_info", timeout=30.0)

    def shutdown(self) -> dict[str, Any]:
        return self.call("shutdown", timeout=30.0)

    def spawn(self, prompt: str | None = None, messages: list[dict] | None = None, model: str | None = None,
              priority: int = 0, **params: Any) -> int:
        return self.call("spawn", spawn_args(prompt, messages, model, priority, params))["pid"]

    def wait(self, pid: int, timeout: float | None = None, reap: bool = True) -> ProcessResult:
        return ProcessResult.from_wire(self.call("wait", {"pid": pid, "timeout": timeout, "reap": reap}))

    def kill(self, pid: int, signal: str = "TERM") -> str:
        return self.call("kill", {"pid": pid, "signal": signal}, timeout=30.0)["state"]

    def ps(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_wire(p) for p in self.call("ps", timeout=30.0)["processes"]]

    def stat(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_wire(self.call("stat", {"pid": pid}, timeout=30.0))

    def stream(self, pid: int) -> "OutputStream":
        return OutputStream(self.call_stream("stream", {"pid": pid}))

    def models(self) -> list[dict[str, Any]]:
        return self.call("models", timeout=30.0)["models"]

    def model_load(self, model: str | None = None, **options: Any) -> dict[str, Any]:
        return self.call("model_load", {"model": model_arg(model), **options}, timeout=600.0)

    def model_unload(self, model: str | None = None, force: bool = False) -> dict[str, Any]:
        return self.call("model_unload", {"model": model_arg(model), "force": force}, timeout=60.0)

    def model_info(self, model: str | None = None) -> dict[str, Any]:
        return self.call("model_info", {"model": model_arg(model)}, timeout=30.0)

    def devices(self) -> list[dict[str, Any]]:
        return self.call("devices", timeout=30.0)["devices"]

    def metrics(self) -> dict[str, Any]:
        return self.call("metrics", timeout=30.0)


class OutputStream:
    """Iterate to get text chunks as they are generated; ``result`` is set once it ends."""

    def __init__(self, frames: Iterator[tuple[str, Any]]) -> None:
        self._frames = frames
        self.result: ProcessResult | None = None
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        for kind, payload in self._frames:
            if kind == protocol.OK:
                self.result = ProcessResult.from_wire(payload)
                return
            self.token_ids.extend(payload.get("token_ids", []))
            if payload.get("text"):
                yield payload["text"]

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close:
            close()


__all__ = ["Client", "OutputStream", "LLMOSError"]
