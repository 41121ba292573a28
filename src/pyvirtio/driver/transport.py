"""What a device driver needs from the transport below it (virtio-mmio, or vhost-user)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pyvirtio.driver.virtqueue import DriverQueue, GuestAllocator
from pyvirtio.memory.guest import GuestMemory


class DriverTransport(Protocol):
    device_id: int
    features: int
    memory: GuestMemory
    allocator: GuestAllocator
    queues: list[DriverQueue]

    def negotiate(self, wanted: int) -> int:
        """Agree on features with the device; returns the negotiated set."""

    def has(self, feature: int) -> bool: ...

    def read_config_bytes(self, length: int) -> bytes: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def setup_queues(self, count: int, sizes: Sequence[int] | None = None) -> list[DriverQueue]:
        """Lay out ``count`` queues in guest memory and hand them to the device."""

    def driver_ok(self) -> None: ...

    def notify(self, index: int) -> None:
        """Notify the device of new buffers on queue ``index`` unconditionally."""

    def kick(self, index: int) -> bool:
        """Notify the device if it asked for it; returns whether it did."""
