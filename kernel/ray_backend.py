"""The kernel's Ray connection: the cluster's nodes as devices, placement groups for model instances, actors.

With ``llmos kernel start --ray [ADDRESS]`` the kernel is a Ray *driver*: ``local`` (no address) starts a Ray
instance on this machine for the kernel's lifetime, ``auto`` joins the cluster running here (``ray start
--head``), ``HOST:PORT`` joins the head at that address. The kernel stays the one control plane (process table,
scheduler, journal, identity); Ray only places and runs the model instances (``backend="ray"``), each a
``drivers/model/ray_actor.ModelActor`` in a bundle of the model's placement group (Ray's resource model:
``CPU``, ``GPU`` and ``memory``; strategy ``SPREAD`` or ``PACK``; https://docs.ray.io/en/latest/ray-core/
scheduling/placement-group.html). Every call into Ray here blocks (a GCS round trip, milliseconds; ``connect``
seconds): the kernel's actors make them through ``call``, on one thread of their own and bounded in time, so
a head that stops answering holds neither the event loop nor the threads other syscalls use.

Errors: ``connect`` raises DeviceError (EIO) when Ray cannot be started or reached, or when the
``ray`` package is missing; ``check_fits`` raises OutOfMemory (ENOMEM) when no live node could ever hold one
instance; ``call`` raises DeviceError when Ray does not answer in time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from llmos.syscalls.errors import DeviceError, OutOfMemory

WORKER_ZAP_DOMAIN = "llmos-worker"  # the ZAP domain of the tcp sockets Ray actors connect to
PLACEMENTS = {"spread": "SPREAD", "pack": "PACK"}
RAY_ANSWER_S = 10.0  # the longest the kernel waits for one call into Ray
# a driver whose GCS is unreachable this long exits (Ray's default: 60 s): the kernel outlives a head restart
GCS_RECONNECT_S = str(7 * 24 * 3600)


class WorkerKeys:
    """The CURVE client keys (Z85) the kernel gave its Ray actors: the ZAP credentials provider of
    WORKER_ZAP_DOMAIN (zmq.auth's ``callback(domain, key)`` protocol). A key leaves when its actor stops."""

    def __init__(self) -> None:
        self.allowed: set[str] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii", "replace") in self.allowed


@dataclass
class RaySpec:
    """How one model's instances are placed on Ray: per-actor resources and the placement strategy."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    placement: str = "spread"
    memory_bytes: int = 0  # each instance's memory estimate, reserved as Ray's `memory` resource (0: none)

    def bundle(self) -> dict[str, float]:
        b = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            b["GPU"] = float(self.num_gpus)
        if self.memory_bytes:
            b["memory"] = float(self.memory_bytes)
        return b

    def describe(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "placement": self.placement}


@dataclass
class RayBackend:
    """The kernel's connection to Ray (``address``: local, auto or HOST:PORT)."""

    address: str
    keys: WorkerKeys = field(default_factory=WorkerKeys)
    ip: str = ""  # this node's address as Ray sees it: where the kernel binds its actors' sockets
    gcs_address: str = ""
    started_local: bool = False
    actor_class: Any = None  # ModelActor as a Ray actor class (made once: each ray.remote() exports it anew)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="llmos-ray"))

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float = RAY_ANSWER_S) -> Any:
        """``fn(*args)`` on the Ray thread; DeviceError (EIO) when Ray has not answered in ``timeout`` seconds."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise DeviceError(f"the Ray cluster ({self.gcs_address or self.address}) did not answer in "
                              f"{timeout:.0f} s") from None

    def connect(self) -> None:
        try:
            import ray
        except ImportError:
            raise DeviceError("--ray needs the ray package: pip install 'llmos[ray]' (or pip install ray)") from None
        if self.address not in ("local", "auto"):
            _probe(self.address)  # Ray would retry an address where nothing listens for minutes
        kw: dict[str, Any] = {"namespace": "llmos", "log_to_driver": False, "logging_level": logging.WARNING,
                              "configure_logging": True}
        try:
            if self.address == "local":  # a new Ray, never one found through RAY_ADDRESS or a running cluster
                ray.init(address="local", include_dashboard=False, **kw)
                self.started_local = True
            else:
                os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", GCS_RECONNECT_S)
                ray.init(address=self.address, **kw)
        except Exception as exc:  # ConnectionError, a timeout, a bad address: one line for the operator
            raise DeviceError(f"--ray {self.address}: cannot {'start' if self.address == 'local' else 'join'} Ray: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        self.ip = ray.util.get_node_ip_address()
        self.gcs_address = ray.get_runtime_context().gcs_address
        from llmos.drivers.model.ray_actor import ModelActor

        self.actor_class = ray.remote(ModelActor)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.pool.shutdown(wait=False)

    def describe(self) -> dict[str, Any]:
        return {"address": self.gcs_address, "asked": self.address, "started_local": self.started_local,
                "kernel_ip": self.ip}

    # -- nodes ----------------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        """Every live node as a device entry (``devices``): node id, address, CPUs, GPUs and memory from Ray's
        view, totals and what is free now (Ray's logical resources: what placement counts)."""
        import ray

        try:  # not public API; without it the free columns fall back to the totals
            from ray._private.state import available_resources_per_node
            free = available_resources_per_node()
        except Exception:
            free = {}
        out = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            total, avail = n.get("Resources") or {}, free.get(n["NodeID"], n.get("Resources") or {})
            mem, mem_free = int(total.get("memory", 0)), int(avail.get("memory", 0))
            out.append({"name": node_name(n["NodeID"]), "kind": "node", "node_id": n["NodeID"],
                        "ip": n.get("NodeManagerAddress"), "hostname": n.get("NodeManagerHostname"),
                        "head": "node:__internal_head__" in total,
                        "cpus": total.get("CPU", 0.0), "cpus_free": avail.get("CPU", 0.0),
                        "gpus": total.get("GPU", 0.0), "gpus_free": avail.get("GPU", 0.0),
                        "memory_total_bytes": mem, "memory_free_bytes": mem_free,
                        "budget_bytes": mem, "reserved_bytes": mem - mem_free, "free_bytes": mem_free})
        return out

    @staticmethod
    def check_fits(spec: RaySpec, nodes: list[dict[str, Any]]) -> None:
        """Refuse at once what no live node (of ``nodes()``) could ever hold (Ray would wait for such a bundle
        forever): ENOMEM naming what one instance needs and what each node has (the table bounds the rest: placement
        spread|pack, num_gpus 0..1, as the engine runs an instance on one device)."""
        need = spec.bundle()
        keys = {"CPU": "cpus", "GPU": "gpus", "memory": "memory_total_bytes"}
        if not any(all(n[keys[k]] >= v for k, v in need.items()) for n in nodes):
            have = "; ".join(f"{n['name']}: {n['cpus']:g} CPU, {n['gpus']:g} GPU, {n['memory_total_bytes'] / 2**20:.0f} "
                             f"MiB" for n in nodes) or "no live node"
            raise OutOfMemory(f"no Ray node can hold one instance ({bundle_text(need)}); nodes: {have}")

    # -- placement and actors ---------------------------------------------------------------------
    def placement_group(self, spec: RaySpec, instances: int, name: str) -> Any:
        from ray.util.placement_group import placement_group

        return placement_group([spec.bundle()] * instances, strategy=PLACEMENTS[spec.placement], name=name)

    def remove(self, pg: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(pg)
        except Exception:
            pass  # already gone (the cluster lost it with its node, or Ray is shutting down)

    def actor(self, pg: Any, index: int, spec: RaySpec, env: dict[str, str]) -> Any:
        """A ModelActor in bundle ``index`` of ``pg``, not restarted by Ray (the kernel restarts instances)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": 0,
                                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                                    pg, placement_group_bundle_index=index),
                                "runtime_env": {"env_vars": env}}
        if spec.memory_bytes:
            opts["memory"] = spec.memory_bytes
        return self.actor_class.options(**opts).remote()

    @staticmethod
    def kill(actor: Any) -> None:
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass  # already dead


def _probe(address: str, timeout: float = 5.0) -> None:
    """DeviceError unless something accepts a tcp connection at ``address`` ([ray://]HOST:PORT)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DeviceError(f"--ray {address}: no Ray head answers there ({exc.strerror or exc}); start one with "
                          f"`ray start --head` and give the address it prints") from None


def node_name(node_id: str) -> str:
    """A node's short device name: ``ray:`` and the first 8 hex digits of its id."""
    return f"ray:{node_id[:8]}"


def bundle_text(bundle: dict[str, float]) -> str:
    return ", ".join(f"{v / 2**20:.0f} MiB memory" if k == "memory" else f"{v:g} {k}" for k, v in bundle.items())
