"""The front-end's memory table: the guest's RAM regions, mapped from the fds it sends.

SET_MEM_TABLE replaces the whole table; ADD_MEM_REG and REM_MEM_REG (CONFIGURE_MEM_SLOTS)
change one region. Every change is checked completely before anything is mapped or unmapped,
so a refused message leaves the installed regions exactly as they were. The fds stay the
caller's: a mapping does not need its fd once it is made, so the session closes every fd of a
message after handling it, whatever happened.

Each change produces a new :class:`~pyvirtio.memory.guest.GuestMemory`; the session installs
it while the device's queues are paused. Regions that left the table are unmapped afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pyvirtio.memory.guest import GuestMemory, MemoryRegion
from pyvirtio.shims.vhost_user.fds import PeerFdError, check_memory_fd
from pyvirtio.vhost_user.protocol import MemoryRegionDesc

log = logging.getLogger(__name__)

#: Memory slots offered with CONFIGURE_MEM_SLOTS (a bound on what one front-end can map).
MAX_MEM_SLOTS = 32


class MemoryTableError(Exception):
    """A memory table change that cannot be made; nothing was changed."""


Entry = tuple[MemoryRegionDesc, MemoryRegion]


def _overlap(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size


class MemoryTable:
    """The regions one front-end gave, and the guest memory they make."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    # -- checks before mapping -----------------------------------------------------------------

    @staticmethod
    def _check_layout(descs: Sequence[MemoryRegionDesc]) -> None:
        """No empty region, and no two regions overlapping in guest or user addresses."""
        for i, desc in enumerate(descs):
            if desc.size == 0:
                raise MemoryTableError(f"memory region at {desc.guest_addr:#x} of size 0")
            if desc.guest_addr + desc.size > 1 << 64 or desc.user_addr + desc.size > 1 << 64:
                raise MemoryTableError(f"memory region at {desc.guest_addr:#x} wraps around")
            for other in descs[:i]:
                if _overlap(desc.guest_addr, desc.size, other.guest_addr, other.size):
                    raise MemoryTableError(
                        f"region at {desc.guest_addr:#x} overlaps {other.guest_addr:#x}"
                    )
                if _overlap(desc.user_addr, desc.size, other.user_addr, other.size):
                    raise MemoryTableError(
                        f"region at user address {desc.user_addr:#x} overlaps {other.user_addr:#x}"
                    )

    @staticmethod
    def _map(desc: MemoryRegionDesc, fd: int) -> MemoryRegion:
        try:
            check_memory_fd(fd, desc.mmap_offset, desc.size, f"region at {desc.guest_addr:#x}")
            return MemoryRegion.from_fd(
                desc.guest_addr,
                desc.size,
                fd,
                desc.mmap_offset,
                label=f"user {desc.user_addr:#x}",
            )
        except PeerFdError as exc:
            raise MemoryTableError(str(exc)) from None
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryTableError(f"cannot map region at {desc.guest_addr:#x}: {exc}") from None

    @classmethod
    def _map_all(cls, pairs: Sequence[tuple[MemoryRegionDesc, int]]) -> list[Entry]:
        mapped: list[Entry] = []
        try:
            for desc, fd in pairs:
                mapped.append((desc, cls._map(desc, fd)))
        except MemoryTableError:
            for _, region in mapped:
                region.close()
            raise
        return mapped

    # -- changes -------------------------------------------------------------------------------

    def prepare_table(self, pairs: Sequence[tuple[MemoryRegionDesc, int]]) -> list[Entry]:
        """Map a whole new table (SET_MEM_TABLE); raises MemoryTableError, mapping nothing."""
        self._check_layout([desc for desc, _ in pairs])
        return self._map_all(pairs)

    def prepare_add(self, desc: MemoryRegionDesc, fd: int) -> list[Entry]:
        """The table with one more region (ADD_MEM_REG)."""
        if len(self.entries) >= MAX_MEM_SLOTS:
            raise MemoryTableError(f"more than {MAX_MEM_SLOTS} memory regions")
        self._check_layout([*(d for d, _ in self.entries), desc])
        return [*self.entries, *self._map_all([(desc, fd)])]

    def prepare_remove(self, desc: MemoryRegionDesc) -> list[Entry]:
        """The table without the region ``desc`` names (REM_MEM_REG)."""
        key = (desc.guest_addr, desc.size, desc.user_addr)
        keep = [(d, r) for d, r in self.entries if (d.guest_addr, d.size, d.user_addr) != key]
        if len(keep) == len(self.entries):
            raise MemoryTableError(f"no memory region at guest address {desc.guest_addr:#x}")
        return keep

    def discard(self, entries: list[Entry]) -> None:
        """Unmap what a prepared table mapped anew, when it is not installed after all; the
        installed regions stay."""
        for _, region in entries:
            if all(region is not r for _, r in self.entries):
                region.close()

    def install(self, entries: list[Entry]) -> GuestMemory:
        """Make ``entries`` the table (the device's queues are paused); returns its guest
        memory. Regions that left the table are unmapped."""
        memory = GuestMemory(region for _, region in entries)
        old, self.entries = self.entries, entries
        for _, region in old:
            if all(region is not r for _, r in entries):
                _unmap(region)
        return memory

    def close(self) -> None:
        for _, region in self.entries:
            _unmap(region)
        self.entries = []

    # -- addresses -----------------------------------------------------------------------------

    def user_to_guest(self, addr: int) -> int | None:
        """The guest address of a front-end user (virtual) address, as vring addresses are."""
        for desc, _ in self.entries:
            if desc.user_addr <= addr < desc.user_addr + desc.size:
                return addr - desc.user_addr + desc.guest_addr
        return None


def _unmap(region: MemoryRegion) -> None:
    try:
        region.close()
    except BufferError:
        log.warning("region at %#x still in use; it is unmapped when released", region.gpa)
