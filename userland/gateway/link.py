"""The gateway's connections to the kernel: its own, and one per user it acts for.

With API keys, each request acts for the key's user: a connection made with ``AsyncClient(act_for=USER)``,
which the kernel allows when the gateway's account is the admin or was named with ``kernel start
--delegate`` (else every call of it is EPERM). A connection the kernel dropped (KernelGone) is forgotten
and made again at the next request.
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
        """Drop a connection that failed with KernelGone: the next request connects afresh."""
        for user, c in list(self._clients.items()):
            if c is client:
                del self._clients[user]
        asyncio.get_running_loop().create_task(client.close())

    async def reachable(self) -> dict[str, Any]:
        """The kernel's ping reply; KernelUnavailable (or KernelGone) when it does not answer."""
        c = await self.client()
        try:
            return await c.ping(timeout=CONNECT_TIMEOUT_S)
        except (KernelGone, LLMOSError) as exc:
            self.forget(c)
            raise KernelUnavailable(f"the kernel at {c.address} does not answer: {exc.message}") from None

    async def close(self) -> None:
        for c in list(self._clients.values()):
            await c.close()
        self._clients.clear()
