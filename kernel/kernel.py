"""The Kernel: composes the actors (ProcessManager, ModelManager), the handlers and the Bus.

``Kernel.serve()`` runs until a shutdown is requested (syscall, signal, parent death), then
stops in order: bus (bye frames), model workers, actors.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from llmos.drivers.devices import DeviceTable
from llmos.drivers.model.from_store import use_store
from llmos.drivers.storage import FS, Store, Writer, store_dir
from llmos.kernel import messages as m
from llmos.kernel.bus import Bus, Listener
from llmos.kernel.capture import Captures
from llmos.kernel.config import KernelConfig
from llmos.kernel.handlers import Handlers, ready_executors
from llmos.kernel.heap import return_big_buffers_to_the_os
from llmos.kernel.delegation import Delegation, parse_delegates
from llmos.kernel.identity import CURVE, KeyAuthenticator, owner_name
from llmos.kernel.prometheus import Exporter, Snapshot
from llmos.syscalls.errors import Busy
from llmos.kernel.journal import Journal
from llmos.kernel.log import LogRing, get_logger
from llmos.kernel.models import ModelManager
from llmos.kernel.procman import ProcessManager
from llmos.kernel.ray_backend import WORKER_ZAP_DOMAIN, RayBackend
from llmos.kernel.sharing import ensure_keys, listen_plan, share_socket


class Kernel:
    def __init__(self, home: Path, address: str, config: KernelConfig | None = None) -> None:
        self.home = home
        self.address = address
        self.config = config or KernelConfig()
        self.run_dir = home / "run"
        self.log_dir = home / "log"
        self.started = time.time()
        self.owner = owner_name()  # the admin, with root
        self.admins = frozenset({"root", self.owner})
        self.delegation = Delegation(parse_delegates(self.config.delegate), self.admins)  # who may act for whom
        self.plan = listen_plan(address, self.config)  # [(address, transport)]; InvalidArgument for a bad one
        self.auth: AsyncioAuthenticator | None = None
        self.log = get_logger("kernel")
        self._stop = asyncio.Event()
        self._stop_reason = ""

    async def start(self) -> None:
        return_big_buffers_to_the_os()  # frames of many MiB must not stay in the kernel's heap
        self.ctx = zmq.asyncio.Context()
        # the store first: the journal and the log ring write through its one Writer
        self.store = Store(store_dir(self.home)).open()
        self.store.gc_orphans()
        self.writer = Writer(self.store).start()
        self.fs = FS(self.store)
        use_store(self.fs)  # model names resolve in this store (/models/<name>): llmos run --model NAME
        self.logring = LogRing(self.store, self.writer).start()
        self.public_key, secret_key, self.keyring = ensure_keys(self.home, self.owner)
        self.journal = (Journal(self.store, self.writer, self.config.checkpoint_s)
                        if self.config.journal == "on" else None)
        # the journal's processes come back now: ZOMBIEs with their results, the rest waiting for their models
        self.procman = ProcessManager(self.config, admins=self.admins,
                                      journal=self.journal).start()
        waiting_for = self.procman.orphan_models()
        self.capture = Captures(self.writer, self.fs, self.procman, max_bytes=self.config.max_capture_bytes,
                                max_bytes_per_user=self.config.max_capture_bytes_per_user).install()
        self.devices = DeviceTable(self.config.memory_limit)
        self.ray: RayBackend | None = None
        if self.config.ray:  # before the model manager: it places Ray instances (DeviceError: Ray is not there)
            self.ray = RayBackend(self.config.ray)
            await asyncio.to_thread(self.ray.connect)
            self.log.info("ray_connected", **self.ray.describe())
        self.models = ModelManager(self.ctx, self.run_dir, self.log_dir, self.procman, self.devices,
                                   self.config, ray=self.ray).start()
        self.handlers = Handlers(self)
        self.exporter = Exporter(self._metrics_snapshot, asyncio.get_running_loop())
        self.metrics_url: str | None = None
        if self.config.metrics_port is not None:  # before the bus: a port in use ends the start, said plainly
            try:
                port = self.exporter.serve(self.config.metrics_port, self.config.metrics_host)
            except OSError as exc:
                raise Busy(f"--metrics-port {self.config.metrics_port} on {self.config.metrics_host}: "
                           f"{exc.strerror or exc}") from None
            self.metrics_url = f"http://{self.config.metrics_host}:{port}/metrics"
        listeners = [Listener(a, t, self.public_key, secret_key) for a, t in self.plan]
        if any(t == CURVE for _, t in self.plan):  # the ZAP handler first: it checks each CURVE handshake
            self.auth = KeyAuthenticator(self.ctx, self.keyring, on_refused=self._key_refused)
        elif self.ray is not None:
            self.auth = AsyncioAuthenticator(self.ctx)
        if self.ray is not None:  # the Ray actors' tcp sockets let in only the keys handed to them
            self.auth.configure_curve_callback(WORKER_ZAP_DOMAIN, self.ray.keys)
        if self.auth is not None:
            self.auth.start()
        self.bus = Bus(self.ctx, listeners, self.handlers, self.config, admins=self.admins, keyring=self.keyring)
        self.bus.bind()
        for a, _ in self.plan:
            share_socket(a, self.config.group, self.home)
        self.bus.start()
        self._recovery = asyncio.get_running_loop().create_task(self._load_for_recovery(waiting_for))
        gc.collect()
        gc.freeze()  # what start-up made lives as long as the kernel: later collections skip it
        self.log.info("kernel_started", pid=os.getpid(), address=self.address, home=str(self.home),
                      listeners=[f"{t} {a}" for a, t in self.plan], owner=self.owner, group=self.config.group,
                      delegates=self.config.delegate)
        if self.metrics_url:
            self.log.info("metrics_http", url=self.metrics_url)

    async def _metrics_snapshot(self) -> Snapshot:
        devices = await self.models.ask(m.Devices())
        return Snapshot(await self.handlers.metrics(), devices["devices"], self.started)

    def _key_refused(self, fingerprint: str) -> None:
        self.handlers.audit.refused("unknown", "handshake", f"CURVE key {fingerprint} is not authorised",
                                    transport=CURVE)

    async def _load_for_recovery(self, models: list[str]) -> None:
        """Load the models that restored processes wait for; a model that cannot be loaded ends them (EIO)."""
        for model in models:
            try:
                ready = await self.models.ask(m.Load(model, {}))
                await ready_executors(ready)
            except Exception as exc:  # the model's files are gone, or it no longer fits
                message = getattr(exc, "message", None) or repr(exc)
                self.log.error("recovery_load_failed", model=model, error=message)
                self.procman.tell(m.ModelGone(model, f"model {model} could not be loaded after the kernel restarted: "
                                                     f"{message}"))

    def request_shutdown(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def serve(self) -> None:
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        self.log.info("kernel_stopping", reason=self._stop_reason)
        await asyncio.to_thread(self.exporter.close)
        await self.bus.close(self._stop_reason or "kernel stopping")
        self._recovery.cancel()
        await self.procman.ask(m.Suspend())  # unfinished processes stay journaled, to resume at the next start
        try:
            await asyncio.wait_for(self.models.ask(m.StopAll()), 15)
        except Exception as exc:
            self.log.error("stop_models_failed", error=repr(exc))
        await self.models.stop()
        checkpoint = await self.procman.ask(m.Checkpoint())
        if checkpoint is not None:
            try:
                await asyncio.wait_for(checkpoint, 30)
            except Exception as exc:
                self.log.error("journal_checkpoint_failed", error=str(exc))
        await self.procman.stop()
        await self.logring.stop()
        await asyncio.to_thread(self.writer.stop)  # commits what is queued, then ends its thread
        self.store.close()
        if self.ray is not None:  # its actors are gone with the models; a Ray started here stops
            await asyncio.to_thread(self.ray.shutdown)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=200)
        self.log.info("kernel_stopped")
