"""Xen guest memory without Xen: foreign mappings stood in for by mappings of the in-process
guest's own RAM, to test what the map cache and the IOREQ shim do with hostile requests and
memory map changes (issue: hostile peers, Xen)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.virtqueue import DriverQueue
from pyvirtio.memory.guest import GuestMemoryError
from pyvirtio.shims.inprocess import GUEST_RAM_BASE, InProcessMachine
from pyvirtio.shims.xen.config import DiskConfig
from pyvirtio.shims.xen.daemon import Disk, DiskInterrupt, Guest
from pyvirtio.shims.xen.gntdev import GRANT_DMA_ADDR_OFF, CopySegment, Gntdev
from pyvirtio.shims.xen.memory import BUCKET_PAGES, ForeignGuestMemory
from pyvirtio.shims.xen.privcmd import PAGE_SHIFT, ForeignMapping, Privcmd
from pyvirtio.shims.xen.server import GuestServer
from pyvirtio.spec.blk import REQ_HEADER, BlkRequestType, BlkStatus
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ring import DESC, DescFlag
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.storage.raw import RawImage

from .echo import EchoDevice

RAM = 64 << 20
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


class _Mapping(ForeignMapping):
    def __init__(
        self, owner: FakePrivcmd, m: mmap.mmap, gfn: int, count: int, errors: dict[int, int]
    ) -> None:
        super().__init__(m, gfn, count, errors)
        self.owner = owner
        owner.live_pages += count
        owner.peak_pages = max(owner.peak_pages, owner.live_pages)

    def unmapped(self) -> None:
        self.owner.live_pages -= self.count


class FakePrivcmd:
    """privcmd.map() of a guest whose RAM is one memfd at GUEST_RAM_BASE."""

    def __init__(self, ram_fd: int, size: int) -> None:
        self.fd = ram_fd
        self.first = GUEST_RAM_BASE >> PAGE_SHIFT
        self.pages = size >> PAGE_SHIFT
        self.live_pages = 0
        self.peak_pages = 0
        #: Frames no longer the guest's RAM (given back, or replaced by a Xen page).
        self.holes: set[int] = set()

    def map(self, domid: int, gfn: int, count: int) -> ForeignMapping:
        if self.first <= gfn and gfn + count <= self.first + self.pages:
            m = mmap.mmap(self.fd, count << PAGE_SHIFT, offset=(gfn - self.first) << PAGE_SHIFT)
            holes = {i: errno.ENOENT for i in range(count) if gfn + i in self.holes}
            return _Mapping(self, m, gfn, count, holes)
        # Not RAM of the guest: Xen refuses every frame (what is mapped is never touched).
        refused = dict.fromkeys(range(count), errno.EINVAL)
        return _Mapping(self, mmap.mmap(-1, count << PAGE_SHIFT), gfn, count, refused)

    def close(self) -> None:
        pass


class XenLike:
    """A threaded in-process disk whose device reaches the RAM through ForeignGuestMemory."""

    def __init__(self, image_path: Path, **memory_kw: object) -> None:
        self.image = RawImage(str(image_path))
        self.device = BlkDevice(self.image, queue_size=128)
        self.machine = InProcessMachine(self.device, memory_size=RAM, threaded=True)
        self.privcmd = FakePrivcmd(self.machine.ram_fds[0], RAM)
        self.memory = ForeignGuestMemory(
            cast(Privcmd, self.privcmd),
            1,
            ram_windows=[(GUEST_RAM_BASE, RAM)],
            **memory_kw,  # type: ignore[arg-type]
        )
        with self.device.queues_paused():
            self.device.set_memory(self.memory)
        self.driver = BlkDriver(self.machine.driver(), wait=self.machine.wait_interrupt)
        config = DiskConfig(
            frontend_id=1,
            devid=51712,
            image=str(image_path),
            read_only=False,
            base=0x0200_0000,
            irq=33,
        )
        assert self.machine.runner is not None
        interrupt = cast(DiskInterrupt, None)  # the in-process machine raises its own
        self.disk = Disk(
            config, "", self.device, self.machine.transport, self.machine.runner, interrupt, []
        )
        self.guest = Guest(1, cast(Privcmd, self.privcmd), self.memory, cast(GuestServer, None))
        self.guest.disks[51712] = self.disk

    def close(self) -> None:
        self.machine.close()
        self.memory.close()
        self.image.close()


@pytest.fixture
def xen_like(image_path: Path) -> Iterator[XenLike]:
    made: list[XenLike] = []

    def make(**kw: object) -> XenLike:
        x = XenLike(image_path, **kw)
        made.append(x)
        return x

    yield make  # type: ignore[misc]
    for x in made:
        x.close()


def test_invalidate_under_static_mapping_keeps_the_disk_working(xen_like) -> None:  # type: ignore[no-untyped-def]
    """IOREQ INVALIDATE dropped the buckets that the rings and the fast path still used:
    the next request failed, the worker died, and a reset did not bring it back."""
    x = xen_like(static=True)
    data = os.urandom(64 * 1024)
    x.driver.write(0, data)
    x.guest.invalidate()
    assert x.driver.read(0, len(data)) == data
    x.driver.write(256, data)
    x.guest.invalidate()
    assert x.driver.read(256, len(data)) == data
    assert not x.device.status & DeviceStatus.NEEDS_RESET
    assert not x.memory.static  # fell back to dynamic mapping at the first invalidation


def test_static_mapping_covers_the_ram_past_a_hole() -> None:
    """A page Xen refuses inside the RAM (one the guest gave back) does not end the static
    mapping: the buckets after it are mapped, and only a buffer in the hole fails."""
    fd = os.memfd_create("ram")
    os.ftruncate(fd, RAM)
    privcmd = FakePrivcmd(fd, RAM)
    hole = privcmd.first + BUCKET_PAGES + 7  # a page in the second bucket
    privcmd.holes.add(hole)
    memory = ForeignGuestMemory(
        cast(Privcmd, privcmd), 1, static=True, ram_windows=[(GUEST_RAM_BASE, RAM)]
    )
    try:
        buckets = RAM // (BUCKET_PAGES << PAGE_SHIFT)
        assert memory.mapped_pages == buckets * BUCKET_PAGES
        assert len(memory.direct_regions()) == buckets - 1  # all but the one with the hole
        addr = hole << PAGE_SHIFT
        assert memory.buffers(addr - 4096, 4096, writable=False)  # the page before: mapped
        with pytest.raises(GuestMemoryError):
            memory.buffers(addr, 16, writable=False)
        last = (privcmd.first + privcmd.pages - 1) << PAGE_SHIFT
        assert memory.buffers(last, 4096, writable=True)  # past the hole: mapped
    finally:
        memory.close()
        os.close(fd)


def test_invalidate_with_requests_in_flight_under_dynamic_mapping(xen_like) -> None:  # type: ignore[no-untyped-def]
    x = xen_like(max_pages=4 * BUCKET_PAGES)
    data = os.urandom(1 << 20)
    reqs = [
        x.driver.submit(BlkRequestType.OUT, i * 2048, data_out=data, kick=True) for i in range(4)
    ]
    x.guest.invalidate()
    x.driver.wait(reqs)
    assert all(r.status == BlkStatus.OK for r in reqs)
    for i in range(4):
        assert x.driver.read(i * 2048, len(data)) == data


def test_one_request_cannot_map_past_the_cache_bound(xen_like) -> None:  # type: ignore[no-untyped-def]
    """A chain of 1000 descriptors of 4 MiB each (a refused request: its header is garbage)
    used to map every bucket it named; now a request maps at most half the cache's worth."""
    x = xen_like(max_pages=4 * BUCKET_PAGES)
    transport = x.driver.transport
    mem, alloc = transport.memory, transport.allocator
    q = transport.queues[0]
    status = alloc.alloc(1)
    mem.write(status, b"\xff")
    header = alloc.alloc(16)
    mem.write(header, REQ_HEADER.pack(0xDEAD, 0, 0))
    entries = [(header, 16, 0)]
    entries += [(GUEST_RAM_BASE + (i % 16) * (4 << 20), 4 << 20, 0) for i in range(1000)]
    entries.append((status, 1, WRITE))
    table = alloc.alloc(16 * len(entries))
    for i, (addr, length, flags) in enumerate(entries):
        last = i == len(entries) - 1
        mem.write(table + 16 * i, DESC.pack(addr, length, flags | (0 if last else NEXT), i + 1))
    q.write_desc(q.free_head, table, 16 * len(entries), INDIRECT, 0)
    q.publish_heads([q.free_head])
    transport.notify(0)
    for _ in range(100):
        if mem.read(status, 1)[0] != 0xFF:
            break
        x.machine.wait_interrupt(0.1)
    assert mem.read(status, 1)[0] == BlkStatus.IOERR
    bound = x.memory.max_buckets * BUCKET_PAGES
    per_request = x.memory.max_mapped_per_request >> PAGE_SHIFT
    assert x.privcmd.peak_pages <= bound + per_request + 64  # + rings and the status byte
    assert x.memory.mapped_pages <= bound


def test_requests_that_find_the_cache_held_map_their_own_pages(xen_like) -> None:  # type: ignore[no-untyped-def]
    """Scattered buffers of requests in flight hold every bucket: the cache stays within its
    bound, and the requests still complete."""
    x = xen_like(max_pages=4 * BUCKET_PAGES)
    data = os.urandom(1 << 20)
    x.driver.write(0, data * 8)
    assert x.driver.read(0, len(data) * 8) == data * 8
    assert x.memory.peak_buckets <= x.memory.max_buckets


class FakeGntdev:
    """Grant ``ref`` is page ``ref`` of the in-process RAM; refused references fail with
    GNTST_general_error. Records the used index at each copy to the guest."""

    def __init__(self, machine: InProcessMachine) -> None:
        self.machine = machine
        self.used_ring = 0
        self.refused: set[int] = set()
        self.copies = 0
        self.copied_out_at_used_idx: list[int] = []

    def copy(self, domid: int, segments: list[CopySegment], to_guest: bool) -> list[int]:
        self.copies += 1
        memory = self.machine.memory
        if to_guest:
            used_idx = int.from_bytes(memory.read(self.used_ring + 2, 2), "little")
            self.copied_out_at_used_idx.append(used_idx)
        statuses = []
        for seg in segments:
            if seg.ref in self.refused:
                statuses.append(-1)
                continue
            guest = GUEST_RAM_BASE + (seg.ref << PAGE_SHIFT) + seg.offset
            if to_guest:
                memory.write(guest, ctypes.string_at(seg.address, seg.length))
            else:
                ctypes.memmove(seg.address, memory.read(guest, seg.length), seg.length)
            statuses.append(0)
        return statuses


def _grant(addr: int) -> int:
    """The grant DMA address of guest-physical ``addr`` under FakeGntdev's numbering."""
    return GRANT_DMA_ADDR_OFF | (addr - GUEST_RAM_BASE)


@pytest.fixture
def grant_machine() -> Iterator[tuple[InProcessMachine, FakeGntdev, DriverQueue]]:
    device = EchoDevice(queue_size=16)
    machine = InProcessMachine(device, memory_size=RAM)
    privcmd = FakePrivcmd(machine.ram_fds[0], RAM)
    memory = ForeignGuestMemory(cast(Privcmd, privcmd), 1, ram_windows=[(GUEST_RAM_BASE, RAM)])
    gntdev = FakeGntdev(machine)
    memory.gntdev = cast(Gntdev, gntdev)
    device.set_memory(memory)
    drv = machine.driver()
    drv.negotiate(bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC))
    q = drv.setup_queues(1)[0]
    gntdev.used_ring = q.used_addr
    drv.driver_ok()
    yield machine, gntdev, q
    machine.close()
    memory.close()


def test_grant_buffers_are_copied_and_written_back_before_the_used_index_moves(
    grant_machine: tuple[InProcessMachine, FakeGntdev, DriverQueue],
) -> None:
    """A request's grant buffers are copied, not mapped: what the device reads is copied in as
    the chain is walked, what it writes goes out in one copy for the whole request, before the
    driver can see the request completed. A buffer may span pages (consecutive grants)."""
    machine, gntdev, q = grant_machine
    src = machine.allocator.alloc(3 * 4096, 4096) + 4000  # 6000 bytes over 3 pages
    dst1, dst2 = machine.allocator.alloc(4096, 4096) + 100, machine.allocator.alloc(8192, 4096)
    data = os.urandom(6000)
    machine.memory.write(src, data)
    q.add([(_grant(src), 6000)], [(_grant(dst1), 96), (_grant(dst2), 5904)], "r", indirect=False)
    machine.driver().notify(0)
    assert q.get_used() == [("r", 6000)]
    assert machine.memory.read(dst1, 96) + machine.memory.read(dst2, 5904) == data
    assert gntdev.copied_out_at_used_idx == [0]  # one copy out, before used->idx moved
    assert gntdev.copies == 2  # the readable buffer in, both writable ones out


def test_a_requests_readable_grant_buffers_are_copied_in_one_call(
    grant_machine: tuple[InProcessMachine, FakeGntdev, DriverQueue],
) -> None:
    """Three device-readable buffers, listed in the descriptor table and then in an indirect
    table (which this driver puts at a guest-physical address): one copy in for them all,
    one out."""
    machine, gntdev, q = grant_machine
    parts = [os.urandom(n) for n in (16, 4096, 700)]
    srcs = [machine.allocator.alloc(4096, 4096) for _ in parts]
    for src, part in zip(srcs, parts, strict=True):
        machine.memory.write(src, part)
    dst = machine.allocator.alloc(8192, 4096)
    for indirect in (False, True):
        gntdev.copies = 0
        readable = [(_grant(src), len(p)) for src, p in zip(srcs, parts, strict=True)]
        q.add(readable, [(_grant(dst), 4812)], "r", indirect=indirect)
        machine.driver().notify(0)
        assert q.get_used() == [("r", 4812)]
        assert machine.memory.read(dst, 4812) == b"".join(parts)
        assert gntdev.copies == 2, indirect


def test_a_grant_the_guest_did_not_give_fails_the_request(
    grant_machine: tuple[InProcessMachine, FakeGntdev, DriverQueue],
) -> None:
    machine, gntdev, q = grant_machine
    src, dst = machine.allocator.alloc(4096, 4096), machine.allocator.alloc(4096, 4096)
    machine.memory.write(src, b"ping")
    machine.memory.write(dst, b"....")
    gntdev.refused.add((src - GUEST_RAM_BASE) >> PAGE_SHIFT)
    q.add([(_grant(src), 4)], [(_grant(dst), 4)], "r", indirect=False)
    machine.driver().notify(0)
    assert q.get_used() == [("r", 0)]  # the echo device completes a faulted chain empty
    assert machine.memory.read(dst, 4) == b"...."
