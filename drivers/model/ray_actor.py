"""A model worker as a Ray actor: the same ``Worker`` (drivers/model/worker.py) and engine, in a Ray worker process.

The kernel (kernel/ray_executor.py) creates one actor per model instance, placed by Ray's resource model
(a bundle of a placement group: ``num_cpus``, ``num_gpus``, and the instance's memory estimate as Ray's
``memory`` resource). The actor then connects to a tcp socket the kernel bound for it and speaks the kernel
<-> worker protocol (``protocol.py``) exactly as a local worker does over its ipc socket: the kernel's
executor, the scheduler, signals, sessions and the journal do not know the difference. Why a ZeroMQ socket
and not Ray actor calls for the steps: docs/architecture.md, "Ray executors" (the per-step cost of each,
measured by ``python -m benchmarks.ray``).

The connection is CURVE-encrypted: the actor makes its own key pair and gives the kernel only its public
key (``where()``); the kernel lets in only that key (kernel/ray_executor.py's ZAP domain) and gives the actor
its socket's public key (``serve``): no secret crosses Ray. The actor never outlives its kernel: Ray kills
an actor whose owner (the kernel's driver) died, and the worker also exits once the kernel's connection has
been down ``worker.KERNEL_LOST_S`` seconds.
"""

from __future__ import annotations

import os
import socket
from typing import Any


class ModelActor:
    """A Ray actor class (the kernel wraps it with ``ray.remote``): ``where()`` then ``serve(...)``."""

    def __init__(self) -> None:
        import zmq

        self.public_key, self.secret_key = (k.decode() for k in zmq.curve_keypair())

    def where(self) -> dict[str, Any]:
        """The node this actor runs on and the actor's CURVE public key: {node_id, ip, hostname, pid, gpu_ids,
        public_key}."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "public_key": self.public_key}

    def serve(self, address: str, model_path: str, device: str, options: dict[str, Any], server_key: str) -> int:
        """Load the model and run the step loop until the kernel says Shutdown or goes away: the worker's exit
        code (0: shut down, 1: the load failed, 2: the kernel is gone)."""
        from llmos.drivers.model.worker import Worker

        curve = {"server_key": server_key, "public_key": self.public_key, "secret_key": self.secret_key}
        worker = Worker(address, model_path, device, options, curve=curve, watch_kernel=True)
        try:
            return worker.serve()
        finally:
            if worker.io is None or not worker.io.is_alive():  # never close a socket another thread still uses
                worker.sock.close(linger=500)
