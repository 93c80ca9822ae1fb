"""The asyncio client: the same calls as Client, as coroutines, over a zmq.asyncio DEALER socket.

Replies are routed to per-request queues by one reader task, so many calls may be in flight
at once from one AsyncClient.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, AsyncIterator


from llmos._wire import (Calls, async_bus_context, await_handshake_async, check_ipc, current_user, model_arg,
                         open_dealer, spawn_args, syscall_doc, text_or_raise)
from llmos.syscalls import protocol
from llmos.syscalls.address import resolve_address
from llmos.syscalls.errors import KernelGone, KernelUnavailable, TimedOut
from llmos.types import ProcessInfo, ProcessResult, TurnResult

if TYPE_CHECKING:
    from llmos.fs import AsyncFS
    from llmos.session import AsyncSession


class AsyncClient:
    def __init__(self, address: str | None = None, *, user: str | None = None, server_key: str | None = None,
                 client_key: str | None = None, insecure: bool | None = None, act_for: str | None = None) -> None:
        """As Client's (identity from the transport; keys for tcp; ``act_for``: every call made for that user,
        by a delegate); ``await connect()`` connects."""
        self.address = resolve_address(address)  # InvalidArgument for an unusable one
        self.user = user or current_user()
        self._asked_user = user
        self._keys = (server_key, client_key, insecure)
        self._calls = Calls(act_for)
        self._queues: dict[int, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._sock: Any = None
        self._last_heard = time.monotonic()
        self.kernel: dict[str, Any] = {}

    async def connect(self, timeout: float = 5.0) -> "AsyncClient":
        check_ipc(self.address)
        self._sock, monitor = open_dealer(async_bus_context(), self.address, *self._keys)
        if monitor is not None:
            await await_handshake_async(self._sock, monitor, self.address, timeout)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            self.kernel = await self.hello(timeout=timeout)
            self.user = self.kernel.get("user", self.user)
        except (TimedOut, KernelGone) as exc:
            await self.close()
            raise KernelUnavailable(f"no kernel answers at {self.address}: {exc.message}") from None
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self, pid: int | None = None) -> ProcessResult | None:
        """``await close()``: disconnect (safe twice). ``await close(pid)``: the ``close`` syscall, as
        ``Client.close(pid)``: end a session (or any process) and return its reaped ProcessResult."""
        if pid is not None:
            return ProcessResult.from_wire(await self.call("close", {"pid": pid}, timeout=60.0))
        if self._reader:
            self._reader.cancel()
        if self._sock is not None and not self._sock.closed:
            self._sock.close(linger=0)
        self._fail_all(KernelGone("client is closed"))
        return None

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

    # -- syscalls (one method per entry of llmos.syscalls.table; shapes and errors as Client's) ------
    @syscall_doc("hello")
    async def hello(self, client: str = "llmos.AsyncClient", timeout: float | None = 5.0) -> dict[str, Any]:
        return await self.call("hello", {"version": protocol.PROTOCOL_VERSION, "client": client,
                                         "user": self._asked_user}, timeout)

    @syscall_doc("ping")
    async def ping(self, timeout: float | None = 5.0) -> dict[str, Any]:
        return await self.call("ping", timeout=timeout)

    @syscall_doc("kernel_info")
    async def kernel_info(self) -> dict[str, Any]:
        return await self.call("kernel_info", timeout=30.0)

    @syscall_doc("shutdown")
    async def shutdown(self) -> dict[str, Any]:
        return await self.call("shutdown", timeout=30.0)

    @syscall_doc("spawn")
    async def spawn(self, prompt: str | None = None, messages: list[dict] | None = None, model: str | None = None,
                    priority: int = 0, *, session: bool = False, deadline: float | None = None,
                    queue_timeout: float | None = None, **params: Any) -> int:
        """Returns the new pid; arguments as Client.spawn."""
        params.update(session=session, deadline=deadline, queue_timeout=queue_timeout)
        return (await self.call("spawn", spawn_args(prompt, messages, model, priority, params)))["pid"]

    @syscall_doc("wait")
    async def wait(self, pid: int, timeout: float | None = None, reap: bool = True) -> ProcessResult:
        return ProcessResult.from_wire(await self.call("wait", {"pid": pid, "timeout": timeout, "reap": reap}))

    @syscall_doc("kill")
    async def kill(self, pid: int, signal: str = "TERM") -> str:
        """``signal``: TERM, KILL, STOP or CONT. Returns the process's state after delivery."""
        return (await self.call("kill", {"pid": pid, "signal": signal}, timeout=30.0))["state"]

    async def stop(self, pid: int) -> str:
        """``kill(pid, "STOP")``: suspend a process; returns its state (STOPPED)."""
        return await self.kill(pid, "STOP")

    async def cont(self, pid: int) -> str:
        """``kill(pid, "CONT")``: resume a STOPPED process exactly where it was; returns its state."""
        return await self.kill(pid, "CONT")

    @syscall_doc("nice")
    async def nice(self, pid: int, priority: int) -> dict[str, Any]:
        """``priority``: the new nice value, -20..19. Returns {pid, priority, state}."""
        return await self.call("nice", {"pid": pid, "priority": priority}, timeout=30.0)

    @syscall_doc("ps")
    async def ps(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_wire(p) for p in (await self.call("ps", timeout=30.0))["processes"]]

    @syscall_doc("stat")
    async def stat(self, pid: int) -> ProcessInfo:
        return ProcessInfo.from_wire(await self.call("stat", {"pid": pid}, timeout=30.0))

    @syscall_doc("stream")
    async def stream(self, pid: int) -> AsyncIterator[str]:
        """Text chunks as they are generated; ends when the process does."""
        async for kind, payload in self._frames("stream", {"pid": pid}, None):
            if kind == protocol.CHUNK and payload.get("text"):
                yield payload["text"]

    async def stream_frames(self, pid: int) -> AsyncIterator[tuple[str, Any]]:
        """The ``stream`` syscall's frames as they come, for programs that need more than the text (the
        gateway: token ids for logprobs, the result): ("chunk", {text, token_ids}) for each piece, then
        ("ok", the result map: pid, text, token_ids, finish_reason, error, signal, stats)."""
        async for kind, payload in self._frames("stream", {"pid": pid}, None):
            yield kind, payload

    @syscall_doc("write")
    async def write(self, pid: int, content: str, role: str = "user") -> TurnResult:
        """Waits for the whole reply and returns the TurnResult (as Client.write)."""
        turn = self.write_stream(pid, content, role)
        async for _ in turn:
            pass
        assert turn.result is not None, "a write stream ends with the turn's result"
        return turn.result

    def write_stream(self, pid: int, content: str, role: str = "user") -> "AsyncTurnStream":
        """The ``write`` syscall, streamed: ``async for`` the reply's text chunks; ``result`` is the TurnResult
        once the turn ends."""
        return AsyncTurnStream(self._frames("write", {"pid": pid, "content": content, "role": role}, None))

    def session(self, model: str | None = None, system: str | None = None, **sampling: Any) -> "AsyncSession":
        """A session process as an async context manager: ``async with c.session(...) as s: await s.send("hi")``."""
        from llmos.session import AsyncSession

        return AsyncSession(self, model, system, **sampling)

    @syscall_doc("models")
    async def models(self) -> list[dict[str, Any]]:
        return (await self.call("models", timeout=30.0))["models"]

    @syscall_doc("model_load")
    async def model_load(self, model: str | None = None, **options: Any) -> dict[str, Any]:
        return await self.call("model_load", {"model": model_arg(model), **options}, timeout=600.0)

    @syscall_doc("model_unload")
    async def model_unload(self, model: str | None = None, force: bool = False) -> dict[str, Any]:
        return await self.call("model_unload", {"model": model_arg(model), "force": force}, timeout=60.0)

    @syscall_doc("model_info")
    async def model_info(self, model: str | None = None) -> dict[str, Any]:
        return await self.call("model_info", {"model": model_arg(model)}, timeout=30.0)

    @syscall_doc("devices")
    async def devices(self) -> list[dict[str, Any]]:
        return (await self.call("devices", timeout=30.0))["devices"]

    @syscall_doc("metrics")
    async def metrics(self) -> dict[str, Any]:
        return await self.call("metrics", timeout=30.0)

    @syscall_doc("prometheus")
    async def prometheus(self) -> str:
        """Returns the exposition text (parse it with prometheus_client.parser.text_string_to_metric_families)."""
        return (await self.call("prometheus", timeout=30.0))["text"]

    @syscall_doc("score")
    async def score(self, text: str | None = None, model: str | None = None, *, prompt_ids: list[int] | None = None,
                    add_special_tokens: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """As Client.score."""
        return await self.call("score", {"model": model_arg(model), "text": text, "prompt_ids": prompt_ids,
                                         "add_special_tokens": add_special_tokens}, timeout=timeout)

    # -- users (the admin's; shapes as Client's) --------------------------------------------------
    @syscall_doc("user_add")
    async def user_add(self, user: str, key: str) -> dict[str, Any]:
        from llmos.syscalls.keys import read_public_key

        return await self.call("user_add", {"user": user, "key": read_public_key(key).decode("ascii")})

    @syscall_doc("user_list")
    async def user_list(self) -> list[dict[str, Any]]:
        return (await self.call("user_list"))["keys"]

    @syscall_doc("user_remove")
    async def user_remove(self, user: str, key: str | None = None) -> int:
        return (await self.call("user_remove", {"user": user, "key": key}))["removed"]

    # -- the namespace (``fs`` wraps these; shapes as Client's) -----------------------------------
    @property
    def fs(self) -> "AsyncFS":
        """The namespace as coroutines: ``await c.fs.put(path, data)``, ``get``, ``ls``, ``stat``, ``rm``,
        ``exists`` (llmos.fs.AsyncFS)."""
        from llmos.fs import AsyncFS

        return AsyncFS(self)

    @syscall_doc("fs_put")
    async def fs_put(self, path: str, data: bytes | bytearray | memoryview = b"", upload: int | None = None,
                     new_extent: bool = False, last: bool = True) -> dict[str, Any]:
        """One frame of a write (as Client.fs_put): {upload} while ``last`` is false, else the file's stat."""
        return await self.call("fs_put", {"path": path, "data": data, "upload": upload, "new_extent": new_extent,
                                          "last": last}, timeout=120.0)

    async def capture(self, pid: int, kind: str, layer: int) -> Any:
        """As Client.capture: the tensor a process captured, as a numpy float32 array."""
        from llmos.capture import capture_path, load_array

        return load_array(await self.fs_get(capture_path(pid, kind, layer)))

    @syscall_doc("fs_get")
    async def fs_get(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Returns the range's bytes (``length`` None: to the end of the file)."""
        pieces: list[bytes] = []
        async for _, payload in self._frames("fs_get", {"path": path, "offset": offset, "length": length}, None):
            pieces.append(payload["data"])
        return b"".join(pieces)

    @syscall_doc("fs_list")
    async def fs_list(self, path: str = "/", limit: int = 1000) -> dict[str, Any]:
        """Returns {path, entries (stat maps), truncated}."""
        return await self.call("fs_list", {"path": path, "limit": limit}, timeout=60.0)

    @syscall_doc("fs_remove")
    async def fs_remove(self, path: str, recursive: bool = False) -> dict[str, Any]:
        """Returns {path, removed: files removed}."""
        return await self.call("fs_remove", {"path": path, "recursive": recursive}, timeout=120.0)

    @syscall_doc("fs_rename")
    async def fs_rename(self, src: str, dst: str, replace: bool = False) -> dict[str, Any]:
        """Returns {src, dst, moved: files moved}."""
        return await self.call("fs_rename", {"src": src, "dst": dst, "replace": replace}, timeout=120.0)

    @syscall_doc("fs_stat")
    async def fs_stat(self, path: str) -> dict[str, Any]:
        """Returns {path, kind, size, owner, mtime, extents}."""
        return await self.call("fs_stat", {"path": path}, timeout=30.0)

    @syscall_doc("dmesg")
    async def dmesg(self, n: int = 100, since: int | None = None, follow: bool = False) -> AsyncIterator[str]:
        """The lines (JSON strings), oldest first; with ``follow`` it goes on with each new line."""
        async for _, payload in self._frames("dmesg", {"n": n, "since": since, "follow": follow}, None):
            for line in payload.get("lines", []):
                yield line

    async def generate_text(self, prompt: str, model: str | None = None, **params: Any) -> str:
        """Spawn, wait, and return the text (or raise the error the process ended with)."""
        pid = await self.spawn(prompt=prompt, model=model, **params)
        return text_or_raise(await self.wait(pid))


class AsyncTurnStream:
    """A session turn's reply: ``async for`` its text chunks; ``result`` is the TurnResult once it ends."""

    def __init__(self, frames: AsyncIterator[tuple[str, Any]]) -> None:
        self._frames = frames
        self.result: TurnResult | None = None
        self.token_ids: list[int] = []

    async def __aiter__(self) -> AsyncIterator[str]:
        async for kind, payload in self._frames:
            if kind == protocol.OK:
                self.result = TurnResult.from_wire(payload)
                return
            self.token_ids.extend(payload.get("token_ids", []))
            if payload.get("text"):
                yield payload["text"]
