"""A hostile guest, in-process: what one request may cost, resets under a running worker,
indices that jump (issue: hostile peers, device and ring)."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import DISCARD_SEGMENT, REQ_HEADER, BlkRequestType, BlkStatus
from pyvirtio.spec.mmio import Reg
from pyvirtio.spec.ring import DESC, DescFlag
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.storage.raw import RawImage
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue, VirtqueueError

from .conftest import IMAGE_SIZE, Blk

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


def _aliased_request(blk: Blk, first: bytes, alias_len: int, count: int) -> tuple[int, int]:
    """A chain through an indirect table: ``first`` as the first readable buffer, then
    ``count`` readable descriptors that all alias one ``alias_len`` buffer, then a status
    byte. Returns (head, status address)."""
    drv = blk.driver.transport
    mem, alloc = drv.memory, drv.allocator
    q = drv.queues[0]
    head_buf = alloc.alloc(len(first))
    mem.write(head_buf, first)
    alias = alloc.alloc(alias_len)
    status = alloc.alloc(1)
    mem.write(status, b"\xff")
    entries = [(head_buf, len(first), 0), *([(alias, alias_len, 0)] * count), (status, 1, WRITE)]
    table = alloc.alloc(16 * len(entries))
    for i, (addr, length, flags) in enumerate(entries):
        last = i == len(entries) - 1
        mem.write(table + 16 * i, DESC.pack(addr, length, flags | (0 if last else NEXT), i + 1))
    head = q.free_head
    q.write_desc(head, table, 16 * len(entries), INDIRECT, 0)
    q.publish_heads([head])
    return head, status


def _peak_while(fn: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_short_first_buffer_costs_only_the_header(make_blk: Callable[..., Blk]) -> None:
    """A first readable buffer shorter than the 16-byte header used to make the device join
    the whole readable part: 256 MiB for aliased descriptors. Only the header is copied."""
    blk = make_blk(queue_size=128)
    header = REQ_HEADER.pack(BlkRequestType.OUT, 0, 0)
    _, status = _aliased_request(blk, header[:8], 4 << 20, 64)
    # the remaining 8 header bytes arrive in the aliased buffer
    peak = _peak_while(lambda: blk.driver.transport.notify(0))
    assert peak < 1 << 20, f"{peak} bytes allocated for one request"
    assert blk.driver.transport.memory.read(status, 1)[0] in (BlkStatus.OK, BlkStatus.IOERR)


def test_discard_payload_is_checked_before_it_is_copied(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(queue_size=128)
    header = REQ_HEADER.pack(BlkRequestType.DISCARD, 0, 0)
    _, status = _aliased_request(blk, header, 4 << 20, 64)
    peak = _peak_while(lambda: blk.driver.transport.notify(0))
    assert peak < 1 << 20, f"{peak} bytes allocated for one request"
    assert blk.driver.transport.memory.read(status, 1)[0] == BlkStatus.UNSUPP


def test_zero_length_discard_segment_does_not_disable_hole_punching(blk: Blk) -> None:
    data = os.urandom(1 << 20)
    blk.driver.write(0, data)
    status = blk.driver.discard([(0, 0, 0)])
    assert status in (BlkStatus.OK, BlkStatus.IOERR)
    assert blk.driver.discard([(0, 2048, 0)]) == BlkStatus.OK
    assert os.stat(blk.path).st_blocks * 512 < (1 << 20) // 2, "the later discard freed nothing"
    assert blk.image.can_punch_holes


def test_avail_index_far_ahead_is_refused_before_any_buffer(blk: Blk) -> None:
    """An avail idx 1000 past the queue size: NEEDS_RESET, nothing used."""
    q = blk.driver.transport.queues[0]
    q.set_avail_idx(q.size + 1000)
    blk.driver.transport.notify(0)
    assert blk.driver.transport.status & DeviceStatus.NEEDS_RESET
    assert q.used_idx == 0


class GatedBlk(BlkDevice):
    """virtio-blk whose requests wait at a gate: a request stays in flight while a test acts."""

    def __init__(self, image: RawImage) -> None:
        super().__init__(image, queue_size=16)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.after_reset_writes = 0

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        self.entered.set()
        self.gate.wait(10)
        return super().handle_chain(queue, chain)


@pytest.mark.parametrize("how", ["status", "queue_ready"])
def test_reset_while_a_request_is_in_flight(image_path: Path, how: str) -> None:
    """STATUS=0 (or QueueReady=0) while the worker handles a request: once the register write
    returns, the device writes no more guest memory; the worker survives; after the driver
    re-initialises the device, requests complete."""
    image = RawImage(str(image_path))
    device = GatedBlk(image)
    machine = InProcessMachine(device, memory_size=4 << 20, threaded=True)
    try:
        drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
        transport = drv.transport
        req = drv.submit(BlkRequestType.IN, 0, in_len=4096)
        assert device.entered.wait(5)
        done = threading.Event()

        def reset() -> None:
            if how == "status":
                machine.write(Reg.STATUS, 4, 0)
            else:
                machine.write(Reg.QUEUE_SEL, 4, 0)
                machine.write(Reg.QUEUE_READY, 4, 0)
            done.set()

        resetter = threading.Thread(target=reset)
        resetter.start()
        time.sleep(0.2)
        device.gate.set()
        resetter.join(10)
        assert done.is_set()
        if how == "status":
            assert machine.read(Reg.STATUS, 4) == 0
        snapshot = bytes(next(iter(transport.memory)).view)
        time.sleep(0.3)
        assert bytes(next(iter(transport.memory)).view) == snapshot, "written after the reset"
        assert not req.done or req.status is not None
        # Re-initialise, as a kdump kernel would, and use the disk.
        device.entered.clear()
        transport.reset()
        drv2 = BlkDriver(transport, wait=machine.wait_interrupt)
        data = os.urandom(8192)
        drv2.write(8, data)
        assert drv2.read(8, len(data)) == data
        assert not transport.status & DeviceStatus.NEEDS_RESET
    finally:
        device.gate.set()
        machine.close()
        image.close()


def test_legacy_discard_segment_count_is_unsupp_beyond_the_limit(blk: Blk) -> None:
    limit = blk.driver.config.max_discard_seg
    payload = b"".join(DISCARD_SEGMENT.pack(8 * i, 8, 0) for i in range(limit + 1))
    req = blk.driver.request(BlkRequestType.DISCARD, data_out=payload)
    assert req.status == BlkStatus.UNSUPP
    assert IMAGE_SIZE


def test_has_available_refuses_an_index_far_ahead(blk: Blk) -> None:
    """The check pop() makes holds wherever avail->idx is read: a jump of 1000 past the queue
    size used to pass has_available(), and every buffer up to it was then served."""
    queue = blk.device.queues[0]
    blk.driver.transport.queues[0].set_avail_idx(queue.size + 1000)
    with pytest.raises(VirtqueueError):
        queue.has_available()
        queue.pop()
