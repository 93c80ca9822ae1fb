"""The cpu driver: cores, load and host RAM from psutil; host memory reservations for model instances."""

from __future__ import annotations

import os
from typing import Any

import psutil

from llmos.drivers.device import BudgetedDevice, Reservations


class CPUDevice(BudgetedDevice):
    """Host CPU and RAM. Model instances on the CPU reserve RAM against ``budget_bytes``."""

    name = "cpu"

    def __init__(self, budget_bytes: int | None = None) -> None:
        vm = psutil.virtual_memory()
        # default budget: what is available now, less a quarter kept for everything else
        self.res = Reservations("cpu", budget_bytes if budget_bytes is not None else int(vm.available * 0.75))

    def inventory(self) -> dict[str, Any]:
        freq = psutil.cpu_freq()
        return {
            "kind": "cpu",
            "name": "cpu",
            "cores_logical": psutil.cpu_count(logical=True),
            "cores_physical": psutil.cpu_count(logical=False),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "freq_mhz": round(freq.current) if freq else None,
            "memory_total_bytes": psutil.virtual_memory().total,
        }

    def usage(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
        return {"name": "cpu", "utilization_pct": psutil.cpu_percent(interval=None), "load_avg": list(load),
                "memory_total_bytes": vm.total, "memory_available_bytes": vm.available, **self.res.usage()}
