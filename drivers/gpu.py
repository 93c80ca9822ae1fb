"""The gpu driver: NVIDIA devices through NVML (nvidia-ml-py) and torch.cuda. No GPU means an empty list.

NVML gives what the hardware reports (memory, utilisation, name); torch.cuda confirms the
device is usable from this process. Each GPU is a device of its own with a memory budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.drivers.device import BudgetedDevice, Reservations


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        return None


class GPUDevice(BudgetedDevice):
    def __init__(self, index: int, name: str, total_bytes: int, budget_fraction: float = 0.9) -> None:
        self.index = index
        self.name = f"cuda:{index}"
        self.model_name = name
        self.total_bytes = total_bytes
        self.res = Reservations(self.name, int(total_bytes * budget_fraction))

    def inventory(self) -> dict[str, Any]:
        return {"kind": "gpu", "name": self.name, "index": self.index, "model": self.model_name,
                "memory_total_bytes": self.total_bytes}

    def usage(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, **self.res.usage()}
        nv = _nvml()
        if nv is not None:
            try:
                h = nv.nvmlDeviceGetHandleByIndex(self.index)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                out.update({"memory_used_bytes": int(mem.used), "memory_free_bytes": int(mem.free),
                            "utilization_pct": int(util.gpu)})
            except Exception:
                pass
        return out


def _gpu_driver_present() -> bool:
    """An NVIDIA or AMD GPU driver is loaded: only then can torch.cuda find a device NVML did not."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd"))


def discover() -> list[GPUDevice]:
    """Every NVIDIA GPU NVML reports (falling back to torch.cuda); [] when there is none."""
    nv = _nvml()
    gpus: list[GPUDevice] = []
    if nv is not None:
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                gpus.append(GPUDevice(i, name.decode() if isinstance(name, bytes) else str(name),
                                      int(nv.nvmlDeviceGetMemoryInfo(h).total)))
        except Exception:
            gpus = []
    if not gpus and _gpu_driver_present():
        try:
            import torch  # slow to import: only where a GPU driver exists (ROCm has no NVML)

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    gpus.append(GPUDevice(i, p.name, int(p.total_memory)))
        except Exception:
            pass
    return gpus
