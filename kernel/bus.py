"""The Bus: the kernel's ROUTER socket. Reads frames, runs one dispatch task per request, replies.

Unroutable replies (the client went away) are dropped, never raised: ROUTER_MANDATORY turns
them into EHOSTUNREACH, which cancels that client's streams. On shutdown every client with a
call in flight gets a ``bye`` frame.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import zmq
import zmq.asyncio

from llmos.kernel.config import KernelConfig
from llmos.kernel.dispatch import dispatch
from llmos.kernel.handlers import Caller, Handlers
from llmos.kernel.log import get_logger
from llmos.syscalls import codec
from llmos.syscalls.errors import Errno


class Bus:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, handlers: Handlers,
                 config: KernelConfig | None = None) -> None:
        self.address = address
        self.config = config or KernelConfig()
        self.handlers = handlers
        self.log = get_logger("bus")
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024 + 1024)  # libzmq drops bigger frames
        self.users: dict[bytes, str] = {}
        self.inflight: dict[bytes, set[asyncio.Task]] = defaultdict(set)
        self._reader: asyncio.Task | None = None

    def bind(self) -> None:
        self.sock.bind(self.address)

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="bus:read")

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=True)
            ident = frames[0]
            if len(frames) != 2:
                await self._send(ident, codec.error(None, int(Errno.EPROTO), "EPROTO",
                                                    f"expected one frame per request, got {len(frames) - 1}"))
                continue
            caller = Caller(ident, self.users.get(ident, "anonymous"))
            task = asyncio.get_running_loop().create_task(self._serve(caller, frames[1]))
            self.inflight[ident].add(task)
            task.add_done_callback(lambda t, i=ident: self._done(i, t))

    def _done(self, ident: bytes, task: asyncio.Task) -> None:
        tasks = self.inflight.get(ident)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self.inflight[ident]

    async def _serve(self, caller: Caller, frame: bytes) -> None:
        if caller.user == "anonymous":
            _learn_user(self.users, caller, frame)

        async def send(data: bytes) -> None:
            if not await self._send(caller.identity, data):
                raise asyncio.CancelledError  # the client is gone: stop streaming to it

        try:
            await dispatch(self.handlers, caller, frame, send)
        except asyncio.CancelledError:
            pass

    async def _send(self, ident: bytes, data: bytes) -> bool:
        try:
            await self.sock.send_multipart([ident, data])
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self.log.warning("send_failed", error=str(exc))
            self.users.pop(ident, None)
            return False

    async def close(self, reason: str) -> None:
        if self._reader:
            self._reader.cancel()
        for ident, tasks in list(self.inflight.items()):
            for t in tasks:
                t.cancel()
            await self._send(ident, codec.bye(reason))
        await asyncio.sleep(0.05)  # let the bye frames leave before the socket closes
        self.sock.close(linger=500)


def _learn_user(users: dict[bytes, str], caller: Caller, frame: bytes) -> None:
    """Remember the user a client announced in hello; later requests on that identity carry it."""
    try:
        msg: Any = codec.decode(frame)
        if isinstance(msg, dict) and msg.get("call") in ("hello", 0):
            user = (msg.get("args") or {}).get("user")
            if isinstance(user, str) and user:
                users[caller.identity] = user
                caller.user = user
    except Exception:
        pass  # dispatch reports the malformed frame
