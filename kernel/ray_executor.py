"""The kernel's side of one model instance running as a Ray actor: an Executor whose worker is remote.

Everything above the socket is the local Executor's (kernel/executor.py): the same worker protocol, the same
frames, rate limits, heartbeats and messages to the ProcessManager. What differs is where the worker runs and
how its death is noticed:

- the socket is tcp on the kernel's node address (Ray's view of it), CURVE-encrypted with a key pair made for
  this instance; the ZAP handler lets in only the client key handed to this actor (``ray_backend.WorkerKeys``);
- the worker is a ``ModelActor`` in one bundle of the model's placement group; ``serve`` is one long actor call
  whose result (an exit code, or Ray's actor-death error when the actor, its worker process or its node dies)
  is the worker's exit; silence past the heartbeat deadline kills the actor, as it kills a local worker;
- an actor Ray has not placed within ``placement_s`` (no node has the bundle free) fails the load with ENOMEM.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import zmq

from llmos.drivers.model import protocol as wp
from llmos.kernel import messages as m
from llmos.kernel.executor import Executor
from llmos.kernel.ray_backend import WORKER_ZAP_DOMAIN, RayBackend, RaySpec, _bundle_text, node_name
from llmos.syscalls import codec
from llmos.syscalls.errors import Errno

RAY_PLACEMENT_S = 60.0  # default: how long an instance may wait for Ray to place it before its load fails


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
        self.where: dict[str, Any] = {}  # the actor's node, once it runs
        self.client_key = ""
        self._serve_ref: Any = None

    def launch(self, program: Any = None) -> "RayExecutor":
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        self.sock.curve_secretkey, self.sock.curve_publickey = server_secret, server_public
        self.sock.curve_server = True
        self.sock.zap_domain = WORKER_ZAP_DOMAIN.encode()
        self.client_key = client_public.decode()
        self.ray.keys.allowed.add(self.client_key)
        host = f"[{self.ray.ip}]" if ":" in self.ray.ip else self.ray.ip
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        # Ray starts its workers at nice 15: a model instance would give its cores to anything else on the node
        env = {"LLMOS_HOME": str(self.home), "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
               "MALLOC_TRIM_THRESHOLD_": str(4 << 30), "RAY_worker_niceness": "0"}
        self.actor = self.ray.actor(self.pg, self.bundle, self.spec, env)
        self._where_ref = self.actor.where.remote()
        self._serve_ref = self.actor.serve.remote(self.address, self.model_path, self.device, self.options,
                                                  {"server_key": server_public.decode(),
                                                   "public_key": self.client_key,
                                                   "secret_key": client_secret.decode()})
        self.log.info("ray_actor_created", model=self.model_path, bundle=self.bundle, **self.spec.describe())
        self.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]
        return self

    async def _watch(self) -> None:
        placed_by = time.monotonic() + self.placement_s
        served = asyncio.ensure_future(self._serve_ref)
        located = asyncio.ensure_future(self._where_ref)
        try:
            while True:
                await asyncio.sleep(0.2)
                if located.done() and not self.where and located.exception() is None:
                    self.where = located.result()
                    self.log.info("ray_actor_placed", node=self.where.get("node_id"), ip=self.where.get("ip"),
                                  pid=self.where.get("pid"))
                if served.done():
                    self.tell(m.Died(self._exit_text(served)))
                    return
                if not self.where and time.monotonic() > placed_by:
                    self.ray.kill(self.actor)
                    self.tell(m.Died(f"Ray placed no instance of {self.model_path} in {self.placement_s:.0f} s: no "
                                     f"node has {_bundle_text(self.spec.bundle())} free (llmos devices shows the "
                                     f"nodes)", Errno.ENOMEM))
                    return
                if self.ready.done() and time.monotonic() - self.last_seen > self.silence_s:
                    self.ray.kill(self.actor)  # its serve call then fails: the next turn reports it
        finally:
            for f in (served, located):
                if not f.done():
                    f.cancel()

    def _exit_text(self, served: asyncio.Future) -> str:
        where = f" on node {self.where.get('node_id', '?')[:8]}" if self.where else ""
        exc = served.exception()
        if exc is None:
            return f"Ray actor for {self.model_path}{where} exited with code {served.result()}"
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return f"Ray actor for {self.model_path}{where} died ({type(exc).__name__}): {first[:300]}"

    async def on_stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.actor is not None:
            try:
                self.sock.send(codec.encode(wp.Shutdown().to_wire()), zmq.NOBLOCK)
                await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(self._serve_ref)), 3.0)
            except BaseException:  # no answer, already dead, or a shutdown that could not be sent
                pass
            await asyncio.to_thread(self.ray.kill, self.actor)
        self.ray.keys.allowed.discard(self.client_key)
        self.sock.close(linger=0)
        self._fail_all("executor stopped")
        if not self.ready.done():
            from llmos.syscalls.errors import DeviceError

            self.ready.set_exception(DeviceError(self.dead or f"model {self.model_path} was unloaded while loading"))
            self.ready.exception()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        node = self.where.get("node_id")
        d.update({"backend": "ray", "worker_pid": self.where.get("pid"), "node": node_name(node) if node else None,
                  "node_id": node, "node_ip": self.where.get("ip"), "hostname": self.where.get("hostname"),
                  "device": self.device if node else "pending", **self.spec.describe()})
        return d
