"""IOREQs: the guest accesses Xen forwards to a device model (xen/include/public/hvm/ioreq.h).

Sans-I/O: :func:`parse` reads one ``struct ioreq`` from a view of the shared ioreq page, and an
:class:`IoreqDispatcher` turns it into virtio-mmio register accesses and returns the value to
put back. The protocol around it (READY -> INPROCESS -> IORESP_READY, with barriers, and the
event channel notification) lives in ``server.py``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.spec.mmio import WINDOW_SIZE, Reg

log = logging.getLogger(__name__)

#: ``struct ioreq``: addr, data, count, size, vp_eport, _pad0, state|flags, type.
IOREQ = struct.Struct("<QQIIIHBB")
IOREQ_SIZE = IOREQ.size  # 32
#: Offsets of the fields the device model writes.
DATA_OFFSET = 8
STATE_OFFSET = 30
STATE_MASK = 0x0F
_DATA_IS_PTR = 0x10
_DIR_READ = 0x20


class IoreqState(IntEnum):
    NONE = 0
    READY = 1
    INPROCESS = 2
    RESP_READY = 3


class IoreqType(IntEnum):
    PIO = 0
    COPY = 1  # MMIO
    PCI_CONFIG = 2
    TIMEOFFSET = 7
    INVALIDATE = 8  # the guest's memory map changed: drop cached mappings


@dataclass(frozen=True, slots=True)
class Ioreq:
    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: int
    data_is_ptr: bool
    is_read: bool
    type: int


def parse(view: memoryview | bytes) -> Ioreq:
    addr, data, count, size, port, _, bits, kind = IOREQ.unpack_from(view)
    return Ioreq(
        addr,
        data,
        count,
        size,
        port,
        bits & STATE_MASK,
        bool(bits & _DATA_IS_PTR),
        bool(bits & _DIR_READ),
        kind,
    )


def encode(req: Ioreq) -> bytes:
    bits = req.state | (_DATA_IS_PTR if req.data_is_ptr else 0) | (_DIR_READ if req.is_read else 0)
    return IOREQ.pack(req.addr, req.data, req.count, req.size, req.vp_eport, 0, bits, req.type)


class MmioDevice(Protocol):
    """What a window forwards to (``transport.mmio.MmioTransport``)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass
class Window:
    base: int
    size: int
    device: MmioDevice


#: QueueNotify's queue index, as Linux's privcmd ioeventfd compares it.
_NOTIFY_QUEUE_MASK = 0xFFFF
#: What :func:`kind` calls an IOREQ, for statistics.
KINDS = ("notify", "interrupt_status", "interrupt_ack", "other")


def kind(req: Ioreq) -> str:
    """Which virtio-mmio access ``req`` is (windows are WINDOW_SIZE-aligned)."""
    if req.type == IoreqType.COPY:
        offset = req.addr % WINDOW_SIZE
        if offset == Reg.QUEUE_NOTIFY and not req.is_read:
            return "notify"
        if offset == Reg.INTERRUPT_STATUS and req.is_read:
            return "interrupt_status"
        if offset == Reg.INTERRUPT_ACK and not req.is_read:
            return "interrupt_ack"
    return "other"


class IoreqDispatcher:
    """Routes IOREQs to the virtio-mmio windows of one guest."""

    def __init__(self, on_invalidate: Callable[[], None] | None = None) -> None:
        self.windows: list[Window] = []
        self.on_invalidate = on_invalidate
        self._guest_errors = GuestErrorLog(log)
        #: (QueueNotify address, queue) the kernel completes (privcmd ioeventfd).
        self._kernel_notifies: set[tuple[int, int]] = set()

    def add(self, base: int, size: int, device: MmioDevice) -> None:
        for w in self.windows:
            if base < w.base + w.size and w.base < base + size:
                raise ValueError(f"MMIO window {base:#x}+{size:#x} overlaps {w.base:#x}")
        self.windows.append(Window(base, size, device))

    def remove(self, base: int) -> None:
        self.windows = [w for w in self.windows if w.base != base]
        self._kernel_notifies = {
            (addr, q) for addr, q in self._kernel_notifies if addr != base + Reg.QUEUE_NOTIFY
        }

    def set_kernel_notify(self, base: int, queue: int, on: bool) -> None:
        """The kernel does (``on``) or no longer does complete the QueueNotify writes of
        ``queue`` to the window at ``base``."""
        key = (base + Reg.QUEUE_NOTIFY, queue)
        if on:
            self._kernel_notifies.add(key)
        else:
            self._kernel_notifies.discard(key)

    def for_kernel(self, req: Ioreq) -> bool:
        """Whether the kernel completes ``req``: a 4-byte QueueNotify write for a queue it has
        an ioeventfd for (the test of linux drivers/xen/privcmd.c ioeventfd_interrupt()). Such
        an IOREQ must not be touched here, even while it still reads READY."""
        return (
            self.kernel_looks_at(req)
            and req.size == 4
            and (req.addr, req.data & _NOTIFY_QUEUE_MASK) in self._kernel_notifies
        )

    def kernel_looks_at(self, req: Ioreq) -> bool:
        """Whether the kernel's ioeventfd handler, if it runs for ``req``'s event, takes it over
        for a moment even to decline it: any MMIO write (it sets INPROCESS, compares, and puts
        READY back). Reads it leaves alone."""
        return bool(self._kernel_notifies) and req.type == IoreqType.COPY and not req.is_read

    def handle(self, req: Ioreq) -> int | None:
        """Carry out ``req``; returns the data to answer a read with (None: leave data alone)."""
        if req.type == IoreqType.INVALIDATE:
            if self.on_invalidate is not None:
                self.on_invalidate()
            return None
        if req.type == IoreqType.TIMEOFFSET:
            return None
        if req.type != IoreqType.COPY:
            self._guest_errors.warning("IOREQ type %d is not emulated here", req.type)
            return _all_ones(req.size) if req.is_read and not req.data_is_ptr else None
        if req.data_is_ptr or req.count != 1:
            # Arm never forwards string or pointer-based MMIO; refuse instead of guessing.
            self._guest_errors.warning(
                "IOREQ with data_is_ptr=%d count=%d at %#x is not supported",
                req.data_is_ptr,
                req.count,
                req.addr,
            )
            return None
        if req.size not in (1, 2, 4, 8):
            self._guest_errors.warning("IOREQ of %d bytes at %#x", req.size, req.addr)
            return _all_ones(8) if req.is_read else None
        for w in self.windows:
            if w.base <= req.addr and req.addr + req.size <= w.base + w.size:
                offset = req.addr - w.base
                if req.is_read:
                    return w.device.read(offset, req.size) & _all_ones(req.size)
                w.device.write(offset, req.size, req.data & _all_ones(req.size))
                return None
        self._guest_errors.warning("IOREQ at %#x hits no device", req.addr)
        return _all_ones(req.size) if req.is_read else None


def _all_ones(size: int) -> int:
    return (1 << (8 * min(size, 8))) - 1
