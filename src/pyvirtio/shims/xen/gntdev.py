"""Grant mappings through /dev/xen/gntdev (linux/include/uapi/xen/gntdev.h).

A guest that restricts its backends (xen-grant-dma, libxl's ``grant_usage``) puts grant
references instead of guest-physical addresses in its rings: ``(1 << 63) | gref << 12`` plus
the offset in the page, with consecutive references for consecutive pages. Mapping a grant
makes just that page visible to the backend, with the rights the guest gave.

Like the foreign mappings, a grant mapping is a Python ``mmap`` (``mapping.py``); closing it
also returns the grants to the guest.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from pyvirtio.shims.xen.mapping import MmapMapping

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: Bit 63 of a DMA address marks a grant reference (linux drivers/xen/grant-dma-ops.c).
GRANT_DMA_ADDR_OFF = 1 << 63

_MAP_HEADER = struct.Struct("<IIQ")  # count, pad, index (out)
_GRANT_REF = struct.Struct("<II")  # domid, ref
_UNMAP = struct.Struct("<QII")  # index, count, pad


def _ioc_none(kind: str, nr: int, size: int) -> int:
    return (size << 16) | (ord(kind) << 8) | nr


IOCTL_GNTDEV_MAP_GRANT_REF = _ioc_none("G", 0, _MAP_HEADER.size + _GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc_none("G", 1, _UNMAP.size)
GNTDEV_PATH = "/dev/xen/gntdev"


def split_grant_address(addr: int) -> tuple[int, int]:
    """(first grant reference, offset in its page) of a grant DMA address."""
    plain = addr & ~GRANT_DMA_ADDR_OFF
    return plain >> PAGE_SHIFT, plain & (PAGE_SIZE - 1)


class GrantMapping(MmapMapping):
    """``count`` granted pages mapped at ``view``; the grants go back when it is unmapped."""

    def __init__(self, gntdev: Gntdev, m: mmap.mmap, index: int, count: int) -> None:
        super().__init__(m)
        self.gntdev = gntdev
        self.index = index
        self.count = count

    def unmapped(self) -> None:
        self.gntdev.unmap(self.index, self.count)


class Gntdev:
    """A gntdev handle."""

    def __init__(self) -> None:
        self.fd = os.open(GNTDEV_PATH, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def map(self, domid: int, first_ref: int, count: int, writable: bool) -> GrantMapping:
        """Map grants ``first_ref .. first_ref + count - 1`` of ``domid``."""
        arg = bytearray(_MAP_HEADER.pack(count, 0, 0))
        for i in range(count):
            arg += _GRANT_REF.pack(domid, first_ref + i)
        fcntl.ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        index = _MAP_HEADER.unpack_from(arg)[2]
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            m = mmap.mmap(
                self.fd, count * PAGE_SIZE, flags=mmap.MAP_SHARED, prot=prot, offset=index
            )
        except OSError:
            self.unmap(index, count)
            raise
        return GrantMapping(self, m, index, count)

    def unmap(self, index: int, count: int) -> None:
        fcntl.ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, _UNMAP.pack(index, count, 0))
