"""The Bus: the kernel's ROUTER sockets. Reads frames, runs one dispatch task per request, delivers replies.

One ROUTER per listening address (a Listener): ipc, tcp with CURVE, or tcp --insecure (loopback). Each
client connection has a Caller, the user its transport proves (kernel/identity.py: each message's
proof is compared with the connection's, so nothing a client sends can change it; routing ids a client
chose are refused), and an Outbox (kernel/outbox.py):
every reply goes through the outbox, which hands frames to the socket without blocking and keeps
what the socket refuses (the client reads slowly) for a retry, merging stream chunks meanwhile.
ZeroMQ itself holds at most SNDHWM frames per client; the outbox is bounded in bytes by the
client's budget (config.client_buffer_bytes): a client over it gets EAGAIN for new requests
until it reads, and past twice the budget its new requests are dropped unanswered (logged).

A client that is gone (ROUTER_MANDATORY turns the send into EHOSTUNREACH) is forgotten: its
calls are cancelled and its outbox dropped. On shutdown every client with a call in flight gets
a ``bye`` frame.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from llmos.kernel.config import KernelConfig
from llmos.kernel.dispatch import dispatch
from llmos.kernel.handlers import Caller, Handlers
from llmos.kernel.heap import BIG_REQUEST_BYTES, CycleCollector
from llmos.kernel.identity import ANONYMOUS, CURVE, IPC, ZAP_DOMAIN, Keyring, account_name, uid_in
from llmos.kernel.identity import proof as transport_proof
from llmos.kernel.log import get_logger
from llmos.kernel.outbox import Outbox
from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import Errno
from llmos.syscalls.keys import fingerprint

SNDHWM_FRAMES = 32  # frames ZeroMQ may hold for one client; the outbox holds the rest, in bytes
RCVHWM_FRAMES = 16  # requests ZeroMQ may hold from one client before the kernel reads them
RETRY_MIN_S, RETRY_MAX_S = 0.001, 0.05  # retry a refused send after this long, doubling while stuck
CLOSE_FLUSH_S = 0.5  # on shutdown, how long the last frames (bye) may take to leave
IDLE_CLIENTS = 4096  # connections remembered before the idle ones are forgotten
HANDSHAKE_MS = 5000  # a CURVE handshake must be done within this long


class _Gone(Exception):
    """The socket says the client is no longer connected."""


@dataclass(frozen=True)
class Listener:
    """One address the bus listens on, and how its callers prove who they are (identity.IPC, CURVE or
    INSECURE). CURVE listeners need the kernel's key pair (Z85)."""

    address: str
    transport: str
    public_key: bytes | None = None
    secret_key: bytes | None = None


@dataclass(eq=False)
class _Client:
    """One connection: who it is, what waits to be sent to it, its calls in flight."""

    bus: "Bus"
    caller: Caller
    proof: str = ""  # what the transport said of it (identity.proof): a message saying otherwise is another one
    outbox: Outbox = field(default_factory=Outbox)
    tasks: set[asyncio.Task] = field(default_factory=set)
    dropped: int = 0  # requests left unanswered past twice the budget

    # the Replies protocol of kernel.dispatch
    def chunk(self, rid: Any, data: Any) -> None:
        self.outbox.chunk(rid, data)
        self.bus.flush(self)

    def final(self, rid: Any, frame: bytes) -> None:
        self.outbox.final(rid, frame)
        self.bus.flush(self)


class Bus:
    def __init__(self, ctx: zmq.asyncio.Context, listeners: list[Listener], handlers: Handlers,
                 config: KernelConfig | None = None, admins: frozenset[str] = frozenset(),
                 keyring: Keyring | None = None) -> None:
        self.listeners = listeners
        self.address = listeners[0].address
        self.config = config or KernelConfig()
        self.handlers = handlers
        self.admins = admins
        self.keyring = keyring
        self.log = get_logger("bus")
        self.socks = [self._socket(ctx, lst) for lst in listeners]
        self.clients: dict[bytes, _Client] = {}  # key: the listener's index byte, then the routing id
        self._prune_at = IDLE_CLIENTS
        self._blocked: set[bytes] = set()  # clients whose socket refused a frame: retried by _retry
        self._wake: asyncio.Event | None = None
        self.collector: CycleCollector | None = None
        self._tasks: list[asyncio.Task] = []

    @staticmethod
    def _socket(ctx: zmq.asyncio.Context, listener: Listener) -> zmq.asyncio.Socket:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, SNDHWM_FRAMES)
        # frames read from a connection but not yet taken by the kernel: a client that sends faster
        # than the kernel reads is held back by ZeroMQ instead of filling the kernel's memory
        sock.setsockopt(zmq.RCVHWM, RCVHWM_FRAMES)
        # frames over MAX_FRAME_BYTES are read and answered EMSGSIZE; this cap only guards memory
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_TRANSPORT_BYTES)
        if listener.transport == CURVE:
            sock.curve_secretkey = listener.secret_key
            sock.curve_publickey = listener.public_key
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
            # a connection that does not finish its handshake is dropped after this long (libzmq's default,
            # 30 s, lets anyone hold file descriptors with half-open connections)
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        return sock

    def bind(self) -> None:
        for sock, listener in zip(self.socks, self.listeners):
            sock.bind(listener.address)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.collector = CycleCollector(loop)
        self._tasks = [*(loop.create_task(self._read(i), name=f"bus:read:{i}") for i in range(len(self.socks))),
                       loop.create_task(self._retry(), name="bus:retry")]

    # -- requests --------------------------------------------------------------------------
    async def _read(self, index: int) -> None:
        sock = self.socks[index]
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._receive(index, frames)
            # let the new request's task take its first step (decode, validate) before the next
            # frame is read, so a burst of big frames is not all held at once
            await asyncio.sleep(0)

    def identify(self, index: int, ident: bytes, proof: str) -> Caller | None:
        """The Caller a message's ``proof`` stands for; None for a CURVE key that is not (or no longer) authorised."""
        transport = self.listeners[index].transport
        uid = None
        if transport == IPC:
            uid = uid_in(proof)
            user = account_name(uid) if uid is not None else ANONYMOUS
        elif transport == CURVE:
            user = self.keyring.user_of(proof) if proof and self.keyring is not None else None
            if user is None:
                return None
        else:
            user = ANONYMOUS
        return Caller(ident, user, user in self.admins, transport, uid)

    def _receive(self, index: int, zframes: list[zmq.Frame]) -> None:
        frames = [f.bytes for f in zframes]
        ident = bytes([index]) + frames[0]
        if len(frames[0]) != 5 or frames[0][0] != 0:
            # a routing id the client chose (ZMQ_ROUTING_ID): a later connection could choose it too and receive
            # this one's replies, so only the ids ZeroMQ assigns (a zero byte, then 4 bytes) are served
            self._refuse(ident, frames[-1], Errno.EPROTO, "this connection chose its own routing id "
                         "(ZMQ_ROUTING_ID): the kernel serves only the ids ZeroMQ assigns; do not set it")
            return
        proof = transport_proof(zframes[-1], self.listeners[index].transport)
        if self.collector is not None and sum(map(len, frames)) >= BIG_REQUEST_BYTES:
            self.collector.big_request()  # whatever cycles its request leaves, collect them soon
        client = self.clients.get(ident)
        was = client.caller.user if client is not None else "unknown"
        if client is not None and client.proof == proof:
            # the same connection: its identity is fixed; a key withdrawn, or given to another user since, no
            # longer stands for anyone on it
            same = client.caller.transport != CURVE or self.keyring.user_of(proof) == client.caller.user
            caller: Caller | None = client.caller if same else None
        else:
            caller = self.identify(index, ident, proof)
        if client is not None and caller is not client.caller:
            # another connection under a routing id the bus knew, or a key withdrawn: nothing of the old one's
            # (its replies, its calls in flight) goes to it
            self._forget(client)
            client = None
        if caller is None:
            self.handlers.audit.refused(was, "any", f"CURVE key {fingerprint(proof.encode()) if proof else '?'} no "
                                        f"longer stands for this connection's user", transport=CURVE)
            self._refuse(ident, frames[-1], Errno.EPERM, "this connection's CURVE key is no longer authorised for "
                         "its user (withdrawn by the admin): use an authorised key")
            return
        if client is None:
            if len(self.clients) >= self._prune_at:
                self._prune()
            client = self.clients[ident] = _Client(self, caller, proof)
        if len(frames) != 2:
            rid = codec.peek_id(frames[1]) if len(frames) > 1 else None
            client.final(rid, codec.error(rid, Errno.EPROTO, None,
                                          f"expected one frame per request, got {len(frames) - 1}"))
            return
        held, budget = client.outbox.bytes, self.config.client_buffer_bytes
        if held > budget:
            if held > 2 * budget:
                client.dropped += 1
                if client.dropped == 1:
                    self.log.warning("client_flooding", user=client.caller.user, held_bytes=held)
                return
            rid = codec.peek_id(frames[1])
            client.final(rid, codec.error(rid, Errno.EAGAIN, None,
                                          f"{held} bytes of replies to this client are unread (its buffer holds "
                                          f"{budget}): read them, then call again"))
            return
        client.dropped = 0
        task = asyncio.get_running_loop().create_task(self._serve(client, frames[1]))
        client.tasks.add(task)
        task.add_done_callback(lambda t, c=client: self._done(c, t))

    def _refuse(self, ident: bytes, frame: bytes, errno: Errno, message: str) -> None:
        """Answer a request the bus will not serve (nothing of it reaches the dispatcher)."""
        rid = codec.peek_id(frame)
        try:
            self._send(ident, codec.error(rid, errno, None, message))
        except _Gone:
            pass

    async def _serve(self, client: _Client, frame: bytes) -> None:
        try:
            await dispatch(self.handlers, client.caller, frame, client)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                return  # the client is gone or the kernel is stopping: it gets nothing
            # something the call awaited was cancelled under it (a bug): the caller still gets its final frame
            self.log.error("call_cancelled", user=client.caller.user)
            rid = codec.peek_id(frame)
            client.final(rid, codec.error(rid, Errno.EIO, None, "internal kernel error: the call was cancelled"))

    def _done(self, client: _Client, task: asyncio.Task) -> None:
        client.tasks.discard(task)

    def _prune(self) -> None:
        """Idle connections are kept (their next call skips identifying them again) until there are IDLE_CLIENTS:
        then every idle one is forgotten at once, so the table stays bounded by the connections in use."""
        for ident, client in list(self.clients.items()):
            if not client.tasks and not client.outbox:
                del self.clients[ident]
        self._prune_at = max(IDLE_CLIENTS, 2 * len(self.clients))

    # -- replies ---------------------------------------------------------------------------
    def flush(self, client: _Client) -> None:
        """Send what the client's outbox holds until the socket refuses; keep the rest for a retry."""
        ident = client.caller.identity
        try:
            client.outbox.flush(lambda data: self._send(ident, data))
        except _Gone:
            self._forget(client)
            return
        if client.outbox:
            if ident not in self._blocked:
                self._blocked.add(ident)
                if self._wake is not None:
                    self._wake.set()
        else:
            self._blocked.discard(ident)

    def _send(self, ident: bytes, data: bytes) -> bool:
        """True when the socket took the frame, False when it is full for this client (EAGAIN)."""
        try:
            done = self.socks[ident[0]].send_multipart([ident[1:], data], flags=zmq.DONTWAIT, copy=False)
            if done.done():  # with DONTWAIT the send is tried at once and never waits
                done.result()
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                self.log.warning("send_failed", error=str(exc))
            raise _Gone from None
        return True

    def _forget(self, client: _Client) -> None:
        ident = client.caller.identity
        self._blocked.discard(ident)
        client.outbox.clear()
        for t in list(client.tasks):
            t.cancel()
        if self.clients.get(ident) is client:
            del self.clients[ident]

    async def _retry(self) -> None:
        """Retry the clients whose socket refused a frame, soon at first, then less often while stuck.

        A ROUTER says nothing when one peer's queue gains room, so this polls (at most every
        RETRY_MAX_S while some client is stuck; not at all while none is)."""
        assert self._wake is not None
        delay = RETRY_MIN_S
        while True:
            if not self._blocked:
                self._wake.clear()
                await self._wake.wait()
                delay = RETRY_MIN_S
            await asyncio.sleep(delay)
            progressed = False
            for ident in list(self._blocked):
                client = self.clients.get(ident)
                if client is None:
                    self._blocked.discard(ident)
                    continue
                before = client.outbox.bytes
                self.flush(client)
                progressed = progressed or client.outbox.bytes < before
            delay = RETRY_MIN_S if progressed else min(delay * 2, RETRY_MAX_S)

    # -- shutdown --------------------------------------------------------------------------
    async def close(self, reason: str) -> None:
        for t in self._tasks:
            t.cancel()
        for client in list(self.clients.values()):
            if client.tasks:
                for t in list(client.tasks):
                    t.cancel()
                client.outbox.frame(codec.bye(reason))
        deadline = asyncio.get_running_loop().time() + CLOSE_FLUSH_S
        while True:
            for client in list(self.clients.values()):
                if client.outbox:
                    self.flush(client)
            if not any(c.outbox for c in self.clients.values()) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let the last frames leave before the socket closes
        for sock in self.socks:
            sock.close(linger=500)
