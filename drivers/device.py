"""The device interface every driver implements: inventory, allocate, free, usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from llmos.syscalls.errors import OutOfMemory


class Device(Protocol):
    """A resource the kernel hands out in bytes (memory) to named holders (model instances)."""

    name: str

    def inventory(self) -> dict[str, Any]:
        """What the device is: kind, capacity, identity."""

    def allocate(self, holder: str, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``holder``; OutOfMemory when it does not fit."""

    def free(self, holder: str) -> int:
        """Release everything ``holder`` reserved; returns the bytes released."""

    def usage(self) -> dict[str, Any]:
        """Capacity, reserved and free bytes, and the reservation of each holder."""


@dataclass
class Reservations:
    """Byte reservations against a budget; the bookkeeping shared by the cpu and gpu drivers."""

    name: str
    budget: int
    held: dict[str, int] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        return sum(self.held.values())

    def fits(self, nbytes: int) -> bool:
        return self.reserved + nbytes <= self.budget

    def allocate(self, holder: str, nbytes: int) -> None:
        if not self.fits(nbytes):
            raise OutOfMemory(f"{self.name}: {nbytes / 2**20:.0f} MiB requested, "
                              f"{(self.budget - self.reserved) / 2**20:.0f} MiB of {self.budget / 2**20:.0f} MiB free")
        self.held[holder] = self.held.get(holder, 0) + nbytes

    def free(self, holder: str) -> int:
        return self.held.pop(holder, 0)

    def usage(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "reserved_bytes": self.reserved,
                "free_bytes": self.budget - self.reserved, "holders": dict(self.held)}


class BudgetedDevice:
    """allocate/free/fits for a device whose memory is a Reservations budget (``self.res``)."""

    res: Reservations

    def allocate(self, holder: str, nbytes: int) -> None:
        self.res.allocate(holder, nbytes)

    def free(self, holder: str) -> int:
        return self.res.free(holder)

    def fits(self, nbytes: int) -> bool:
        return self.res.fits(nbytes)
