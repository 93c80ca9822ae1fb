"""Resource use during a ``llmos bench`` load point: CPU and memory (RSS) of the kernel and its model workers
(psutil), and GPU utilisation and memory (NVML, when an NVIDIA GPU and its driver are there), sampled by a
thread every ``interval`` seconds; each reported as mean and peak over the samples."""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil

NA = "n/a"


def _stats(values: list[float]) -> dict[str, float] | str:
    return {"mean": sum(values) / len(values), "peak": max(values)} if values else NA


class Gpu:
    """The machine's NVIDIA GPUs through NVML (nvidia-ml-py's ``pynvml``); ``available`` is False where there
    is none (no driver, no device, the module missing), and ``sample`` then returns None."""

    def __init__(self, nvml: Any = None) -> None:
        self.handles: list[Any] = []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...: no GPU to sample
            self.handles = []
        self.nvml = nvml

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def sample(self) -> tuple[float, float] | None:
        """(utilisation %, mean over the GPUs; memory used, MiB, summed over them), or None without a GPU."""
        if not self.handles:
            return None
        util = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
        used = [self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
        return sum(util) / len(util), sum(used) / 2**20

    def close(self) -> None:
        if self.handles:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


class Sampler:
    """Samples ``pids`` (the kernel and its workers; None: not on this machine, only the GPU is sampled)
    every ``interval`` seconds from ``start()`` to ``stop()``, which returns the summary:

    {cpu_percent: {mean, peak} (100 = one core, summed over the processes), rss_mib: {mean, peak} (summed),
    gpu_util_percent, gpu_memory_mib: {mean, peak}, samples, cores, load_avg_1m (this machine's, at the end)}
    where a value that cannot be measured here is "n/a". A process that ends meanwhile (a worker restarted) just
    stops counting. GPU figures are the whole devices' (other programs' use included)."""

    def __init__(self, pids: list[int] | None, interval: float = 0.5, gpu: Gpu | None = None) -> None:
        self.interval = interval
        self.procs = [p for p in (_process(pid) for pid in pids or []) if p is not None]
        self.local = pids is not None
        self.gpu = gpu if gpu is not None else Gpu()
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.gpu_util: list[float] = []
        self.gpu_mem: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def start(self) -> "Sampler":
        for p in self.procs:
            _safe(p.cpu_percent)  # the first call only starts psutil's interval
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        if self.procs:
            cpu = [_safe(p.cpu_percent) for p in self.procs]
            rss = [_safe(lambda p=p: p.memory_info().rss) for p in self.procs]
            if any(x is not None for x in rss):
                self.cpu.append(sum(x for x in cpu if x is not None))
                self.rss.append(sum(x for x in rss if x is not None) / 2**20)
        g = self.gpu.sample()
        if g is not None:
            self.gpu_util.append(g[0])
            self.gpu_mem.append(g[1])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if not self.cpu:  # a point shorter than one interval still gets one sample
            self.sample()
        self.gpu.close()
        return {"cpu_percent": _stats(self.cpu), "rss_mib": _stats(self.rss),
                "gpu_util_percent": _stats(self.gpu_util), "gpu_memory_mib": _stats(self.gpu_mem),
                "samples": max(len(self.cpu), len(self.gpu_util)), "cores": psutil.cpu_count(),
                # other work on this machine competes for its cores: a busy one shows here
                "load_avg_1m": os.getloadavg()[0],
                "processes": len(self.procs) if self.local else NA}


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
