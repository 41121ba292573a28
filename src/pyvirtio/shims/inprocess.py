"""The in-process shim: a device on virtio-mmio, with guest memory in this process.

It is the smallest hypervisor there is: it owns the guest memory, forwards register accesses to
the transport, and turns interrupts into events a driver in the same process can wait on. Queue
notifications are processed either right away in the caller's thread (``threaded=False``,
deterministic, for tests and fuzzing) or by a :class:`~pyvirtio.runner.QueueRunner` with a
worker thread per queue (``threaded=True``, the way the vhost-user and Xen shims run, for
benchmarks and for tests of what threads do).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from pyvirtio.device import VirtioDevice
from pyvirtio.driver.mmio import MmioDriver
from pyvirtio.driver.virtqueue import GuestAllocator
from pyvirtio.memory.guest import GuestMemory, MemoryRegion
from pyvirtio.runner import QueueRunner
from pyvirtio.transport.mmio import MmioTransport

#: Where guest RAM starts, as on Arm's virt machine and Xen's GUEST_RAM0_BASE.
GUEST_RAM_BASE = 0x4000_0000


class InProcessMachine:
    """A device, its virtio-mmio transport and guest memory, with a driver-side bus."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        memory_size: int = 64 << 20,
        regions: Sequence[tuple[int, int]] | None = None,
        legacy: bool = False,
        threaded: bool = False,
        memory: GuestMemory | None = None,
    ) -> None:
        """``memory`` is what the device sees, if not the machine's RAM itself (a test's
        stand-in for Xen's mappings of the same RAM, made from :attr:`ram_fds`)."""
        layout = regions or [(GUEST_RAM_BASE, memory_size)]
        made = [MemoryRegion.memfd(gpa, size) for gpa, size in layout]
        self.memory = GuestMemory(region for region, _ in made)
        #: The memfd of each RAM region, in ``regions`` order.
        self.ram_fds = [fd for _, fd in made]
        self.device = device
        device.set_memory(memory if memory is not None else self.memory)
        self.runner = QueueRunner(device, own_kick_eventfds=True) if threaded else None
        self._irq_event = threading.Event()
        self.interrupts = 0
        self.transport = MmioTransport(
            device,
            legacy=legacy,
            interrupt=self._interrupt,
            notify=self.runner.notify if self.runner is not None else None,
            host=self.runner,
        )
        self.threaded = threaded
        # The driver allocates from the first region, like a guest kernel from its RAM.
        gpa, size = layout[0]
        self.allocator = GuestAllocator(gpa, size)

    def _interrupt(self, level: bool) -> None:
        if level:
            self.interrupts += 1
            self._irq_event.set()

    def wait_interrupt(self, timeout: float) -> bool:
        """Block until an interrupt arrives (or ``timeout``); consumes the wake-up."""
        fired = self._irq_event.wait(timeout)
        self._irq_event.clear()
        return fired

    # RegisterBus for the driver.
    def read(self, offset: int, size: int) -> int:
        return self.transport.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.transport.write(offset, size, value)

    def driver(self) -> MmioDriver:
        return MmioDriver(self, self.memory, self.allocator)

    def close(self) -> None:
        self.device.reset()
        if self.runner is not None:
            self.runner.close()
        self.device.set_memory(None)
        self.device.close()
        for fd in self.ram_fds:
            os.close(fd)
        self.ram_fds = []

    def __enter__(self) -> InProcessMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
