"""A virtio-mmio driver, as Linux's virtio_mmio.c: probe, negotiate, set up queues, interrupts."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from pyvirtio.driver.virtqueue import DriverQueue, GuestAllocator
from pyvirtio.memory.guest import GuestMemory
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.spec.mmio import CONFIG_OFFSET, MAGIC_VALUE, VERSION_LEGACY, Reg
from pyvirtio.spec.status import DeviceStatus


class RegisterBus(Protocol):
    """Access to one virtio-mmio window (the transport, or anything that forwards to it)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class DriverError(Exception):
    """The device did not behave as a driver expects."""


class MmioDriver:
    """Drives one virtio-mmio device through its registers."""

    def __init__(self, bus: RegisterBus, memory: GuestMemory, allocator: GuestAllocator) -> None:
        self.bus = bus
        self.memory = memory
        self.allocator = allocator
        if bus.read(Reg.MAGIC_VALUE, 4) != MAGIC_VALUE:
            raise DriverError("no virtio-mmio magic value")
        self.version = bus.read(Reg.VERSION, 4)
        if self.version not in (1, 2):
            raise DriverError(f"unknown virtio-mmio version {self.version}")
        self.legacy = self.version == VERSION_LEGACY
        self.device_id = bus.read(Reg.DEVICE_ID, 4)
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.interrupts = 0
        self.interrupt_event = threading.Event()

    # -- status and features -------------------------------------------------------------------

    @property
    def status(self) -> int:
        return self.bus.read(Reg.STATUS, 4)

    def set_status(self, value: int) -> None:
        self.bus.write(Reg.STATUS, 4, value)

    def add_status(self, bits: int) -> None:
        self.set_status(self.status | bits)

    def reset(self) -> None:
        self.set_status(0)
        if self.status != 0:
            raise DriverError("device did not reset")
        self.queues = []

    def device_features(self) -> int:
        features = 0
        for sel in (0, 1):
            self.bus.write(Reg.DEVICE_FEATURES_SEL, 4, sel)
            features |= self.bus.read(Reg.DEVICE_FEATURES, 4) << (32 * sel)
        return features

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.bus.write(Reg.DRIVER_FEATURES_SEL, 4, sel)
            self.bus.write(Reg.DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, wanted: int) -> int:
        """§3.1.1 steps 1-6; returns the negotiated features."""
        self.reset()
        self.add_status(DeviceStatus.ACKNOWLEDGE)
        self.add_status(DeviceStatus.DRIVER)
        offered = self.device_features()
        if not self.legacy:
            wanted |= bit(Feature.VERSION_1)
        self.features = offered & wanted
        self.write_driver_features(self.features)
        if not self.legacy:
            self.add_status(DeviceStatus.FEATURES_OK)
            if not self.status & DeviceStatus.FEATURES_OK:
                self.add_status(DeviceStatus.FAILED)
                raise DriverError("device refused FEATURES_OK")
        return self.features

    def has(self, feature: int) -> bool:
        return has(self.features, feature)

    # -- queues --------------------------------------------------------------------------------

    def setup_queues(self, count: int, sizes: Sequence[int] | None = None) -> list[DriverQueue]:
        """§4.2.3.2 (modern) or §4.2.4 (legacy) virtqueue configuration."""
        if self.legacy:
            self.bus.write(Reg.GUEST_PAGE_SIZE, 4, 4096)
        for index in range(count):
            self.bus.write(Reg.QUEUE_SEL, 4, index)
            if not self.legacy and self.bus.read(Reg.QUEUE_READY, 4):
                raise DriverError(f"queue {index} is already live")
            max_size = self.bus.read(Reg.QUEUE_NUM_MAX, 4)
            if max_size == 0:
                raise DriverError(f"queue {index} is not available")
            size = sizes[index] if sizes else max_size
            if size > max_size:
                raise DriverError(f"queue {index}: size {size} > max {max_size}")
            queue = DriverQueue(
                self.memory,
                self.allocator,
                index,
                size,
                event_idx=self.has(Feature.RING_EVENT_IDX),
                indirect=self.has(Feature.RING_INDIRECT_DESC),
                legacy_align=4096 if self.legacy else None,
            )
            self.bus.write(Reg.QUEUE_NUM, 4, size)
            if self.legacy:
                self.bus.write(Reg.QUEUE_ALIGN, 4, 4096)
                self.bus.write(Reg.QUEUE_PFN, 4, queue.desc_addr // 4096)
            else:
                for low, addr in (
                    (Reg.QUEUE_DESC_LOW, queue.desc_addr),
                    (Reg.QUEUE_DRIVER_LOW, queue.avail_addr),
                    (Reg.QUEUE_DEVICE_LOW, queue.used_addr),
                ):
                    self.bus.write(low, 4, addr & 0xFFFFFFFF)
                    self.bus.write(low + 4, 4, addr >> 32)
                self.bus.write(Reg.QUEUE_READY, 4, 1)
            self.queues.append(queue)
        return self.queues

    def driver_ok(self) -> None:
        self.add_status(DeviceStatus.DRIVER_OK)

    def notify(self, index: int) -> None:
        self.bus.write(Reg.QUEUE_NOTIFY, 4, index)

    def kick(self, index: int) -> bool:
        """Notify the device if it asked for it; returns whether a notification was sent."""
        if self.queues[index].kick_prepare():
            self.notify(index)
            return True
        return False

    # -- config and interrupts -----------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        return self.bus.read(CONFIG_OFFSET + offset, size)

    def read_config_bytes(self, length: int) -> bytes:
        """The config space, read byte by byte inside a generation check (§4.2.3.1)."""
        while True:
            before = 0 if self.legacy else self.bus.read(Reg.CONFIG_GENERATION, 4)
            data = bytes(self.read_config(i, 1) for i in range(length))
            after = 0 if self.legacy else self.bus.read(Reg.CONFIG_GENERATION, 4)
            if before == after:
                return data

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.bus.write(CONFIG_OFFSET + offset, size, value)

    def on_interrupt(self, level: bool) -> None:
        """Interrupt line callback: count rising edges and wake waiters."""
        if level:
            self.interrupts += 1
            self.interrupt_event.set()

    def ack_interrupt(self) -> int:
        """Read and acknowledge InterruptStatus, as vm_interrupt() does; returns the bits."""
        status = self.bus.read(Reg.INTERRUPT_STATUS, 4)
        if status:
            self.bus.write(Reg.INTERRUPT_ACK, 4, status)
        return status
