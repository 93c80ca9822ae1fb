"""The gateway's connections to the kernel: its own, and one per user it acts for.

With API keys, each request acts for the key's user: a connection made with ``AsyncClient(act_for=USER)``,
which the kernel allows when the gateway's account is the admin or was named with ``kernel start
--delegate`` (else every call of it is EPERM). A connection that failed with KernelGone (KernelRestarted
included) is forgotten, whichever route saw it (:meth:`KernelLink.drop_if_gone`, the one place): it is
closed at once, which also discards any request still queued in it (a request the client has given up on
must not reach a kernel that comes back), and the next request connects afresh.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmos.aclient import AsyncClient
from llmos.syscalls.errors import KernelGone, KernelUnavailable, LLMOSError

CONNECT_TIMEOUT_S = 5.0


class KernelLink:
    """Connections by user (None: the gateway's own). ``address``: the kernel's bus address (keys for tcp
    come from the environment, as for every client)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._clients: dict[str | None, AsyncClient] = {}
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task] = set()  # closes under way: kept, so that none is collected unfinished

    async def client(self, user: str | None = None) -> AsyncClient:
        """The connection for ``user`` (made on first use). KernelUnavailable when no kernel answers."""
        c = self._clients.get(user)
        if c is not None:
            return c
        async with self._lock:
            c = self._clients.get(user)
            if c is None:
                c = await AsyncClient(self.address, act_for=user).connect(timeout=CONNECT_TIMEOUT_S)
                self._clients[user] = c
            return c

    def forget(self, client: AsyncClient) -> None:
        """Drop a connection (and close it): the next request for its user connects afresh."""
        for user, c in list(self._clients.items()):
            if c is client:
                del self._clients[user]
        task = asyncio.get_running_loop().create_task(client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def drop_if_gone(self, client: AsyncClient, exc: BaseException) -> None:
        """Forget ``client`` when ``exc`` says its kernel went away (KernelGone, KernelRestarted); any other
        error leaves it as it is. Every route that used a connection calls this on a failure."""
        if isinstance(exc, KernelGone):
            self.forget(client)

    async def reachable(self) -> dict[str, Any]:
        """The kernel's ping reply; KernelUnavailable (or KernelGone) when it does not answer."""
        c = await self.client()
        try:
            return await c.ping(timeout=CONNECT_TIMEOUT_S)
        except (KernelGone, LLMOSError) as exc:
            self.forget(c)
            raise KernelUnavailable(f"the kernel at {c.address} does not answer: {exc.message}") from None

    async def close(self) -> None:
        """Close every connection (and wait for the closes already under way)."""
        for c in list(self._clients.values()):
            await c.close()
        self._clients.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
