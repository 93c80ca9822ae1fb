"""The asyncio client: the same calls as Client, as coroutines, over a zmq.asyncio DEALER socket.

Replies are routed to per-request queues by one reader task, so many calls may be in flight
at once from one AsyncClient.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from llmos._wire import Calls, current_user, model_arg, spawn_args, text_or_raise
from llmos.syscalls import protocol
from llmos.syscalls.address import connect_address, ipc_path, resolve_address
from llmos.syscalls.errors import KernelGone, KernelUnavailable, TimedOut
from llmos.types import ProcessInfo, ProcessResult


class AsyncClient:
    def __init__(self, address: str | None = None, *, user: str | None = None) -> None:
        self.address = resolve_address(address)  # InvalidArgument for an unusable one
        self.user = user or current_user()
        self._calls = Calls()
        self._queues: dict[int, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: Any = None
        self._last_heard = time.monotonic()
        self.kernel: dict[str, Any] = {}

    async def connect(self, timeout: float = 5.0) -> "AsyncClient":
        path = ipc_path(self.address)
        if path is not None and not path.exists():
            raise KernelUnavailable(f"no kernel at {self.address} (socket file does not exist)")
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(connect_address(self.address))
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            self.kernel = await self.hello(timeout=timeout)
        except (TimedOut, KernelGone) as exc:
            await self.close()
            raise KernelUnavailable(f"no kernel answers at {self.address}: {exc.message}") from None
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self._sock is not None and not self._sock.closed:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        self._fail_all(KernelGone("client is closed"))

    # -- transport -------------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            while True:
                raw = await self._sock.recv()
                self._last_heard = time.monotonic()
                try:
                    rid, kind, payload = self._calls.interpret(raw)
                except KernelGone as exc:
                    self._fail_all(exc)
                    continue
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait((kind, payload))
        except asyncio.CancelledError:
            pass

    def _fail_all(self, exc: Exception) -> None:
        for q in self._queues.values():
            q.put_nowait(("err", exc))

    async def _frames(self, name: str, args: dict[str, Any], timeout: float | None) -> AsyncIterator[tuple[str, Any]]:
        if self._sock is None or self._sock.closed:
            raise KernelGone("client is not connected")
        rid, frame = self._calls.request(name, args)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        deadline = None if timeout is None else time.monotonic() + timeout
        started = time.monotonic()
        try:
            await self._sock.send(frame)
            while True:
                wait = protocol.HEARTBEAT_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimedOut(f"no reply from the kernel within {timeout} s")
                try:
                    kind, payload = await asyncio.wait_for(q.get(), wait)
                except asyncio.TimeoutError:
                    if time.monotonic() - max(self._last_heard, started) > protocol.DEAD_AFTER_S:
                        raise KernelGone(f"kernel at {self.address} stopped answering") from None
                    await self._sock.send(self._calls.request("ping", {})[1])
                    continue
                if kind == "err":
                    raise payload
                yield kind, payload
                if kind == protocol.OK:
                    return
        finally:
            self._queues.pop(rid, None)

    async def call(self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        async for kind, payload in self._frames(name, args or {}, timeout):
            if kind == protocol.OK:
                return payload
        raise AssertionError("unreachable")

    # -- syscalls (one method per entry of llmos.syscalls.table) -----------------------------
    async def hello(self, client: str = "llmos.AsyncClient", timeout: float | None = 5.0) -> dict[str, Any]:
        return await self.call("hello", {"version": protocol.PROTOCOL_VERSION, "client": client,
                                         "user": self.user}, timeout)

    async def ping(self, timeout: float | None = 5.0) -> dict[str, Any]:
        return await self.call("ping", timeout=timeout)

    async def kernel_info(self) -> dict[str, Any]:
        return await self.call("kernel_info", timeout=30.0)

    async def shutdown(self) -> dict[str, Any]:
        return await self.call("shutdown", timeout=30.0)

    async def spawn(self, prompt: str | None = None, messages: list[dict] | None = None, model: str | None = None,
                    priority: int = 0, **params: Any) -> int:
        return (await self.call("spawn", spawn_args(prompt, messages, model, priority, params)))["pid"]

    async def wait(self, pid: int, timeout: float | None = None, reap: bool = True) -> ProcessResult:
        return ProcessResult.from_wire(await self.call("wait", {"pid": pid, "timeout": timeout, "reap": reap}))

    async def kill(self, pid: int, signal: str = "TERM") -> str:
        return (await self.call("kill", {"pid": pid, "signal": signal}, timeout=30.0))["state"]

    async def ps(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_wire(p) for p in (await self.call("ps", timeout=30.0))["processes"]]

    async def stat(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_wire(await self.call("stat", {"pid": pid}, timeout=30.0))

    async def stream(self, pid: int) -> AsyncIterator[str]:
        """Text chunks as they are generated; ends when the process does."""
        async for kind, payload in self._frames("stream", {"pid": pid}, None):
            if kind == protocol.CHUNK and payload.get("text"):
                yield payload["text"]

    async def models(self) -> list[dict[str, Any]]:
        return (await self.call("models", timeout=30.0))["models"]

    async def model_load(self, model: str | None = None, **options: Any) -> dict[str, Any]:
        return await self.call("model_load", {"model": model_arg(model), **options}, timeout=600.0)

    async def model_unload(self, model: str | None = None, force: bool = False) -> dict[str, Any]:
        return await self.call("model_unload", {"model": model_arg(model), "force": force}, timeout=60.0)

    async def model_info(self, model: str | None = None) -> dict[str, Any]:
        return await self.call("model_info", {"model": model_arg(model)}, timeout=30.0)

    async def devices(self) -> list[dict[str, Any]]:
        return (await self.call("devices", timeout=30.0))["devices"]

    async def metrics(self) -> dict[str, Any]:
        return await self.call("metrics", timeout=30.0)

    async def generate_text(self, prompt: str, model: str | None = None, **params: Any) -> str:
        pid = await self.spawn(prompt=prompt, model=model, **params)
        return text_or_raise(await self.wait(pid))

