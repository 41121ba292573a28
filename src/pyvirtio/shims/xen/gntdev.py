"""Grants through /dev/xen/gntdev (linux/include/uapi/xen/gntdev.h): mappings and copies.

A guest that restricts its backends (xen-grant-dma, libxl's ``grant_usage``) puts grant
references instead of guest-physical addresses in its rings: ``(1 << 63) | gref << 12`` plus
the offset in the page, with consecutive references for consecutive pages. Mapping a grant
makes just that page visible to the backend, with the rights the guest gave; copying to or
from it (IOCTL_GNTDEV_GRANT_COPY, GNTTABOP_copy) needs no mapping at all, and one call copies
any number of pages.

Like the foreign mappings, a grant mapping is a Python ``mmap`` (``mapping.py``); closing it
also returns the grants to the guest.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

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


#: struct gntdev_grant_copy_segment { union { void *virt; struct { grant_ref_t ref;
#: u16 offset; domid_t domid; } foreign; } source, dest; u16 len; u16 flags; s16 status; }
_COPY_SEGMENT = struct.Struct("<8s8sHHh2x")
_VIRT = struct.Struct("<Q")
_FOREIGN = struct.Struct("<IHH")
_COPY = struct.Struct("<I4xQ")  # struct ioctl_gntdev_grant_copy { unsigned count; *segments }
_STATUS_AT = 20  # of a segment's status
IOCTL_GNTDEV_MAP_GRANT_REF = _ioc_none("G", 0, _MAP_HEADER.size + _GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc_none("G", 1, _UNMAP.size)
IOCTL_GNTDEV_GRANT_COPY = _ioc_none("G", 8, _COPY.size)
#: GNTCOPY_source_gref, GNTCOPY_dest_gref (xen/include/public/grant_table.h)
GNTCOPY_SOURCE_GREF = 1 << 0
GNTCOPY_DEST_GREF = 1 << 1
GNTDEV_PATH = "/dev/xen/gntdev"


@dataclass(frozen=True)
class CopySegment:
    """``length`` bytes at ``address`` in this process and at ``offset`` in the page of grant
    ``ref`` (within one page)."""

    address: int
    ref: int
    offset: int
    length: int


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

    def close(self) -> bool:
        started = time.perf_counter_ns()
        closed = super().close()
        if closed:  # munmap (GNTTABOP_unmap_grant_ref) and the unmap ioctl
            self.gntdev.unmaps += 1
            self.gntdev.unmap_ns += time.perf_counter_ns() - started
        return closed

    def unmapped(self) -> None:
        self.gntdev.unmap(self.index, self.count)


class Gntdev:
    """A gntdev handle. ``maps``/``map_ns``, ``unmaps``/``unmap_ns`` and ``copies``/``copy_ns``
    count the grant mappings made and undone, the copy calls, and the time spent in them."""

    def __init__(self) -> None:
        self.maps = self.map_ns = self.unmaps = self.unmap_ns = self.copies = self.copy_ns = 0
        self.fd = os.open(GNTDEV_PATH, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def map(self, domid: int, first_ref: int, count: int, writable: bool) -> GrantMapping:
        """Map grants ``first_ref .. first_ref + count - 1`` of ``domid``."""
        started = time.perf_counter_ns()
        try:
            return self._map(domid, first_ref, count, writable)
        finally:
            self.maps += 1
            self.map_ns += time.perf_counter_ns() - started

    def _map(self, domid: int, first_ref: int, count: int, writable: bool) -> GrantMapping:
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

    def copy(self, domid: int, segments: Sequence[CopySegment], to_guest: bool) -> list[int]:
        """Copy every segment between this process and ``domid``'s grants (to the grants if
        ``to_guest``) in one call; the GNTST_* status of each (0: copied). OSError if the call
        itself fails (e.g. EINVAL for a segment that crosses a page)."""
        started = time.perf_counter_ns()
        try:
            return self._copy(domid, segments, to_guest)
        finally:
            self.copies += 1
            self.copy_ns += time.perf_counter_ns() - started

    def _copy(self, domid: int, segments: Sequence[CopySegment], to_guest: bool) -> list[int]:
        table = bytearray(_COPY_SEGMENT.size * len(segments))
        flags = GNTCOPY_DEST_GREF if to_guest else GNTCOPY_SOURCE_GREF
        for i, seg in enumerate(segments):
            local = _VIRT.pack(seg.address)
            foreign = _FOREIGN.pack(seg.ref, seg.offset, domid)
            source, dest = (local, foreign) if to_guest else (foreign, local)
            _COPY_SEGMENT.pack_into(
                table, i * _COPY_SEGMENT.size, source, dest, seg.length, flags, 0
            )
        anchor = (ctypes.c_char * len(table)).from_buffer(table)
        try:
            fcntl.ioctl(
                self.fd,
                IOCTL_GNTDEV_GRANT_COPY,
                _COPY.pack(len(segments), ctypes.addressof(anchor)),
            )
        finally:
            del anchor
        return [
            struct.unpack_from("<h", table, i * _COPY_SEGMENT.size + _STATUS_AT)[0]
            for i in range(len(segments))
        ]
