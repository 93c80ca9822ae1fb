"""The kernel's side of one model instance running as a Ray actor: an Executor whose worker is remote.

Everything above the socket is the local Executor's (kernel/executor.py): the same worker protocol, the same
frames, rate limits, heartbeats and messages to the ProcessManager. What differs is where the worker runs and
how its death is noticed:

- the socket is tcp on the kernel's node address (Ray's view of it), CURVE-encrypted: a server key pair made
  for this instance, and the actor's own client key (it sends only the public half, from ``where()``), the
  only key the ZAP handler lets in besides those of the kernel's other actors (``ray_backend.WorkerKeys``);
- the worker is a ``ModelActor`` in one bundle of the model's placement group; ``serve`` is one long actor call
  whose result (an exit code, or Ray's actor-death error when the actor, its worker process or its node dies)
  is the worker's exit; silence past the heartbeat deadline kills the actor, as it kills a local worker;
- an actor Ray has not placed within ``placement_s`` (no node has the bundle free), or placed but not started
  within START_S more, fails the load with ENOMEM; one that started but whose worker never reached the kernel's socket in ``CONNECT_S`` (a firewall
  between the nodes) fails it with EIO, naming the address.
"""

from __future__ import annotations

import asyncio
import getpass
import tempfile
import time
from typing import Any

import zmq

from llmos.drivers.model import protocol as wp
from llmos.kernel import messages as m
from llmos.kernel.executor import Executor
from llmos.kernel.ray_backend import WORKER_ZAP_DOMAIN, RayBackend, RaySpec, bundle_text, node_name
from llmos.syscalls import codec
from llmos.syscalls.errors import DeviceError, Errno

RAY_PLACEMENT_S = 60.0  # default: how long an instance may wait for Ray to place and start it
START_S = 60.0  # how long a placed actor's process may take to start (Ray starts a Python worker for it)
CONNECT_S = 30.0  # how long a started actor's worker may take to reach the kernel's socket


class RayExecutor(Executor):
    """One model instance in a Ray actor (bundle ``bundle`` of placement group ``pg``)."""

    backend = "ray"

    def __init__(self, *args: Any, ray: RayBackend, pg: Any, bundle: int, spec: RaySpec,
                 placement_s: float = RAY_PLACEMENT_S, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ray, self.pg, self.bundle, self.spec = ray, pg, bundle, spec
        self.placement_s = placement_s
        self.device = "cuda:0" if spec.num_gpus else "cpu"  # as the actor sees it (Ray sets its visible GPUs)
        self.actor: Any = None
        self.where: dict[str, Any] = {}  # the actor's node and public key, once it runs
        self._refs: dict[str, Any] = {}  # the actor calls in flight: where, serve; and the bundle's placement
        self._served: asyncio.Future | None = None  # the serve call, made once the actor said its key
        self._server_key = ""

    def launch(self, program: Any = None) -> "RayExecutor":
        """Bind the CURVE tcp socket and create the actor (Ray places it later); on a failure nothing stays."""
        try:
            server_public, server_secret = zmq.curve_keypair()
            self.sock.curve_secretkey, self.sock.curve_publickey = server_secret, server_public
            self.sock.curve_server = True
            self.sock.zap_domain = WORKER_ZAP_DOMAIN.encode()
            host = f"[{self.ray.ip}]" if ":" in self.ray.ip else self.ray.ip
            port = self.sock.bind_to_random_port(f"tcp://{host}")
            self.address = f"tcp://{host}:{port}"
            # node-local spill areas; Ray starts its workers at nice 15, which would give the instance's cores away
            env = {"LLMOS_HOME": str(self.home), "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                   "MALLOC_TRIM_THRESHOLD_": str(4 << 30), "RAY_worker_niceness": "0",
                   "LLMOS_SPILL_ROOT": f"{tempfile.gettempdir()}/llmos-spill-{getpass.getuser()}"}
            self.actor = self.ray.actor(self.pg, self.bundle, self.spec, env)
            self._server_key = server_public.decode()
            self._refs = {"placed": self.pg.ready(), "where": self.actor.where.remote()}
        except Exception:
            self.sock.close(linger=0)
            if self.actor is not None:
                self.ray.kill(self.actor)
            raise
        self.log.info("ray_actor_created", model=self.model_path, bundle=self.bundle, **self.spec.describe())
        self.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]
        return self

    async def _watch(self) -> None:
        start = time.monotonic()
        located = asyncio.ensure_future(self._refs["where"])
        placed = asyncio.ensure_future(self._refs["placed"])
        started = 0.0
        try:
            while True:
                await asyncio.sleep(0.2)
                if located.done() and not self.where and located.exception() is None:
                    self.where, started = located.result(), time.monotonic()
                    # its key first: a handshake the ZAP handler refused is not tried again
                    self.ray.keys.allowed.add(self.where["public_key"])
                    self._served = asyncio.ensure_future(self.actor.serve.remote(
                        self.address, self.model_path, self.device, self.options, self._server_key))
                    self.log.info("ray_actor_placed", node=self.where.get("node_id"), ip=self.where.get("ip"),
                                  pid=self.where.get("pid"))
                if self._served is not None and self._served.done():
                    self.tell(m.Died(self._exit_text(self._served)))
                    return
                if located.done() and located.exception() is not None:  # the actor died before it said where
                    self.tell(m.Died(f"Ray actor for {self.model_path} died before it started: "
                                     f"{_first_line(located.exception())}"))
                    return
                waited = time.monotonic() - start
                if not self.where and waited > self.placement_s + (START_S if placed.done() else 0.0):
                    await self._kill()
                    self.tell(m.Died(self._unplaced_text(placed.done()), Errno.ENOMEM))
                    return
                if started and not self.frames_in and time.monotonic() - started > CONNECT_S:
                    await self._kill()
                    self.tell(m.Died(f"the Ray actor for {self.model_path} on node {self.where.get('ip')} did not "
                                     f"reach the kernel at {self.address} in {CONNECT_S:.0f} s: every node must reach "
                                     f"the kernel's node over tcp (a firewall?)"))
                    return
                if self.ready.done() and time.monotonic() - self.last_seen > self.silence_s:
                    await self._kill()  # its serve call then fails: reported at the next turn
        finally:
            for f in (located, placed):
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()  # retrieved: an actor that died fails these too

    async def _kill(self) -> None:
        try:
            await self.ray.call(self.ray.kill, self.actor)
        except DeviceError as exc:  # Ray does not answer: the actor goes with its owner or its node
            self.log.error("ray_kill_failed", error=exc.message)

    def _unplaced_text(self, bundle_placed: bool) -> str:
        if bundle_placed:  # Ray reserved the bundle, but the actor's process did not start in time
            return (f"the Ray actor for {self.model_path} was placed but did not start in "
                    f"{self.placement_s + START_S:.0f} s "
                    f"(Ray could not start its worker process: see Ray's logs on the node)")
        return (f"Ray placed no instance of {self.model_path} in {self.placement_s:.0f} s: no node has "
                f"{bundle_text(self.spec.bundle())} free (llmos devices shows the nodes)")

    def _exit_text(self, served: asyncio.Future) -> str:
        where = f" on node {self.where.get('node_id', '?')[:8]}" if self.where else ""
        exc = served.exception()
        if exc is None:
            return f"Ray actor for {self.model_path}{where} exited with code {served.result()}"
        return f"Ray actor for {self.model_path}{where} died ({type(exc).__name__}): {_first_line(exc)}"

    async def on_stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.actor is not None:
            if self._served is not None:
                try:
                    self.sock.send(codec.encode(wp.Shutdown().to_wire()), zmq.NOBLOCK)
                    await asyncio.wait_for(asyncio.shield(self._served), 3.0)
                except (Exception, asyncio.TimeoutError):  # no answer, already dead, or a shutdown not sent
                    pass
            await self._kill()
        if self._served is not None:
            if not self._served.done():
                self._served.cancel()
            elif not self._served.cancelled():
                self._served.exception()  # retrieved: the kill fails it
        self.ray.keys.allowed.discard(self.where.get("public_key", ""))
        self.sock.close(linger=0)
        self._fail_all("executor stopped")
        if not self.ready.done():
            self.ready.set_exception(DeviceError(self.dead or f"model {self.model_path} was unloaded while loading"))
            self.ready.exception()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        node = self.where.get("node_id")
        d.update({"backend": "ray", "worker_pid": self.where.get("pid"), "node": node_name(node) if node else None,
                  "node_id": node, "node_ip": self.where.get("ip"), "hostname": self.where.get("hostname"),
                  "device": self.device if node else "pending", **self.spec.describe()})
        return d


def _first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, at most 300 characters (Ray's errors run to pages)."""
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]
