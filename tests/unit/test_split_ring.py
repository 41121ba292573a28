"""The split virtqueue against well-formed and hostile rings (VIRTIO 1.2 §2.7)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.driver.mmio import MmioDriver
from pyvirtio.driver.virtqueue import DriverQueue
from pyvirtio.shims.inprocess import GUEST_RAM_BASE, InProcessMachine
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.mmio import Interrupt
from pyvirtio.spec.ring import DescFlag
from pyvirtio.spec.status import DeviceStatus

from .echo import EchoDevice

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
ALL = bit(Feature.RING_INDIRECT_DESC) | bit(Feature.RING_EVENT_IDX) | bit(Feature.VERSION_1)


class Rig:
    def __init__(self, features: int = ALL, queue_size: int = 16) -> None:
        self.device = EchoDevice(queue_size=queue_size)
        self.machine = InProcessMachine(self.device, memory_size=1 << 20)
        self.driver: MmioDriver = self.machine.driver()
        self.driver.negotiate(features)
        self.driver.setup_queues(1)
        self.driver.driver_ok()
        self.q: DriverQueue = self.driver.queues[0]
        self.mem = self.machine.memory
        self.alloc = self.machine.allocator

    def buf(self, data: bytes | int) -> int:
        size = data if isinstance(data, int) else len(data)
        addr = self.alloc.alloc(max(size, 1))
        if not isinstance(data, int):
            self.mem.write(addr, data)
        return addr

    def run(self, *heads: int) -> None:
        self.q.publish_heads(heads)
        self.driver.notify(0)

    @property
    def needs_reset(self) -> bool:
        return bool(self.driver.status & DeviceStatus.NEEDS_RESET)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.machine.close()


def test_direct_chain_round_trip(rig: Rig) -> None:
    a, b, out = rig.buf(b"hello "), rig.buf(b"world"), rig.buf(11)
    rig.q.write_desc(0, a, 6, NEXT, 1)
    rig.q.write_desc(1, b, 5, NEXT, 2)
    rig.q.write_desc(2, out, 11, WRITE, 0)
    rig.run(0)
    assert rig.device.seen == [(0, b"hello world", 11)]
    assert rig.q.used_elem(0) == (0, 11)
    assert rig.q.used_idx == 1
    assert rig.mem.read(out, 11) == b"hello world"


def test_indirect_chain_round_trip(rig: Rig) -> None:
    a, out = rig.buf(b"abc"), rig.buf(3)
    table = rig.buf(32)
    rig.mem.write(
        table,
        b"".join(
            [
                __import__("struct").pack("<QIHH", a, 3, NEXT, 1),
                __import__("struct").pack("<QIHH", out, 3, WRITE, 0),
            ]
        ),
    )
    rig.q.write_desc(5, table, 32, INDIRECT, 0)
    rig.run(5)
    assert rig.device.seen == [(5, b"abc", 3)]
    assert rig.mem.read(out, 3) == b"abc"


def test_zero_length_descriptor_is_skipped(rig: Rig) -> None:
    a, out = rig.buf(b"xy"), rig.buf(2)
    rig.q.write_desc(0, a, 2, NEXT, 1)
    rig.q.write_desc(1, 0xDEAD_BEEF_0000, 0, NEXT, 2)  # address never touched
    rig.q.write_desc(2, out, 2, WRITE, 0)
    rig.run(0)
    assert rig.device.seen == [(0, b"xy", 2)]
    assert not rig.needs_reset


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda r: r.q.write_desc(0, r.buf(4), 4, NEXT, 0), "loop to itself"),
        (lambda r: [r.q.write_desc(i, r.buf(4), 4, NEXT, (i + 1) % 3) for i in range(3)], "loop"),
        (lambda r: r.q.write_desc(0, r.buf(4), 4, NEXT, 16), "next out of range"),
        (
            lambda r: (
                r.q.write_desc(0, r.buf(4), 4, WRITE | NEXT, 1),
                r.q.write_desc(1, r.buf(4), 4, 0, 0),
            ),
            "readable after writable",
        ),
        (
            lambda r: (
                r.q.write_desc(0, r.buf(4), 0xFFFF_FFFF, NEXT, 1),
                r.q.write_desc(1, r.buf(4), 2, 0, 0),
            ),
            "total length over 4 GiB",
        ),
        (lambda r: r.q.write_desc(0, r.buf(48), 40, INDIRECT, 0), "indirect length % 16"),
        (lambda r: r.q.write_desc(0, r.buf(48), 0, INDIRECT, 0), "empty indirect table"),
        (lambda r: r.q.write_desc(0, r.buf(16 * 17), 16 * 17, INDIRECT, 0), "indirect > size"),
        (lambda r: r.q.write_desc(0, r.buf(32), 32, INDIRECT | NEXT, 1), "INDIRECT and NEXT"),
        (lambda r: r.q.write_desc(0, 0x10, 32, INDIRECT, 0), "indirect table outside memory"),
    ],
)
def test_malformed_chain_needs_reset(rig: Rig, build, why: str) -> None:  # type: ignore[no-untyped-def]
    build(rig)
    rig.run(0)
    assert rig.needs_reset, why
    assert rig.machine.transport.interrupt_status & Interrupt.CONFIG
    assert rig.device.seen == []


def test_nested_indirect_needs_reset(rig: Rig) -> None:
    import struct

    inner = rig.buf(16)
    rig.mem.write(inner, struct.pack("<QIHH", rig.buf(4), 4, 0, 0))
    outer = rig.buf(16)
    rig.mem.write(outer, struct.pack("<QIHH", inner, 16, INDIRECT, 0))
    rig.q.write_desc(0, outer, 16, INDIRECT, 0)
    rig.run(0)
    assert rig.needs_reset


def test_indirect_loop_inside_table_needs_reset(rig: Rig) -> None:
    import struct

    table = rig.buf(32)
    b = rig.buf(4)
    rig.mem.write(table, struct.pack("<QIHH", b, 4, NEXT, 1) + struct.pack("<QIHH", b, 4, NEXT, 0))
    rig.q.write_desc(0, table, 32, INDIRECT, 0)
    rig.run(0)
    assert rig.needs_reset


def test_indirect_without_negotiation_needs_reset() -> None:
    rig = Rig(features=bit(Feature.VERSION_1))
    rig.q.write_desc(0, rig.buf(16), 16, INDIRECT, 0)
    rig.run(0)
    assert rig.needs_reset


def test_head_out_of_range_needs_reset(rig: Rig) -> None:
    rig.run(200)
    assert rig.needs_reset


def test_avail_idx_jumping_past_queue_size_needs_reset(rig: Rig) -> None:
    rig.q.set_avail_idx(17)
    rig.driver.notify(0)
    assert rig.needs_reset


def test_buffer_outside_memory_is_a_fault_not_a_reset(rig: Rig) -> None:
    out = rig.buf(4)
    rig.q.write_desc(0, GUEST_RAM_BASE + (1 << 20) - 2, 4, NEXT, 1)  # straddles the end
    rig.q.write_desc(1, out, 4, WRITE, 0)
    rig.run(0)
    assert not rig.needs_reset
    assert rig.device.seen == [(0, b"", 4)]
    assert rig.q.used_idx == 1


def test_broken_device_stops_until_reset(rig: Rig) -> None:
    rig.run(200)
    assert rig.needs_reset
    rig.q.write_desc(0, rig.buf(b"a"), 1, 0, 0)
    rig.run(0)
    assert rig.device.seen == []
    rig.driver.reset()
    assert not rig.needs_reset and rig.device.broken is None


def test_misaligned_used_ring_fails_at_driver_ok() -> None:
    device = EchoDevice()
    machine = InProcessMachine(device, memory_size=1 << 20)
    drv = machine.driver()
    drv.negotiate(ALL)
    drv.setup_queues(1)
    queue = device.queues[0]
    queue.ready = False
    queue.used_addr += 2
    queue.ready = True
    drv.driver_ok()
    assert drv.status & DeviceStatus.NEEDS_RESET


# -- notification suppression -----------------------------------------------------------------


def _submit(rig: Rig, n: int) -> None:
    for _ in range(n):
        rig.q.add([(rig.buf(b"p"), 1)], [(rig.buf(1), 1)], None)


def test_event_idx_suppresses_interrupts_until_used_event(rig: Rig) -> None:
    """§2.7.7.2: with EVENT_IDX the device interrupts only when used idx passes used_event."""
    rig.q.disable_interrupts()
    rig.q._avail[2 + rig.q.size] = 3  # used_event: interrupt once entry 3 is used
    _submit(rig, 3)
    before = rig.machine.interrupts
    rig.driver.notify(0)
    assert rig.q.used_idx == 3
    assert rig.machine.interrupts == before  # used idx 3 does not pass used_event 3
    _submit(rig, 1)
    rig.driver.notify(0)
    assert rig.machine.interrupts == before + 1


def test_no_interrupt_flag_suppresses_interrupts_without_event_idx() -> None:
    rig = Rig(features=bit(Feature.VERSION_1) | bit(Feature.RING_INDIRECT_DESC))
    rig.q.disable_interrupts()
    _submit(rig, 2)
    rig.driver.notify(0)
    assert rig.q.used_idx == 2
    assert rig.machine.interrupts == 0
    rig.q.enable_interrupts()
    _submit(rig, 1)
    rig.driver.notify(0)
    assert rig.machine.interrupts == 1


def test_device_asks_for_kicks_with_avail_event(rig: Rig) -> None:
    """After draining, avail_event tells the driver which index needs a kick (§2.7.10)."""
    _submit(rig, 2)
    rig.driver.notify(0)
    assert rig.q._used16[2 + 4 * rig.q.size] == 2
    _submit(rig, 1)
    assert rig.q.kick_prepare()  # crossing avail_event: the driver must kick


def test_no_notify_flag_cleared_when_idle_without_event_idx() -> None:
    rig = Rig(features=bit(Feature.VERSION_1))
    _submit(rig, 1)
    rig.driver.notify(0)
    assert rig.q._used16[0] == 0  # idle: notifications wanted again


def test_used_ring_wraps_around_16_bits(rig: Rig) -> None:
    src, dst = rig.buf(b"p"), rig.buf(1)
    rounds = 0
    while True:
        for _ in range(15):
            rig.q.add([(src, 1)], [(dst, 1)], None)
        rig.driver.notify(0)
        assert len(rig.q.get_used()) == 15
        rounds += 1
        if rig.q.last_used_idx < 15:
            break
    assert rounds == 65536 // 15 + 1  # wrapped past 65535 exactly once
    assert not rig.needs_reset
