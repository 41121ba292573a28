"""The virtio-mmio register file (VIRTIO 1.2 §4.2), modern (version 2) and legacy (version 1).

Sans-I/O: a shim hands in each guest access as ``read(offset, size)`` or
``write(offset, size, value)`` and gets register values back; the transport turns them into
device operations. What the transport needs from the outside world it asks through two
callables: ``interrupt(level)`` raises (True) or lowers (False) the device's interrupt line, and
``notify(queue)`` runs on a QueueNotify write (by default the queue is processed right away).
The Xen IOREQ shim and the in-process driver drive exactly this class.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pyvirtio.device import VirtioDevice
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.mmio import (
    CONFIG_OFFSET,
    MAGIC_VALUE,
    VENDOR_ID,
    VERSION_LEGACY,
    VERSION_MODERN,
    Interrupt,
    Reg,
)
from pyvirtio.spec.ring import legacy_layout
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue.split import VirtqueueError

log = logging.getLogger(__name__)

_LOW32 = 0xFFFFFFFF
#: Legacy QueueAlign default: Linux's virtio_mmio uses the page size, and so does the spec.
_LEGACY_DEFAULT_ALIGN = 4096


def _no_interrupt(level: bool) -> None:
    pass


def _set_low(value: int, low: int) -> int:
    return (value & ~_LOW32) | (low & _LOW32)


def _set_high(value: int, high: int) -> int:
    return (value & _LOW32) | ((high & _LOW32) << 32)


class MmioTransport:
    """One virtio-mmio device window."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        legacy: bool = False,
        interrupt: Callable[[bool], None] = _no_interrupt,
        notify: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.legacy = legacy
        self.version = VERSION_LEGACY if legacy else VERSION_MODERN
        self.interrupt = interrupt
        self.notify = notify if notify is not None else device.process_queue
        if legacy:
            device.offered_features &= ~bit(Feature.VERSION_1)
        device.events = self
        self.interrupt_status = 0
        self._irq_lock = threading.Lock()
        self._reset_transport()

    def _reset_transport(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.guest_page_size = 0
        self._queue_align = [_LEGACY_DEFAULT_ALIGN] * len(self.device.queues)
        self._queue_pfn = [0] * len(self.device.queues)
        with self._irq_lock:
            self.interrupt_status = 0

    # -- DeviceEvents --------------------------------------------------------------------------

    def queue_interrupt(self, queue: int) -> None:
        self._raise(Interrupt.VRING)

    def config_interrupt(self) -> None:
        self._raise(Interrupt.CONFIG)

    def _raise(self, why: int) -> None:
        with self._irq_lock:
            self.interrupt_status |= why
        self.interrupt(True)

    # -- register access -----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_OFFSET:
            if size not in (1, 2, 4, 8):
                log.warning("config read of %d bytes at %#x", size, offset)
                return 0
            data = self.device.read_config(offset - CONFIG_OFFSET, size)
            return int.from_bytes(data, "little")
        if size != 4 or offset % 4:
            log.warning("register read of %d bytes at %#x is not 32-bit aligned", size, offset)
            return 0
        return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET:
            if size not in (1, 2, 4, 8):
                log.warning("config write of %d bytes at %#x", size, offset)
                return
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.device.write_config(offset - CONFIG_OFFSET, data)
            return
        if size != 4 or offset % 4:
            log.warning("register write of %d bytes at %#x is not 32-bit aligned", size, offset)
            return
        self._write_register(offset, value & _LOW32)

    def _selected_queue(self) -> int | None:
        return self.queue_sel if self.queue_sel < len(self.device.queues) else None

    def _read_register(self, offset: int) -> int:
        device = self.device
        q = self._selected_queue()
        queue = device.queues[q] if q is not None else None
        if offset == Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == Reg.VERSION:
            return self.version
        if offset == Reg.DEVICE_ID:
            return int(device.device_id)
        if offset == Reg.VENDOR_ID:
            return VENDOR_ID
        if offset == Reg.DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return (device.offered_features >> (32 * self.device_features_sel)) & _LOW32
        if offset == Reg.QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == Reg.QUEUE_READY and not self.legacy:
            return int(queue.ready) if queue is not None else 0
        if offset == Reg.QUEUE_PFN and self.legacy:
            return self._queue_pfn[q] if q is not None else 0
        if offset == Reg.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == Reg.STATUS:
            return int(device.status)
        if offset == Reg.CONFIG_GENERATION and not self.legacy:
            return device.config_generation
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return _LOW32  # §4.2.2: no shared memory region with this id
        if queue is not None and not self.legacy:
            if offset == Reg.QUEUE_NUM:
                return queue.size
            if offset == Reg.QUEUE_DESC_LOW:
                return queue.desc_addr & _LOW32
            if offset == Reg.QUEUE_DESC_HIGH:
                return queue.desc_addr >> 32
            if offset == Reg.QUEUE_DRIVER_LOW:
                return queue.avail_addr & _LOW32
            if offset == Reg.QUEUE_DRIVER_HIGH:
                return queue.avail_addr >> 32
            if offset == Reg.QUEUE_DEVICE_LOW:
                return queue.used_addr & _LOW32
            if offset == Reg.QUEUE_DEVICE_HIGH:
                return queue.used_addr >> 32
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        device = self.device
        if offset == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == Reg.DRIVER_FEATURES:
            if self.driver_features_sel <= 1:
                shift = 32 * self.driver_features_sel
                features = device.driver_features & ~(_LOW32 << shift) | value << shift
                device.set_driver_features(features)
        elif offset == Reg.QUEUE_SEL:
            self.queue_sel = value
        elif offset == Reg.QUEUE_NOTIFY:
            if value < len(device.queues):
                self.notify(value)
            else:
                log.warning("notify for queue %d, which does not exist", value)
        elif offset == Reg.INTERRUPT_ACK:
            with self._irq_lock:
                self.interrupt_status &= ~value
                lower = self.interrupt_status == 0
            if lower:
                self.interrupt(False)
        elif offset == Reg.STATUS:
            self._write_status(value)
        elif self.legacy and offset == Reg.GUEST_PAGE_SIZE:
            self.guest_page_size = value
        else:
            self._write_queue_register(offset, value)

    def _write_status(self, value: int) -> None:
        self.device.set_status(value)
        if value == 0:
            self._reset_transport()
            self.interrupt(False)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            log.warning(
                "write %#x to register %#x of missing queue %d", value, offset, self.queue_sel
            )
            return
        queue = self.device.queues[q]
        if offset == Reg.QUEUE_NUM:
            if queue.ready:
                log.warning("queue %d: size written while the queue is live", q)
                return
            queue.size = value
            return
        if self.legacy:
            if offset == Reg.QUEUE_ALIGN:
                self._queue_align[q] = value
            elif offset == Reg.QUEUE_PFN:
                self._write_legacy_pfn(q, value)
            else:
                log.warning("legacy register %#x is not writable", offset)
            return
        if offset == Reg.QUEUE_READY:
            self._write_queue_ready(q, bool(value & 1))
            return
        if queue.ready:
            log.warning("queue %d: address written while the queue is live", q)
            return
        if offset == Reg.QUEUE_DESC_LOW:
            queue.desc_addr = _set_low(queue.desc_addr, value)
        elif offset == Reg.QUEUE_DESC_HIGH:
            queue.desc_addr = _set_high(queue.desc_addr, value)
        elif offset == Reg.QUEUE_DRIVER_LOW:
            queue.avail_addr = _set_low(queue.avail_addr, value)
        elif offset == Reg.QUEUE_DRIVER_HIGH:
            queue.avail_addr = _set_high(queue.avail_addr, value)
        elif offset == Reg.QUEUE_DEVICE_LOW:
            queue.used_addr = _set_low(queue.used_addr, value)
        elif offset == Reg.QUEUE_DEVICE_HIGH:
            queue.used_addr = _set_high(queue.used_addr, value)
        else:
            log.warning("register %#x is not writable", offset)

    def _write_queue_ready(self, q: int, ready: bool) -> None:
        device = self.device
        queue = device.queues[q]
        if ready == queue.ready:
            return
        queue.ready = ready
        if not ready:
            queue.deactivate()
        elif device.status & DeviceStatus.DRIVER_OK:
            self._start(q)

    def _write_legacy_pfn(self, q: int, pfn: int) -> None:
        device = self.device
        queue = device.queues[q]
        self._queue_pfn[q] = pfn
        if pfn == 0:
            queue.ready = False
            queue.deactivate()
            return
        page = self.guest_page_size or 4096
        align = self._queue_align[q] or _LEGACY_DEFAULT_ALIGN
        if align & (align - 1):
            device.fail(f"queue {q}: legacy QueueAlign {align} is not a power of two")
            return
        base = pfn * page
        desc, avail, used = legacy_layout(queue.size, align)
        queue.desc_addr, queue.avail_addr, queue.used_addr = base + desc, base + avail, base + used
        queue.ready = True
        if device.status & DeviceStatus.DRIVER_OK:
            self._start(q)

    def _start(self, q: int) -> None:
        try:
            self.device.start_queue(q)
        except VirtqueueError as exc:
            self.device.fail(str(exc))
