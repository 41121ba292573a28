"""Guest-physical memory: regions of the guest's address space mapped into this process.

A backend reaches guest memory only through :class:`GuestMemory`. Every translation is bounds
checked against the regions the guest (or its VMM) gave us; an address outside them raises
:class:`GuestMemoryError`, never an access. Translations hand out memoryviews straight into the
mapping, so device I/O (``preadv``/``pwritev``) moves data without copies.

Shims with other ways of reaching guest memory (Xen foreign and grant mappings, mapped on demand
through a bounded cache) subclass :class:`GuestMemory` and override :meth:`GuestMemory.buffers`
and :meth:`GuestMemory.ring`; devices and virtqueues see no difference.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

PAGE_SIZE = mmap.PAGESIZE


class Transient(Protocol):
    """A mapping made for one request (a Xen grant mapping): released when it completes."""

    def close(self) -> bool:
        """Unmap; False while views into the mapping are still alive."""


class GuestMemoryError(Exception):
    """An access outside the memory the guest gave us."""

    def __init__(self, addr: int, length: int, why: str = "outside guest memory") -> None:
        super().__init__(f"guest range [{addr:#x}, +{length:#x}) {why}")
        self.addr = addr
        self.length = length


@dataclass(eq=False)
class MemoryRegion:
    """A contiguous range of guest-physical addresses backed by a host buffer.

    ``view`` covers exactly ``size`` bytes starting at guest-physical address ``gpa``.
    ``owner`` is whatever keeps the mapping alive (an ``mmap``), closed on :meth:`close`.
    """

    gpa: int
    size: int
    view: memoryview
    owner: mmap.mmap | None = None
    #: Free-form description for logs (e.g. the vhost-user userspace address).
    label: str = ""
    end: int = field(init=False)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.gpa < 0:
            raise ValueError(f"bad region gpa={self.gpa:#x} size={self.size:#x}")
        if len(self.view) != self.size:
            raise ValueError("region view does not match its size")
        self.end = self.gpa + self.size

    @classmethod
    def anonymous(cls, gpa: int, size: int) -> MemoryRegion:
        """Private zero-filled memory (for tests and the in-process driver)."""
        m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        return cls(gpa, size, memoryview(m), m, "anonymous")

    @classmethod
    def from_fd(
        cls, gpa: int, size: int, fd: int, offset: int = 0, label: str = ""
    ) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` at ``offset``, which need not be page-aligned."""
        if offset < 0:
            raise ValueError("negative mmap offset")
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        skip = offset - aligned
        m = mmap.mmap(fd, size + skip, flags=mmap.MAP_SHARED, offset=aligned)
        view = memoryview(m)[skip : skip + size]
        return cls(gpa, size, view, m, label or f"fd {fd}+{offset:#x}")

    @classmethod
    def memfd(cls, gpa: int, size: int, name: str = "guest-ram") -> tuple[MemoryRegion, int]:
        """A region on a fresh memfd that can be passed to another process: (region, fd).

        Sealed against growing and shrinking, as QEMU's memory-backend-memfd is: the process
        it goes to can map it without fearing that it shrinks under the mapping."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except BaseException:
            os.close(fd)
            raise
        return cls.from_fd(gpa, size, fd, 0, f"memfd {name}"), fd

    def close(self) -> None:
        """Unmap. Fails with BufferError while views into the region are still alive."""
        self.view.release()
        if self.owner is not None:
            self.owner.close()


class GuestMemory:
    """The guest-physical address space: a sorted set of non-overlapping regions."""

    #: Most bytes one request may have mapped through :meth:`buffers` at once. Memory that
    #: maps on demand into a bounded cache lowers it so that one request cannot blow the bound;
    #: memory mapped for good costs nothing per request (a chain is at most 4 GiB anyway).
    max_mapped_per_request = 1 << 32

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        for region in regions:
            self.add(region)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add(self, region: MemoryRegion) -> None:
        i = bisect.bisect_right(self._starts, region.gpa)
        if i > 0 and self._regions[i - 1].end > region.gpa:
            raise ValueError(f"region at {region.gpa:#x} overlaps {self._regions[i - 1].gpa:#x}")
        if i < len(self._regions) and region.end > self._regions[i].gpa:
            raise ValueError(f"region at {region.gpa:#x} overlaps {self._regions[i].gpa:#x}")
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def remove(self, gpa: int, size: int) -> MemoryRegion:
        """Take out the region that starts at ``gpa`` with ``size`` bytes; the caller closes it."""
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._regions) or self._regions[i].gpa != gpa or self._regions[i].size != size:
            raise KeyError(f"no region at {gpa:#x} of size {size:#x}")
        del self._starts[i]
        return self._regions.pop(i)

    def close(self) -> None:
        while self._regions:
            self._starts.pop()
            self._regions.pop().close()

    def _region(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self._regions[i]
            if addr < region.end:
                return region
        return None

    def direct_regions(self) -> list[tuple[int, int, memoryview]]:
        """(start, end, view) of every region mapped for good, for the ring's fast path.

        Subclasses that map on demand return only what they never unmap (possibly nothing);
        everything else goes through :meth:`buffers`.
        """
        return [(r.gpa, r.end, r.view) for r in self._regions]

    def buffers(
        self, addr: int, length: int, writable: bool, hold: list[Transient] | None = None
    ) -> list[memoryview]:
        """Views covering guest range ``[addr, addr+length)``, one per region it touches.

        ``writable`` says whether the device will write to the range; read-only ranges come back
        as read-only views so that the device cannot write where the guest did not allow it.
        Memory that maps ranges for one request only appends those mappings to ``hold``; the
        caller closes them once the request is complete (before it is returned to the guest).
        """
        out: list[memoryview] = []
        pos, left = addr, length
        while left > 0:
            region = self._region(pos)
            if region is None:
                raise GuestMemoryError(addr, length)
            off = pos - region.gpa
            n = min(left, region.size - off)
            view = region.view[off : off + n]
            out.append(view if writable else view.toreadonly())
            pos += n
            left -= n
        return out

    def settle(self, hold: list[Transient]) -> None:
        """Complete what the buffers given out for one request (with ``hold``) still wait for,
        before the device reads them: a memory that copies a request's readable buffers in
        copies them all here, at once. GuestMemoryError if that fails. Nothing to do here."""

    def ring(self, addr: int, length: int) -> memoryview:
        """A writable view of a virtqueue area, which must lie inside one region."""
        region = self._region(addr)
        if region is None or addr + length > region.end or length <= 0:
            raise GuestMemoryError(addr, length, "is not inside one guest memory region")
        off = addr - region.gpa
        return region.view[off : off + length]

    # Convenience accessors, for drivers and tests (not the data path).

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.buffers(addr, length, False))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for view in self.buffers(addr, len(src), True):
            view[:] = src[pos : pos + len(view)]
            pos += len(view)
