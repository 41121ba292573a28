"""/dev/xen/privcmd (linux/include/uapi/xen/privcmd.h): foreign mappings of guest memory, and
the kernel's notification paths.

Each mapping is a Python ``mmap`` of the privcmd device populated with the guest's frames by
IOCTL_PRIVCMD_MMAPBATCH_V2, which is what ``xenforeignmemory_map`` does on Linux (see
``mapping.py`` for why an ``mmap`` and not a raw pointer).

Linux 6.7 and later (``CONFIG_XEN_PRIVCMD_EVENTFD``) can also complete a guest's QueueNotify
IOREQs in the kernel and signal an eventfd (IOCTL_PRIVCMD_IOEVENTFD), and issue a dm_op, e.g.
XEN_DMOP_set_irq_level, whenever an eventfd is written (IOCTL_PRIVCMD_IRQFD). Older kernels
answer both with ENOTTY.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Mapping, Sequence

from pyvirtio.shims.xen.mapping import MmapMapping

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def _ioc_none(kind: str, nr: int, size: int) -> int:
    return (size << 16) | (ord(kind) << 8) | nr


def _iow(kind: str, nr: int, size: int) -> int:
    return (1 << 30) | _ioc_none(kind, nr, size)


#: struct privcmd_mmapbatch_v2 { u32 num; u16 dom; u64 addr; u64 *arr; int *err; }
_MMAPBATCH_V2 = struct.Struct("<IHxxQQQ")
#: struct privcmd_irqfd { u64 dm_op; u32 size; u32 fd; u32 flags; u16 dom; u8 pad[2]; }
_IRQFD = struct.Struct("<QIIIHxx")
#: struct privcmd_ioeventfd { u64 ioreq; u64 ports; u64 addr; u32 addr_len; u32 event_fd;
#: u32 vcpus; u32 vq; u32 flags; u16 dom; u8 pad[2]; }
_IOEVENTFD = struct.Struct("<QQQIIIIIHxx")
IOCTL_PRIVCMD_MMAPBATCH_V2 = _ioc_none("P", 4, _MMAPBATCH_V2.size)
IOCTL_PRIVCMD_RESTRICT = _ioc_none("P", 6, 2)
IOCTL_PRIVCMD_IRQFD = _iow("P", 8, _IRQFD.size)
IOCTL_PRIVCMD_IOEVENTFD = _iow("P", 9, _IOEVENTFD.size)
PRIVCMD_IRQFD_FLAG_DEASSIGN = 1
PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = 1
PRIVCMD_PATH = "/dev/xen/privcmd"

#: struct xen_dm_op { u32 op; u32 pad; union { struct xen_dm_op_set_irq_level { u32 irq;
#: u8 level; u8 pad[3]; } ... } } (xen/include/public/hvm/dm_op.h)
_DM_OP_SET_IRQ_LEVEL = struct.Struct("<IIIB3x")
XEN_DMOP_SET_IRQ_LEVEL = 19


def dm_op_set_irq_level(irq: int, level: int) -> bytes:
    """The XEN_DMOP_set_irq_level buffer an irqfd issues."""
    return _DM_OP_SET_IRQ_LEVEL.pack(XEN_DMOP_SET_IRQ_LEVEL, 0, irq, level)


class ForeignMapping(MmapMapping):
    """Guest frames mapped into this process; ``errors`` maps the index of each page that did
    not map to Xen's errno for it, ``bad`` lists those indices."""

    def __init__(
        self, m: mmap.mmap, gfn: int, count: int, errors: Mapping[int, int] | None = None
    ) -> None:
        super().__init__(m)
        self.gfn = gfn
        self.count = count
        self.errors = dict(errors or {})
        self.bad = frozenset(self.errors)


class Privcmd:
    """A privcmd handle, optionally restricted to one domain. ``maps`` and ``map_ns`` count
    the foreign map calls and the time spent in them."""

    def __init__(self, domid: int | None = None) -> None:
        self.maps = 0
        self.map_ns = 0
        self.fd = os.open(PRIVCMD_PATH, os.O_RDWR | os.O_CLOEXEC)
        if domid is not None:
            try:
                fcntl.ioctl(self.fd, IOCTL_PRIVCMD_RESTRICT, struct.pack("<H", domid))
            except OSError:
                os.close(self.fd)
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def map(self, domid: int, gfn: int, count: int) -> ForeignMapping:
        """Map ``count`` guest frames starting at ``gfn``, readable and writable."""
        started = time.perf_counter_ns()
        try:
            return self._map(domid, gfn, count)
        finally:
            self.maps += 1
            self.map_ns += time.perf_counter_ns() - started

    def _map(self, domid: int, gfn: int, count: int) -> ForeignMapping:
        m = mmap.mmap(
            self.fd,
            count << PAGE_SHIFT,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        anchor = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(anchor)
        del anchor  # releases the buffer export: the mmap can be closed again
        gfns = (ctypes.c_uint64 * count)(*range(gfn, gfn + count))
        errs = (ctypes.c_int * count)()
        arg = bytearray(
            _MMAPBATCH_V2.pack(count, domid, addr, ctypes.addressof(gfns), ctypes.addressof(errs))
        )
        try:
            fcntl.ioctl(self.fd, IOCTL_PRIVCMD_MMAPBATCH_V2, arg)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: some frames failed, see errs
                m.close()
                raise
        return ForeignMapping(m, gfn, count, {i: -errs[i] for i in range(count) if errs[i]})

    # -- the kernel's notification paths (Linux >= 6.7) ----------------------------------------

    def irqfd(self, domid: int, fd: int, dm_op: bytes, *, assign: bool = True) -> None:
        """Have the kernel issue ``dm_op`` for ``domid`` whenever eventfd ``fd`` is written
        (or stop it). OSError(ENOTTY) from a kernel without irqfds."""
        buf = ctypes.create_string_buffer(dm_op, len(dm_op))
        flags = 0 if assign else PRIVCMD_IRQFD_FLAG_DEASSIGN
        arg = _IRQFD.pack(ctypes.addressof(buf), len(dm_op), fd, flags, domid)
        fcntl.ioctl(self.fd, IOCTL_PRIVCMD_IRQFD, arg)

    def ioeventfd(
        self,
        domid: int,
        ioreq_page: int,
        ports: Sequence[int],
        window: int,
        fd: int,
        queue: int,
        *,
        assign: bool = True,
    ) -> None:
        """Have the kernel complete every IOREQ that writes ``queue`` to the virtio-mmio
        QueueNotify register of the window at ``window`` (4 bytes) and signal eventfd ``fd``
        instead (or stop it). ``ioreq_page`` is the address of the IOREQ server's ioreq page as
        this process mapped it from privcmd (``xenforeignmemory_map_resource``), ``ports`` the
        local event channel ports bound to its vCPUs' ports, in vCPU order. OSError(ENOTTY)
        from a kernel without ioeventfds."""
        array = (ctypes.c_uint32 * len(ports))(*ports)
        flags = 0 if assign else PRIVCMD_IOEVENTFD_FLAG_DEASSIGN
        arg = _IOEVENTFD.pack(
            ioreq_page, ctypes.addressof(array), window, 4, fd, len(ports), queue, flags, domid
        )
        fcntl.ioctl(self.fd, IOCTL_PRIVCMD_IOEVENTFD, arg)
