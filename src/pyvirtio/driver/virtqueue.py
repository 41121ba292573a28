"""The driver side of a split virtqueue, as Linux's virtio_ring.c does it.

Used by the in-process driver to play the guest: it lays out the rings in guest memory, adds
buffers (directly chained or through an indirect table), publishes them and collects used
entries, with the barriers §2.7.13 asks of a driver. Tests that need a hostile guest also use its
raw accessors to write whatever they like into the rings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyvirtio.memory.barrier import acquire_fence, full_fence, release_fence
from pyvirtio.memory.guest import GuestMemory
from pyvirtio.spec import ring
from pyvirtio.spec.ring import DESC, DESC_SIZE, AvailFlag, DescFlag, UsedFlag

#: A guest buffer: (guest-physical address, length).
Buffer = tuple[int, int]


class GuestAllocator:
    """First-fit allocation of guest-physical ranges inside one region, for the driver's use."""

    def __init__(self, base: int, size: int) -> None:
        self._free: list[tuple[int, int]] = [(base, size)]

    def alloc(self, size: int, align: int = 16) -> int:
        for i, (start, length) in enumerate(self._free):
            aligned = -(-start // align) * align
            pad = aligned - start
            if length - pad >= size:
                pieces = []
                if pad:
                    pieces.append((start, pad))
                if length - pad - size:
                    pieces.append((aligned + size, length - pad - size))
                self._free[i : i + 1] = pieces
                return aligned
        raise MemoryError(f"guest allocator: no room for {size} bytes")

    def free(self, addr: int, size: int) -> None:
        self._free.append((addr, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged


@dataclass
class _Pending:
    token: Any
    count: int  # descriptors taken from the table
    indirect: tuple[int, int] | None  # (addr, size) of an indirect table to free


class DriverQueue:
    """A split virtqueue in guest memory, driver side."""

    def __init__(
        self,
        memory: GuestMemory,
        allocator: GuestAllocator,
        index: int,
        size: int,
        *,
        event_idx: bool,
        indirect: bool,
        legacy_align: int | None = None,
    ) -> None:
        self.memory = memory
        self.allocator = allocator
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.use_indirect = indirect
        if legacy_align is not None:
            base = allocator.alloc(ring.legacy_ring_bytes(size, legacy_align), 4096)
            desc, avail, used = ring.legacy_layout(size, legacy_align)
            self.desc_addr, self.avail_addr, self.used_addr = base + desc, base + avail, base + used
        else:
            self.desc_addr = allocator.alloc(ring.desc_table_size(size), ring.DESC_ALIGN)
            self.avail_addr = allocator.alloc(ring.avail_ring_size(size), ring.AVAIL_ALIGN)
            self.used_addr = allocator.alloc(ring.used_ring_size(size), ring.USED_ALIGN)
        for addr, n in (
            (self.desc_addr, ring.desc_table_size(size)),
            (self.avail_addr, ring.avail_ring_size(size)),
            (self.used_addr, ring.used_ring_size(size)),
        ):
            memory.write(addr, bytes(n))
        self._desc = memory.ring(self.desc_addr, ring.desc_table_size(size))
        self._avail = memory.ring(self.avail_addr, ring.avail_ring_size(size)).cast("H")
        used_area = memory.ring(self.used_addr, ring.used_ring_size(size))
        self._used16 = used_area.cast("H")
        self._used32 = used_area[: 4 + ring.USED_ELEM_SIZE * size].cast("I")
        # Free descriptors are chained through their next fields, as in Linux.
        for i in range(size - 1):
            self.write_desc(i, 0, 0, 0, i + 1)
        self.free_head = 0
        self.num_free = size
        self.avail_idx = 0
        self.last_used_idx = 0
        self._kicked_avail = 0
        self._pending: dict[int, _Pending] = {}

    # -- raw ring access (also for tests that play a hostile guest) ----------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        DESC.pack_into(self._desc, i * DESC_SIZE, addr, length, flags, nxt)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        value: tuple[int, int, int, int] = DESC.unpack_from(self._desc, i * DESC_SIZE)
        return value

    def publish_heads(self, heads: Sequence[int]) -> None:
        """Put ``heads`` in the available ring and make them visible (§2.7.13.2)."""
        for head in heads:
            self._avail[2 + (self.avail_idx & (self.size - 1))] = head
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        release_fence()
        self._avail[1] = self.avail_idx

    def set_avail_idx(self, value: int) -> None:
        """Overwrite avail->idx (hostile-guest tests)."""
        release_fence()
        self._avail[1] = value & 0xFFFF

    @property
    def used_idx(self) -> int:
        value: int = self._used16[1]
        acquire_fence()
        return value

    def used_elem(self, slot: int) -> tuple[int, int]:
        i = 1 + 2 * (slot & (self.size - 1))
        return self._used32[i], self._used32[i + 1]

    # -- normal operation ----------------------------------------------------------------------

    def add(
        self, out: Sequence[Buffer], in_: Sequence[Buffer], token: Any, indirect: bool | None = None
    ) -> int:
        """Add one request (device-readable ``out`` then device-writable ``in_``); returns head."""
        buffers = [(a, n, 0) for a, n in out] + [(a, n, int(DescFlag.WRITE)) for a, n in in_]
        if not buffers:
            raise ValueError("a request needs at least one buffer")
        use_indirect = self.use_indirect and len(buffers) > 1 if indirect is None else indirect
        if use_indirect:
            table_size = DESC_SIZE * len(buffers)
            table = self.allocator.alloc(table_size, 16)
            raw = bytearray(table_size)
            for i, (a, n, f) in enumerate(buffers):
                more = i + 1 < len(buffers)
                DESC.pack_into(
                    raw,
                    i * DESC_SIZE,
                    a,
                    n,
                    f | (DescFlag.NEXT if more else 0),
                    i + 1 if more else 0,
                )
            self.memory.write(table, raw)
            buffers = [(table, table_size, int(DescFlag.INDIRECT))]
            indirect_info: tuple[int, int] | None = (table, table_size)
        else:
            indirect_info = None
        if len(buffers) > self.num_free:
            if indirect_info:
                self.allocator.free(*indirect_info)
            raise BufferError(
                f"queue {self.index}: {len(buffers)} descriptors, {self.num_free} free"
            )
        head = i = self.free_head
        for k, (a, n, f) in enumerate(buffers):
            nxt = self.read_desc(i)[3]
            last = k == len(buffers) - 1
            self.write_desc(i, a, n, f | (0 if last else DescFlag.NEXT), nxt)
            if not last:
                i = nxt
        self.free_head = self.read_desc(i)[3]
        self.num_free -= len(buffers)
        self._pending[head] = _Pending(token, len(buffers), indirect_info)
        self.publish_heads([head])
        return head

    def kick_prepare(self) -> bool:
        """Whether the device wants a notification for what was added since the last one."""
        full_fence()
        old, new = self._kicked_avail, self.avail_idx
        self._kicked_avail = new
        if self.event_idx:
            return ring.need_event(self._used16[2 + 4 * self.size], new, old)
        return not self._used16[0] & UsedFlag.NO_NOTIFY

    def get_used(self) -> list[tuple[Any, int]]:
        """Collect completed requests as (token, written length), freeing their descriptors."""
        done: list[tuple[Any, int]] = []
        end = self.used_idx
        while self.last_used_idx != end:
            head, length = self.used_elem(self.last_used_idx)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            pending = self._pending.pop(head, None)
            if pending is None:
                raise RuntimeError(f"queue {self.index}: device returned unknown head {head}")
            self._free_chain(head, pending.count)
            if pending.indirect:
                self.allocator.free(*pending.indirect)
            done.append((pending.token, length))
        if self.event_idx:
            self._avail[2 + self.size] = self.last_used_idx
        return done

    def _free_chain(self, head: int, count: int) -> None:
        i = head
        for _ in range(count - 1):
            i = self.read_desc(i)[3]
        addr, length, flags, _ = self.read_desc(i)
        self.write_desc(i, addr, length, flags, self.free_head)
        self.free_head = head
        self.num_free += count

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self._avail[0] = AvailFlag.NO_INTERRUPT

    def enable_interrupts(self) -> None:
        if self.event_idx:
            self._avail[2 + self.size] = self.last_used_idx
        else:
            self._avail[0] = 0
        full_fence()

    @property
    def in_flight(self) -> int:
        return len(self._pending)
