"""In-flight tracking: a back-end that dies at any point resubmits exactly what it owed."""

from __future__ import annotations

import mmap

import pytest

from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.features import Feature, bit
from pyvirtio.virtqueue.inflight import InflightRegion, queue_region_size
from pyvirtio.virtqueue.split import SplitQueue

from .echo import EchoDevice

SIZE = 16
FEATURES = bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX)


class Rig:
    def __init__(self) -> None:
        self.area = mmap.mmap(-1, queue_region_size(SIZE))
        self.device = EchoDevice(queue_size=SIZE)
        self.device.queues[0].inflight = InflightRegion(memoryview(self.area), SIZE)
        self.machine = InProcessMachine(self.device, memory_size=1 << 20)
        self.driver = self.machine.driver()
        self.driver.negotiate(FEATURES)
        self.q = self.driver.setup_queues(1)[0]
        self.driver.driver_ok()

    def submit(self, n: int) -> None:
        for i in range(n):
            self.q.add(
                [(self.machine.allocator.alloc(1), 1)], [(self.machine.allocator.alloc(1), 1)], i
            )

    def restart(self) -> SplitQueue:
        """A new back-end: fresh queue state, the same rings, the same in-flight area."""
        old = self.device.queues[0]
        queue = SplitQueue(0, SIZE)
        queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = (
            old.size,
            old.desc_addr,
            old.avail_addr,
            old.used_addr,
        )
        old.inflight.release()  # type: ignore[union-attr]
        old.deactivate()
        queue.inflight = InflightRegion(memoryview(self.area), SIZE)
        queue.activate(
            self.machine.memory, event_idx=True, indirect=False, last_avail_idx=0, used_idx=None
        )
        return queue


def drain(queue: SplitQueue) -> list[int]:
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
        queue.push(chain.head, chain.write_len)
    queue.publish()
    return heads


def completed(rig: Rig) -> list[int]:
    return sorted(token for token, _ in rig.q.get_used())


@pytest.mark.parametrize("crash_point", ["popped", "pushed", "published"])
def test_restart_resubmits_only_what_was_owed(crash_point: str) -> None:
    rig = Rig()
    rig.submit(6)
    token = {head: pending.token for head, pending in rig.q._pending.items()}
    queue = rig.device.queues[0]
    done = [queue.pop(), queue.pop()]  # completed before the crash
    for chain in done:
        assert chain is not None
        queue.push(chain.head, 1)
    queue.publish()
    owed = [queue.pop(), queue.pop()]  # taken, and then the back-end dies
    assert all(c is not None for c in owed)
    if crash_point in ("pushed", "published"):
        for chain in owed:
            queue.push(chain.head, 1)  # type: ignore[union-attr]
    if crash_point == "published":
        # Died after used->idx moved but before the in-flight marks were cleared.
        used16 = queue._used16
        assert used16 is not None
        used16[1] = queue.used_idx
    region = queue.inflight
    assert region is not None
    assert region.is_inflight(owed[0].head)  # type: ignore[union-attr]

    new = rig.restart()
    served = [token[h] for h in drain(new)]
    if crash_point == "published":
        assert served == [4, 5]  # the owed two were delivered; only the untouched remain
    else:
        assert served == [2, 3, 4, 5]  # owed first, in the order they were taken
    assert completed(rig) == [0, 1, 2, 3, 4, 5]
    assert not any(new.inflight.is_inflight(h) for h in range(SIZE))  # type: ignore[union-attr]


def test_fresh_area_is_initialised_and_checked() -> None:
    area = mmap.mmap(-1, queue_region_size(SIZE))
    region = InflightRegion(memoryview(area), SIZE)
    assert area[8:10] == b"\x01\x00"  # version 1
    region.release()
    with pytest.raises(ValueError):
        InflightRegion(memoryview(area), SIZE * 2)  # desc_num mismatch
