"""virtio-net through the in-process driver: two devices on a pyvirtio switch, mergeable
receive buffers, checksum offload, a guest that gives too few buffers, and hostile buffers."""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtio.devices.net import NetDevice, complete_checksum
from pyvirtio.driver.net import DRIVER_FEATURES, NetDriver
from pyvirtio.network.switch import SwitchPort
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.features import bit
from pyvirtio.spec.net import HeaderFlag, NetFeature
from pyvirtio.spec.status import DeviceStatus

BROADCAST = b"\xff" * 6


@dataclass
class Nic:
    device: NetDevice
    machine: InProcessMachine
    driver: NetDriver

    @property
    def mac(self) -> bytes:
        return self.driver.mac


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> Iterator[Callable[..., Nic]]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    name = uuid.uuid4().hex[:12]
    made: list[Nic] = []

    def plug(**driver_kw: object) -> Nic:
        device = NetDevice(SwitchPort(name), mac=bytes([0x52, 0x54, 0, 0, 0, len(made) + 1]))
        machine = InProcessMachine(device, memory_size=8 << 20, threaded=True)
        driver = NetDriver(machine.driver(), wait=machine.wait_interrupt, **driver_kw)  # type: ignore[arg-type]
        nic = Nic(device, machine, driver)
        made.append(nic)
        return nic

    yield plug
    for nic in made:
        nic.machine.close()
        nic.device.port.close()


def ethernet(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def test_config_has_the_mac_and_link_up(switch: Callable[..., Nic]) -> None:
    a = switch()
    assert a.mac == bytes([0x52, 0x54, 0, 0, 0, 1])
    assert a.driver.status & 1


def test_frames_cross_the_switch_and_it_learns(switch: Callable[..., Nic]) -> None:
    a, b, c = switch(), switch(), switch()
    hello = ethernet(BROADCAST, a.mac, b"hello all")
    a.driver.send(hello)
    assert b.driver.receive()[0][1] == hello
    assert c.driver.receive()[0][1] == hello
    reply = ethernet(a.mac, b.mac, b"hello a")
    b.driver.send(reply)
    assert a.driver.receive()[0][1] == reply
    # a has learned where b is (and b where a is): unicast goes to b only
    direct = ethernet(b.mac, a.mac, os.urandom(1000))
    a.driver.send(direct)
    assert b.driver.receive()[0][1] == direct
    with pytest.raises(TimeoutError):
        c.driver.receive(timeout=0.5)


def test_a_large_frame_spans_mergeable_buffers(switch: Callable[..., Nic]) -> None:
    a, b = switch(), switch(rx_buffer=256, rx_buffers=64)
    frame = ethernet(b.mac, a.mac, os.urandom(9000))
    a.driver.send(frame)
    header, got = b.driver.receive()[0]
    assert got == frame
    assert header[6] == -(-(12 + len(frame)) // 256)  # num_buffers


def test_a_frame_waits_for_enough_buffers(switch: Callable[..., Nic]) -> None:
    a, b = switch(), switch(rx_buffer=256, rx_buffers=4)
    frame = ethernet(b.mac, a.mac, os.urandom(3000))
    a.driver.send(frame)
    with pytest.raises(TimeoutError):
        b.driver.receive(timeout=0.5)
    b.driver.post_rx(16)
    b.driver.transport.kick(0)
    assert b.driver.receive()[0][1] == frame


def _udp_frame(dst: bytes, src: bytes, payload: bytes) -> tuple[bytes, int, int]:
    """An IPv4/UDP frame whose UDP checksum field holds the pseudo-header sum, as Linux leaves
    it for NEEDS_CSUM; returns (frame, csum_start, csum_offset)."""
    src_ip, dst_ip = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    udp_len = 8 + len(payload)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 17, udp_len)
    total = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src_ip, dst_ip)
    udp = struct.pack("!HHHH", 1234, 5678, udp_len, total) + payload
    frame = ethernet(dst, src, ip + udp, 0x0800)
    return frame, 14 + 20, 6


def _udp_checksum_ok(frame: bytes) -> bool:
    ip, udp = frame[14:34], frame[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    data = pseudo + udp + (b"\0" if len(udp) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_partial_checksums_pass_to_a_guest_that_takes_them(switch: Callable[..., Nic]) -> None:
    a, b = switch(), switch()
    frame, start, offset = _udp_frame(b.mac, a.mac, b"checksum me")
    a.driver.send(frame, csum_start=start, csum_offset=offset)
    header, got = b.driver.receive()[0]
    assert header[0] & HeaderFlag.NEEDS_CSUM and got == frame
    assert a.device.counters["tx_csum"] == 1


def test_partial_checksums_are_completed_for_a_guest_that_does_not(
    switch: Callable[..., Nic],
) -> None:
    a = switch()
    b = switch(features=DRIVER_FEATURES & ~bit(NetFeature.GUEST_CSUM))
    frame, start, offset = _udp_frame(b.mac, a.mac, b"checksum me!")
    a.driver.send(frame, csum_start=start, csum_offset=offset)
    header, got = b.driver.receive()[0]
    assert not header[0] & HeaderFlag.NEEDS_CSUM
    assert _udp_checksum_ok(got)
    assert b.device.counters["rx_csum_done"] == 1


def test_complete_checksum_refuses_offsets_outside_the_frame() -> None:
    frame = memoryview(bytearray(64))
    assert not complete_checksum(frame, 60, 6)
    assert not complete_checksum(frame, 100, 0)


def test_a_guest_that_never_reads_costs_nothing_but_drops(switch: Callable[..., Nic]) -> None:
    a, b = switch(), switch(rx_buffers=0)
    tx = a.driver.transport.queues[1]
    for _ in range(2000):
        while tx.num_free < 2:
            a.driver._reap_tx()
            a.machine.wait_interrupt(0.05)
        a.driver.send(ethernet(b.mac, a.mac, os.urandom(1400)))
    for _ in range(100):
        a.driver._reap_tx()
        if tx.in_flight == 0:
            break
        a.machine.wait_interrupt(0.05)
    # a's transmissions all completed (nothing waits on b); b holds a bounded queue
    assert a.device.counters["tx"] + a.device.counters["tx_dropped"] == 2000
    assert len(b.device._received) <= 256


def test_hostile_buffers(switch: Callable[..., Nic]) -> None:
    a, b = switch(), switch(rx_buffers=0)
    drv = a.driver.transport
    short = drv.allocator.alloc(8)
    drv.queues[1].add([(short, 8)], [], (short, 8), False)  # shorter than any frame: dropped
    drv.kick(1)
    b_drv = b.driver.transport
    readable = b_drv.allocator.alloc(64)
    b_drv.queues[0].add([(readable, 64)], [], readable, False)  # a buffer it may not write
    b_drv.kick(0)
    a.driver.send(ethernet(b.mac, a.mac, b"y" * 50))
    for _ in range(50):
        if b_drv.status & DeviceStatus.NEEDS_RESET:
            break
        b.machine.wait_interrupt(0.1)
    assert b_drv.status & DeviceStatus.NEEDS_RESET  # b broke its own device...
    assert not drv.status & DeviceStatus.NEEDS_RESET  # ...and a's malformed frame only dropped
    # a's worker counts its frame once the switch took it, which may be after b broke
    deadline = time.monotonic() + 5
    while a.device.counters["tx"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.device.counters["tx_dropped"] == 1 and a.device.counters["tx"] == 1
