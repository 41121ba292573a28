"""The virtio-mmio register file (VIRTIO 1.2 §4.2), modern (version 2) and legacy (version 1).

Sans-I/O: a shim hands in each guest access as ``read(offset, size)`` or
``write(offset, size, value)`` and gets register values back; the transport turns them into
calls of the device's control API. What the transport needs from the outside world it asks
through two callables: ``interrupt(level)`` raises (True) or lowers (False) the device's
interrupt line, and ``notify(queue)`` runs on a QueueNotify write (by default the queue is
processed right away, in the caller's thread). The Xen IOREQ shim and the in-process driver
drive exactly this class.

The queue registers (QueueNum, the three addresses, the legacy PFN) are the transport's own
until the driver writes QueueReady=1 (or a PFN): then they are handed to the device, which
checks them. Everything the guest writes is untrusted; what the transport cannot use it
ignores, with a rate-limited warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.device import QueueHost, VirtioDevice
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.mmio import (
    CONFIG_OFFSET,
    LEGACY_DEFAULT_PAGE_SIZE,
    LEGACY_DEFAULT_QUEUE_ALIGN,
    MAGIC_VALUE,
    VENDOR_ID,
    VERSION_LEGACY,
    VERSION_MODERN,
    Interrupt,
    Reg,
)
from pyvirtio.spec.ring import legacy_layout
from pyvirtio.virtqueue.split import QueueLayout, VirtqueueError

log = logging.getLogger(__name__)

_LOW32 = 0xFFFFFFFF


def _no_interrupt(level: bool) -> None:
    pass


def _set_low(value: int, low: int) -> int:
    return (value & ~_LOW32) | (low & _LOW32)


def _set_high(value: int, high: int) -> int:
    return (value & _LOW32) | ((high & _LOW32) << 32)


@dataclass
class _QueueRegisters:
    """What the driver wrote for one queue, before it is handed to the device."""

    num: int
    desc: int = 0
    driver: int = 0
    device: int = 0
    ready: bool = False
    align: int = LEGACY_DEFAULT_QUEUE_ALIGN
    pfn: int = 0


class MmioTransport:
    """One virtio-mmio device window."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        legacy: bool = False,
        interrupt: Callable[[bool], None] = _no_interrupt,
        notify: Callable[[int], None] | None = None,
        host: QueueHost | None = None,
    ) -> None:
        """``host`` runs the queues (a ``QueueRunner``, whose ``notify`` is then the usual
        ``notify``); without one they run in the thread that writes QueueNotify."""
        self.device = device
        self.legacy = legacy
        self.version = VERSION_LEGACY if legacy else VERSION_MODERN
        self.interrupt = interrupt
        self.notify = notify if notify is not None else device.process_queue
        if legacy:
            device.change_offer(remove=bit(Feature.VERSION_1))
        self.interrupt_status = 0
        self._irq_lock = threading.Lock()
        self._guest_errors = GuestErrorLog(log)
        self._reset_transport()
        device.attach(self, host)

    def _reset_transport(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.guest_page_size = 0
        self._queues = [_QueueRegisters(q.max_size) for q in self.device.queues]
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
                self._guest_errors.warning("config read of %d bytes at %#x", size, offset)
                return 0
            data = self.device.read_config(offset - CONFIG_OFFSET, size)
            return int.from_bytes(data, "little")
        if size != 4 or offset % 4:
            self._guest_errors.warning(
                "register read of %d bytes at %#x is not 32-bit aligned", size, offset
            )
            return 0
        return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET:
            if size not in (1, 2, 4, 8):
                self._guest_errors.warning("config write of %d bytes at %#x", size, offset)
                return
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.device.write_config(offset - CONFIG_OFFSET, data)
            return
        if size != 4 or offset % 4:
            self._guest_errors.warning(
                "register write of %d bytes at %#x is not 32-bit aligned", size, offset
            )
            return
        self._write_register(offset, value & _LOW32)

    def _selected(self) -> _QueueRegisters | None:
        return self._queues[self.queue_sel] if self.queue_sel < len(self._queues) else None

    def _read_register(self, offset: int) -> int:
        device = self.device
        regs = self._selected()
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
            return device.queues[self.queue_sel].max_size if regs is not None else 0
        if offset == Reg.QUEUE_READY and not self.legacy:
            return int(regs.ready) if regs is not None else 0
        if offset == Reg.QUEUE_PFN and self.legacy:
            return regs.pfn if regs is not None else 0
        if offset == Reg.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == Reg.STATUS:
            return int(device.status)
        if offset == Reg.CONFIG_GENERATION and not self.legacy:
            return device.config_generation
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return _LOW32  # §4.2.2: no shared memory region with this id
        if regs is not None and not self.legacy:
            if offset == Reg.QUEUE_NUM:
                return regs.num
            if offset == Reg.QUEUE_DESC_LOW:
                return regs.desc & _LOW32
            if offset == Reg.QUEUE_DESC_HIGH:
                return regs.desc >> 32
            if offset == Reg.QUEUE_DRIVER_LOW:
                return regs.driver & _LOW32
            if offset == Reg.QUEUE_DRIVER_HIGH:
                return regs.driver >> 32
            if offset == Reg.QUEUE_DEVICE_LOW:
                return regs.device & _LOW32
            if offset == Reg.QUEUE_DEVICE_HIGH:
                return regs.device >> 32
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
                self._guest_errors.warning("notify for queue %d, which does not exist", value)
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
        # A write of 0 returns once the device is reset: its workers have finished the
        # requests they had taken, and touch nothing of the old rings afterwards.
        self.device.set_status(value)
        if value == 0:
            self._reset_transport()
            self.interrupt(False)

    def _write_queue_register(self, offset: int, value: int) -> None:
        regs = self._selected()
        if regs is None:
            self._guest_errors.warning(
                "write %#x to register %#x of missing queue %d", value, offset, self.queue_sel
            )
            return
        q = self.queue_sel
        if self.legacy:
            if offset == Reg.QUEUE_NUM:
                regs.num = value
            elif offset == Reg.QUEUE_ALIGN:
                regs.align = value
            elif offset == Reg.QUEUE_PFN:
                self._write_legacy_pfn(q, regs, value)
            else:
                self._guest_errors.warning("legacy register %#x is not writable", offset)
            return
        if offset == Reg.QUEUE_READY:
            self._write_queue_ready(q, regs, bool(value & 1))
            return
        if regs.ready:
            self._guest_errors.warning("queue %d: register %#x written while it is live", q, offset)
            return
        if offset == Reg.QUEUE_NUM:
            regs.num = value
        elif offset == Reg.QUEUE_DESC_LOW:
            regs.desc = _set_low(regs.desc, value)
        elif offset == Reg.QUEUE_DESC_HIGH:
            regs.desc = _set_high(regs.desc, value)
        elif offset == Reg.QUEUE_DRIVER_LOW:
            regs.driver = _set_low(regs.driver, value)
        elif offset == Reg.QUEUE_DRIVER_HIGH:
            regs.driver = _set_high(regs.driver, value)
        elif offset == Reg.QUEUE_DEVICE_LOW:
            regs.device = _set_low(regs.device, value)
        elif offset == Reg.QUEUE_DEVICE_HIGH:
            regs.device = _set_high(regs.device, value)
        else:
            self._guest_errors.warning("register %#x is not writable", offset)

    def _write_queue_ready(self, q: int, regs: _QueueRegisters, ready: bool) -> None:
        if ready == regs.ready:
            return
        regs.ready = ready
        if not ready:
            self.device.disable_queue(q)
            return
        self._enable(q, QueueLayout(regs.num, regs.desc, regs.driver, regs.device))

    def _write_legacy_pfn(self, q: int, regs: _QueueRegisters, pfn: int) -> None:
        regs.pfn = pfn
        if pfn == 0:
            regs.ready = False
            self.device.disable_queue(q)
            return
        if regs.ready:
            self._guest_errors.warning("queue %d: legacy PFN written while it is live", q)
            return
        align = regs.align
        if not align or align & (align - 1):
            self.device.fail(f"queue {q}: legacy QueueAlign {align} is not a power of two")
            return
        if not regs.num or regs.num & (regs.num - 1) or regs.num > self.device.queues[q].max_size:
            self.device.fail(f"queue {q}: legacy QueueNum {regs.num}")
            return
        base = pfn * (self.guest_page_size or LEGACY_DEFAULT_PAGE_SIZE)
        desc, avail, used = legacy_layout(regs.num, align)
        regs.ready = True
        self._enable(q, QueueLayout(regs.num, base + desc, base + avail, base + used))

    def _enable(self, q: int, layout: QueueLayout) -> None:
        try:
            self.device.configure_queue(q, layout)
        except VirtqueueError as exc:
            self.device.fail(str(exc))
            return
        self.device.enable_queue(q)
