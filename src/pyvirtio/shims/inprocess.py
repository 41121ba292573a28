"""The in-process shim: a device on virtio-mmio, with guest memory in this process.

It is the smallest hypervisor there is: it owns the guest memory, forwards register accesses to
the transport, and turns interrupts into events a driver in the same process can wait on. Queue
notifications are processed either right away in the caller's thread (``threaded=False``,
deterministic, for tests and fuzzing) or by one worker thread per queue (``threaded=True``, the
way the vhost-user and Xen shims run, for benchmarks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from pyvirtio.device import VirtioDevice
from pyvirtio.driver.mmio import MmioDriver
from pyvirtio.driver.virtqueue import GuestAllocator
from pyvirtio.memory.guest import GuestMemory, MemoryRegion
from pyvirtio.shims.worker import QueueWorker
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
    ) -> None:
        layout = regions or [(GUEST_RAM_BASE, memory_size)]
        self.memory = GuestMemory(MemoryRegion.anonymous(gpa, size) for gpa, size in layout)
        self.device = device
        device.memory = self.memory
        self._workers: list[QueueWorker] = []
        self._kick_fds: list[int] = []
        notify = None
        if threaded:
            self._kick_fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in device.queues]
            self._workers = [QueueWorker(device, i, fd) for i, fd in enumerate(self._kick_fds)]
            for worker in self._workers:
                worker.start()
            notify = self._kick
        self._irq_event = threading.Event()
        self.interrupts = 0
        self.transport = MmioTransport(
            device, legacy=legacy, interrupt=self._interrupt, notify=notify
        )
        self.threaded = threaded
        # The driver allocates from the first region, like a guest kernel from its RAM.
        gpa, size = layout[0]
        self.allocator = GuestAllocator(gpa, size)

    def _kick(self, index: int) -> None:
        os.eventfd_write(self._kick_fds[index], 1)

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
        for worker in self._workers:
            worker.stop()
        for fd in self._kick_fds:
            os.close(fd)
        self._workers, self._kick_fds = [], []
        self.device.reset()

    def __enter__(self) -> InProcessMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
