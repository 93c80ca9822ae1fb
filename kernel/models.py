"""The ModelManager actor: the model registry. Loads models into executors on devices, keeps them alive, evicts.

A model is loaded on demand (a spawn on a model that is not loaded loads it) or explicitly
(``model_load``: device, instances, KV memory policy, keep-alive). Before loading, the
memory it will take is estimated from its files and reserved on its device; when the device
is short, idle models are unloaded least recently used first. Keep-alive: a model with no
live process unloads after ``keep_alive`` seconds (0: right after use; -1: pinned); every
request may override it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from llmos.drivers.devices import DeviceTable
from llmos.drivers.model.estimate import estimate
from llmos.drivers.model.protocol import BLOCK_SIZE
from llmos.drivers.model.registry import resolve_model
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor
from llmos.kernel.config import KernelConfig
from llmos.kernel.executor import Executor
from llmos.kernel.ray_backend import RayBackend, RaySpec
from llmos.syscalls.errors import Busy, InvalidArgument, NotFound, OutOfMemory

DEFAULT_KEEP_ALIVE_S = 300.0
POLICIES = ("static", "dynamic", "isolated")
# A crashed worker is restarted (its processes resume on the new one) at most this often, then the model is unloaded
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0
# With no max_batch, the KV pool holds this many full contexts and the batch is whatever fits it (and the
# engine's per-step token budget): short contexts make a wide batch, long ones a narrow one.
POOL_CONTEXTS = 16


@dataclass
class ModelEntry:
    path: str
    device: str
    options: dict[str, Any]
    estimate: dict[str, Any]
    keep_alive: float
    executors: list[Executor] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    pending: int = 0  # spawns that acquired this model and have not reached the process table yet
    loaded_at: float = field(default_factory=time.time)
    restarts: list[float] = field(default_factory=list)  # monotonic times of recent worker restarts
    ray: RaySpec | None = None  # backend "ray": how its instances are placed
    pg: Any = None  # backend "ray": its placement group (one bundle per instance)

    def describe(self) -> dict[str, Any]:
        return {"model": self.path, "device": self.device, "instances": len(self.executors),
                "backend": "ray" if self.ray else "local", **({"ray": self.ray.describe()} if self.ray else {}),
                "keep_alive": self.keep_alive, "idle_s": round(time.monotonic() - self.last_used, 3),
                "kv_policy": self.options.get("kv_policy", "static"), "estimate": self.estimate,
                "executors": [ex.describe() for ex in self.executors]}


class ModelManager(Actor):
    def __init__(self, ctx: zmq.asyncio.Context, run_dir: Path, log_dir: Path, procman: Actor,
                 devices: DeviceTable, config: KernelConfig | None = None, ray: RayBackend | None = None) -> None:
        super().__init__("models")
        self.ray = ray  # the kernel's Ray connection (--ray), else None
        self.config = config or KernelConfig()
        self.ctx = ctx
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.procman = procman
        self.devices = devices
        self.defaults = {"max_batch": self.config.max_batch, "kv_policy": self.config.kv_policy,
                         "dtype": self.config.dtype, "prefix_cache": self.config.prefix_cache == "on"}
        self.models: dict[str, ModelEntry] = {}
        self._live: dict[str, int] = {}  # executor id -> live processes, refreshed from the procman
        self._ticker: asyncio.Task | None = None

    def start(self) -> "ModelManager":
        super().start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                self.tell(m.Tick())
            except Exception:
                return

    async def receive(self, msg: Any) -> Any:
        match msg:
            case m.Acquire():
                return await self._acquire(msg.model, msg.keep_alive)
            case m.Release():
                if msg.token.pending > 0:
                    msg.token.pending -= 1
                return None
            case m.Load():
                path = resolve_model(msg.model)
                self._options(path, msg.options)  # refuse bad options even when the model is loaded
                entry = self.models.get(path)
                if entry is not None:
                    self._check_same(entry, msg.options)
                    if msg.options.get("keep_alive") is not None:
                        entry.keep_alive = float(msg.options["keep_alive"])
                entry = await self._load(path, msg.options)
                return [ex.ready for ex in entry.executors]
            case m.Unload():
                return await self._unload_request(msg.model, msg.force)
            case m.Describe():
                return self._describe(msg.model)
            case m.ListModels():
                return [e.describe() for e in self.models.values()]
            case m.Devices():
                local = [{**inv, **use} for inv, use in zip(self.devices.inventory(), self.devices.usage())]
                return {"devices": local + (await self._ray_nodes() if self.ray else [])}
            case m.Tick():
                return await self._reap_idle()
            case m.ExecutorGone():
                return await self._executor_gone(msg.executor)
            case m.StopAll():
                for path in list(self.models):
                    await self._unload(path)
                return None
        raise TypeError(f"models cannot handle {type(msg).__name__}")

    # -- loading ---------------------------------------------------------------------------
    async def _acquire(self, model: str | None,
                       keep_alive: float | None) -> tuple[str, list[asyncio.Future], ModelEntry]:
        """(model path, futures of its ready executors, a token for Release); loads the model when needed."""
        path = resolve_model(model)
        entry = self.models.get(path)
        if entry is None:
            entry = await self._load(path, {})
        entry.last_used = time.monotonic()
        entry.pending += 1  # not evictable until the spawn tells Release
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        return path, [ex.ready for ex in entry.executors], entry

    # load options a loaded model cannot change without a reload, as (request key, user-facing name)
    _FIXED = (("backend", "backend"), ("num_cpus", "num_cpus"), ("num_gpus", "num_gpus"), ("placement", "placement"),
              ("device", "device"), ("instances", "instances"), ("kv_policy", "kv_policy"),
              ("num_blocks", "kv_blocks"), ("max_blocks", "kv_max_blocks"), ("user_cap_blocks", "user_cap_blocks"),
              ("max_batch", "max_batch"), ("engine", "engine"), ("spill_bytes", "spill_bytes"),
              ("spill_below_bytes", "spill_below_bytes"), ("dtype", "dtype"), ("prefix_cache", "prefix_cache"))

    def _check_same(self, entry: ModelEntry, req: dict[str, Any]) -> None:
        """EBUSY naming each option asked for that differs from how the model is loaded, and what to do."""
        engines = {ex.info.get("engine") for ex in entry.executors} - {None}  # what "auto" chose, once ready
        dtypes = {ex.info.get("dtype") for ex in entry.executors} - {None}
        device = ("cuda" if entry.ray.num_gpus else "cpu") if entry.ray else entry.device
        have = {"device": device, "instances": len(entry.executors), "backend": "ray" if entry.ray else "local",
                **(entry.ray.describe() if entry.ray else {}),
                "kv_policy": entry.options.get("kv_policy", "static"),
                "engine": engines.pop() if len(engines) == 1 else entry.options.get("engine", "auto"),
                "dtype": dtypes.pop() if len(dtypes) == 1 else entry.options.get("dtype", "auto"),
                "prefix_cache": entry.options.get("prefix_cache", True)}
        differ = []
        for key, name in self._FIXED:
            asked = req.get(key)
            if asked is None or (key in ("device", "engine", "backend", "dtype") and asked == "auto"):
                continue
            loaded = have[key] if key in have else entry.options.get(key)
            if asked != loaded:
                if key in ("num_blocks", "max_blocks"):  # the request counts one block more than the user asked
                    asked, loaded = asked - 1, None if loaded is None else loaded - 1
                differ.append(f"{name} (asked {asked}, loaded {'default' if loaded is None else loaded})")
        if differ:
            name = entry.path
            raise Busy(f"model {name} is already loaded with other options: {'; '.join(differ)}. To load it "
                       f"with these, run `llmos unload {name}` (model_unload) and load it again; or load it "
                       f"without them to use it as it is")

    def _options(self, path: str, req: dict[str, Any]) -> tuple[dict[str, Any], str, int, float]:
        opts = {**self.defaults, **{k: v for k, v in req.items() if v is not None}}
        device = opts.pop("device", None) or "auto"
        backend = self._backend(opts, device)
        if device != "auto" and backend == "local":
            self.devices.get(device)  # EINVAL for a device that does not exist
        elif device not in ("auto", "cpu", "cuda") and backend == "ray":
            raise InvalidArgument(f"device {device!r} names a device of this machine; a Ray instance is placed by "
                                  f"Ray: give num_gpus=1 for a GPU (device cpu, cuda or auto)")
        instances = int(opts.pop("instances", 1))
        keep_alive = float(opts.pop("keep_alive", DEFAULT_KEEP_ALIVE_S))
        if opts.get("kv_policy", "static") not in POLICIES:
            raise InvalidArgument(f"kv_policy must be one of {', '.join(POLICIES)}")
        return opts, device, instances, keep_alive

    def _backend(self, opts: dict[str, Any], device: str) -> str:
        """Pop the backend options from ``opts`` (they are not the engine's): "local" or "ray", the Ray ones
        checked and kept under ``opts["_ray"]`` (a RaySpec) for the ray backend."""
        backend = opts.pop("backend", None) or "local"
        ray_keys = {k: v for k in ("num_cpus", "num_gpus", "placement") if (v := opts.pop(k, None)) is not None}
        if backend == "auto":
            backend = "ray" if self.ray is not None else "local"
        if backend == "ray" and self.ray is None:
            raise InvalidArgument("backend 'ray' needs a kernel started with --ray (llmos kernel start --ray [ADDRESS])")
        if backend == "local":
            if ray_keys:
                raise InvalidArgument(f"{', '.join(ray_keys)} place Ray instances: give backend='ray' too")
            return backend
        spec = RaySpec(**ray_keys)
        if device == "cuda" and "num_gpus" not in ray_keys:
            spec.num_gpus = 1.0  # a GPU asked for by device: one GPU per instance
        if (spec.num_gpus and device == "cpu") or (not spec.num_gpus and device == "cuda"):
            raise InvalidArgument(f"device {device} with num_gpus {spec.num_gpus:g}: give one or the other")
        opts["_ray"] = spec
        return backend

    async def _load(self, path: str, req: dict[str, Any]) -> ModelEntry:
        if path in self.models:
            return self.models[path]
        opts, want, instances, keep_alive = self._options(path, req)
        spec = opts.pop("_ray", None)
        if spec is not None:
            return await self._load_ray(path, opts, spec, instances, keep_alive)
        await self._refresh_live()
        est = self._estimate(path, want, opts)
        if not opts.get("num_blocks"):
            opts["num_blocks"] = est["kv_tokens"] // int(opts.get("block_size", BLOCK_SIZE)) + 1
        need = est["total_bytes"]
        devices = []
        entry = ModelEntry(path, "cpu", opts, est, keep_alive)
        try:
            for _ in range(instances):
                dev = self._place(need, want)
                dev.allocate(f"{path}#{len(devices)}", need)
                devices.append(dev)
            entry.device = devices[0].name
            for i, dev in enumerate(devices):
                ex = Executor(self.ctx, self.run_dir, path, self.procman, self._gone, self.log_dir, opts, dev.name,
                              silence_s=self.config.worker_silence_s)
                ex.holder = f"{path}#{i}"
                entry.executors.append(ex.launch())
        except BaseException:  # nothing half-loaded stays reserved or running
            for i in range(len(devices)):
                self.devices.free(f"{path}#{i}")
            for ex in entry.executors:
                await _retire(ex, "load failed")
                await ex.stop()
            raise
        self.models[path] = entry
        self.log.info("model_loading", model=path, device=entry.device, instances=instances,
                      estimate_mib=round(need / 2**20), keep_alive=keep_alive)
        return entry

    async def _load_ray(self, path: str, opts: dict[str, Any], spec: RaySpec, instances: int,
                        keep_alive: float) -> ModelEntry:
        """Place ``instances`` Ray actors for ``path`` (one placement group, a bundle each) and start them; does
        not wait for Ray to place them (an executor whose actor is not placed in time fails its load)."""
        from llmos.kernel.ray_executor import RayExecutor

        nodes = await self._ray_nodes()
        kind = "gpu" if spec.num_gpus else "cpu"
        free = max((n["memory_free_bytes"] for n in nodes), default=0)
        # "auto" resolves on the node the actor lands on, whose CPU this kernel does not know: size for float32
        sized = {**opts, "dtype": "float32"} if kind == "cpu" and opts.get("dtype") in (None, "auto") else opts
        est = self._estimate(path, "cuda" if kind == "gpu" else "cpu", sized, free=free or None)
        if not opts.get("num_blocks"):
            opts["num_blocks"] = est["kv_tokens"] // int(opts.get("block_size", BLOCK_SIZE)) + 1
        # host memory: the whole instance on a CPU; its process on a GPU node (the weights and KV are the GPU's)
        spec.memory_bytes = int(est["total_bytes"] if kind == "cpu" else est["overhead_bytes"])
        self.ray.check_fits(spec, nodes)
        pg = await self.ray.call(self.ray.placement_group, spec, instances, f"llmos:{path}")
        entry = ModelEntry(path, "ray", opts, est, keep_alive, ray=spec, pg=pg)
        try:
            for i in range(instances):
                ex = RayExecutor(self.ctx, self.run_dir, path, self.procman, self._gone, self.log_dir, opts,
                                 silence_s=self.config.worker_silence_s, ray=self.ray, pg=pg, bundle=i, spec=spec,
                                 placement_s=self.config.ray_placement_s)
                ex.holder = f"{path}#{i}"
                entry.executors.append(ex.launch())
        except BaseException:
            await self._release(entry, "load failed")
            raise
        self.models[path] = entry
        self.log.info("model_loading", model=path, backend="ray", instances=instances,
                      estimate_mib=round(est["total_bytes"] / 2**20), keep_alive=keep_alive, **spec.describe())
        return entry

    async def _ray_nodes(self) -> list[dict[str, Any]]:
        """The Ray cluster's live nodes as device entries, each with the instances placed on it."""
        nodes = await self.ray.call(self.ray.nodes)  # bounded: a head that stopped answering is EIO
        by_id = {n["node_id"]: n for n in nodes}
        for entry in self.models.values():
            for ex in entry.executors:
                node = by_id.get(getattr(ex, "where", {}).get("node_id"))
                if node is not None:
                    node.setdefault("holders", {})[ex.holder] = entry.ray.memory_bytes if entry.ray else 0
        return nodes

    async def _release(self, entry: ModelEntry, reason: str) -> None:
        """Retire and stop an entry's executors; free what it reserved (local devices, its placement group)."""
        for ex in entry.executors:
            self.devices.free(ex.holder)
            await _retire(ex, reason)
        await asyncio.gather(*(ex.stop() for ex in entry.executors), return_exceptions=True)
        await self._remove_pg(entry)

    async def _remove_pg(self, entry: ModelEntry) -> None:
        if entry.pg is not None:
            try:
                await self.ray.call(self.ray.remove, entry.pg)
            except Exception as exc:  # Ray is gone: its placement groups with it
                self.log.error("ray_remove_failed", model=entry.path, error=getattr(exc, "message", repr(exc)))

    def _estimate(self, path: str, want: str, opts: dict[str, Any], free: int | None = None) -> dict[str, Any]:
        """What an instance of ``path`` will take, with the KV pool the options (or the defaults) give it
        (``free``: the memory the pool's default size is bounded by; default: the most any local device has)."""
        kind = "gpu" if want.startswith("cuda") or (want == "auto" and self.devices.gpus) else "cpu"
        if opts.get("num_blocks"):
            kv_tokens = int(opts["num_blocks"]) * int(opts.get("block_size", BLOCK_SIZE))
        else:
            # a full batch of full contexts, but never more than half of the memory left after the weights
            bare = estimate(path, kind, 0, dtype=opts.get("dtype"))
            if free is None:
                free = max(d.res.budget - d.res.reserved for d in [self.devices.cpu, *self.devices.gpus])
            room = (free - bare["weight_bytes"] - bare["overhead_bytes"]) // 2 // max(1, bare["kv_bytes_per_token"])
            contexts = int(opts.get("max_batch") or POOL_CONTEXTS)
            kv_tokens = max(bare["context_len"], min(contexts * bare["context_len"], room))
        return estimate(path, kind, kv_tokens, int(opts.get("max_batch") or POOL_CONTEXTS), opts.get("dtype"))

    def _place(self, need: int, want: str):
        try:
            return self.devices.place(need, want)
        except OutOfMemory:
            pass
        # evict idle models, least recently used first, until the new one fits
        while True:
            victim = self._lru_idle(None if want == "auto" else self.devices.get(want).name)
            if victim is None:
                raise OutOfMemory(f"no device can hold {need / 2**20:.0f} MiB more, and no idle model can be "
                                  f"unloaded; loaded: {', '.join(self.models) or 'none'}")
            self._evict_now(victim)
            try:
                return self.devices.place(need, want)
            except OutOfMemory:
                continue

    def _lru_idle(self, device: str | None = None) -> ModelEntry | None:
        """The least recently used model that may be evicted (on ``device``, when one is asked for)."""
        idle = [e for e in self.models.values() if e.keep_alive >= 0 and not self._busy(e) and e.ray is None
                and (device is None or e.device == device)]
        return min(idle, key=lambda e: e.last_used, default=None)

    def _busy(self, entry: ModelEntry) -> bool:
        return entry.pending > 0 or any(self._live.get(ex.id, 0) > 0 for ex in entry.executors) or any(
            not ex.ready.done() for ex in entry.executors)

    def _evict_now(self, entry: ModelEntry) -> None:
        self.log.info("model_evicted", model=entry.path, idle_s=round(time.monotonic() - entry.last_used, 1))
        self.models.pop(entry.path, None)
        for ex in entry.executors:
            self.devices.free(ex.holder)
            asyncio.get_running_loop().create_task(_retire(ex, "model evicted", stop=True))

    # -- unloading -------------------------------------------------------------------------
    async def _refresh_live(self) -> None:
        self._live = await self.procman.ask(m.Live())

    async def _unload_request(self, model: str | None, force: bool) -> dict[str, Any]:
        path = resolve_model(model)
        entry = self.models.get(path)
        if entry is None:
            raise NotFound(f"model {path} is not loaded")
        await self._refresh_live()
        # an instance still loading (or waiting for Ray to place it again) does not hold the model: its waiters learn
        live = entry.pending > 0 or any(self._live.get(ex.id, 0) > 0 for ex in entry.executors)
        if live and not force:
            raise Busy(f"model {path} has live processes; unload with force to end them")
        await self._unload(path)
        return {"model": path, "unloaded": True}

    async def _unload(self, path: str, why: str | None = None) -> None:
        entry = self.models.pop(path, None)
        if entry is None:
            return
        self.log.info("model_unloaded", model=path, **({"reason": why} if why else {}))
        reason = f"model {path} was unloaded" + (f": {why}" if why else "")
        for ex in entry.executors:
            self.devices.free(ex.holder)
            # first: the procman stops scheduling onto it and ends its processes
            await _retire(ex, reason)
        # processes waiting for a restarted instance of it wait no more
        self.procman.tell(m.ModelGone(path, reason))
        await asyncio.gather(*(ex.stop() for ex in entry.executors), return_exceptions=True)
        await self._remove_pg(entry)  # Ray frees the bundles' CPUs, GPUs and memory for other placements

    async def _reap_idle(self) -> None:
        if not self.models:
            return
        await self._refresh_live()
        now = time.monotonic()
        for entry in list(self.models.values()):
            if self._busy(entry):
                entry.last_used = now
            elif entry.keep_alive >= 0 and now - entry.last_used >= entry.keep_alive:
                self.log.info("model_keep_alive_expired", model=entry.path, keep_alive=entry.keep_alive)
                await self._unload(entry.path)

    async def _executor_gone(self, ex: Executor) -> None:
        entry = self.models.get(ex.model_path)
        if entry is None or ex not in entry.executors:
            return
        now = time.monotonic()
        entry.restarts = [t for t in entry.restarts if now - t < RESTART_WINDOW_S]
        # a worker that crashed after loading (or a restarted one) is replaced on the same device, and its
        # processes resume there; a first load that fails, or too many crashes, unloads the model
        # a Ray instance that could not be placed again (its node died, the rest are full) while others of the model
        # serve is a bundle still waiting: try again, without counting it, instead of unloading the survivors
        waiting_bundle = entry.ray is not None and not ex.info and any(
            o is not ex and o.ready.done() and not o.dead for o in entry.executors)
        if waiting_bundle or ((ex.info or entry.restarts) and len(entry.restarts) < MAX_RESTARTS):
            if not waiting_bundle:
                entry.restarts.append(now)
            new = self._replacement(entry, ex)
            new.holder = ex.holder
            try:
                entry.executors[entry.executors.index(ex)] = new.launch()
            except Exception as exc:  # Ray refused the actor: nothing of the model can come back
                self.log.error("worker_restart_failed", model=entry.path, error=repr(exc))
                await ex.stop()
                await self._unload(entry.path, f"its instance could not be started again: {exc!r}")
                return
            self.log.warning("worker_restarting", model=entry.path, dead=ex.id, new=new.id,
                             restarts=len(entry.restarts), reason=ex.dead)
            asyncio.get_running_loop().create_task(ex.stop())
            return
        await self._unload(ex.model_path, f"its worker failed {len(entry.restarts) + 1} times in "
                                          f"{RESTART_WINDOW_S:.0f} s: {ex.dead}" if entry.restarts else ex.dead)

    def _replacement(self, entry: ModelEntry, ex: Executor) -> Executor:
        """A new executor in a dead one's place: on the same device, or in the same bundle of the model's placement
        group (Ray places the bundle again on another node when its node died)."""
        if entry.ray is not None:
            from llmos.kernel.ray_executor import RayExecutor

            return RayExecutor(self.ctx, self.run_dir, entry.path, self.procman, self._gone, self.log_dir,
                               entry.options, silence_s=self.config.worker_silence_s, ray=self.ray, pg=entry.pg,
                               bundle=ex.bundle, spec=entry.ray, placement_s=self.config.ray_placement_s)
        return Executor(self.ctx, self.run_dir, entry.path, self.procman, self._gone, self.log_dir, entry.options,
                        ex.device, silence_s=self.config.worker_silence_s)

    def _gone(self, ex: Executor) -> None:
        try:
            self.tell(m.ExecutorGone(ex))
        except Exception:
            pass  # the manager itself is stopping

    def _describe(self, model: str | None) -> dict[str, Any]:
        path = resolve_model(model)
        entry = self.models.get(path)
        if entry is not None:
            return {**entry.describe(), "loaded": True}
        opts, want, _, _ = self._options(path, {})
        return {"model": path, "loaded": False, "estimate": self._estimate(path, want, opts)}

    async def on_stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        for path in list(self.models):
            await self._unload(path)


async def _retire(ex: Executor, reason: str, stop: bool = False) -> None:
    """Tell an executor it is going away (it tells the procman, which ends its processes); then stop it."""
    try:
        await ex.ask(m.Retire(reason))
    except Exception:  # already stopped
        pass
    if stop:
        await ex.stop()
