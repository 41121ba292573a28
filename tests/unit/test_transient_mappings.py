"""Mappings made for one request (Xen grants) are closed before the request is returned."""

from __future__ import annotations

from pyvirtio.memory.guest import GuestMemory, Transient
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.shims.xen.gntdev import GRANT_DMA_ADDR_OFF, split_grant_address
from pyvirtio.spec.features import Feature, bit

from .echo import EchoDevice


class _Mapping:
    def __init__(self, memory: GrantLikeMemory, view: memoryview) -> None:
        self.memory = memory
        self.view = view

    def close(self) -> bool:
        # What the guest could see when the mapping goes away: nothing completed yet.
        self.memory.closed_at_used_idx.append(self.memory.used_idx_in_ring())
        self.view.release()
        return True


class GrantLikeMemory(GuestMemory):
    """Addresses with bit 63 set are served from RAM at the same offset, 'mapped' per request."""

    def __init__(self, base: GuestMemory) -> None:
        super().__init__(base)
        self.closed_at_used_idx: list[int] = []
        self.used_ring = 0

    def used_idx_in_ring(self) -> int:
        return int.from_bytes(self.read(self.used_ring + 2, 2), "little")

    def buffers(
        self, addr: int, length: int, writable: bool, hold: list[Transient] | None = None
    ) -> list[memoryview]:
        if not addr & GRANT_DMA_ADDR_OFF:
            return super().buffers(addr, length, writable, hold)
        views = super().buffers(addr & ~GRANT_DMA_ADDR_OFF, length, writable)
        assert hold is not None, "per-request mappings need a holder"
        hold.append(_Mapping(self, views[0]))
        return views

    def direct_regions(self) -> list[tuple[int, int, memoryview]]:
        return []


def test_grant_address_split() -> None:
    assert split_grant_address(GRANT_DMA_ADDR_OFF | (77 << 12) | 0x123) == (77, 0x123)


def test_per_request_mappings_close_before_the_used_index_moves() -> None:
    device = EchoDevice(queue_size=16)
    machine = InProcessMachine(device, memory_size=1 << 20)
    memory = GrantLikeMemory(machine.memory)
    device.set_memory(memory)
    drv = machine.driver()
    drv.negotiate(bit(Feature.VERSION_1))
    q = drv.setup_queues(1)[0]
    memory.used_ring = q.used_addr
    drv.driver_ok()
    src, dst = machine.allocator.alloc(4), machine.allocator.alloc(4)
    machine.memory.write(src, b"ping")
    q.add([(src | GRANT_DMA_ADDR_OFF, 4)], [(dst | GRANT_DMA_ADDR_OFF, 4)], "r", indirect=False)
    drv.notify(0)
    assert q.get_used() == [("r", 4)]
    assert machine.memory.read(dst, 4) == b"ping"
    assert memory.closed_at_used_idx == [0, 0]  # both closed while used->idx was still 0
