"""The device table: every device the kernel can hand out, and where a model instance should go."""

from __future__ import annotations

from typing import Any

from llmos.drivers.cpu import CPUDevice
from llmos.drivers.gpu import GPUDevice, discover
from llmos.syscalls.errors import InvalidArgument, OutOfMemory


class DeviceTable:
    def __init__(self, cpu_budget_bytes: int | None = None, gpus: list[GPUDevice] | None = None) -> None:
        self.cpu = CPUDevice(cpu_budget_bytes)
        self.gpus = discover() if gpus is None else gpus

    def get(self, name: str) -> CPUDevice | GPUDevice:
        if name == "cpu":
            return self.cpu
        for g in self.gpus:
            if g.name == name or (name == "cuda" and g.index == 0):
                return g
        raise InvalidArgument(f"no device {name!r}; devices: {', '.join(['cpu'] + [g.name for g in self.gpus])}")

    def place(self, nbytes: int, want: str | None = None) -> CPUDevice | GPUDevice:
        """The device for a model instance: the one asked for, else one GPU that fits
        (the one with the most free budget), else the CPU."""
        if want and want != "auto":
            dev = self.get(want)
            if not dev.fits(nbytes):
                raise OutOfMemory(f"{dev.name} cannot hold {nbytes / 2**20:.0f} MiB more")
            return dev
        fitting = [g for g in self.gpus if g.fits(nbytes)]
        if fitting:
            return max(fitting, key=lambda g: g.res.budget - g.res.reserved)
        if not self.cpu.fits(nbytes):
            raise OutOfMemory(f"no device can hold {nbytes / 2**20:.0f} MiB: cpu has "
                              f"{(self.cpu.res.budget - self.cpu.res.reserved) / 2**20:.0f} MiB free"
                              + "".join(f", {g.name} {(g.res.budget - g.res.reserved) / 2**20:.0f} MiB"
                                        for g in self.gpus))
        return self.cpu

    def inventory(self) -> list[dict[str, Any]]:
        return [self.cpu.inventory()] + [g.inventory() for g in self.gpus]

    def usage(self) -> list[dict[str, Any]]:
        return [self.cpu.usage()] + [g.usage() for g in self.gpus]

    def free(self, holder: str) -> None:
        for dev in [self.cpu, *self.gpus]:
            dev.free(holder)
