"""The virtio-mmio register file (VIRTIO 1.2 §4.2)."""

from __future__ import annotations

import pytest

from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.mmio import MAGIC_VALUE, VENDOR_ID, Interrupt, Reg
from pyvirtio.spec.status import DeviceStatus

from .echo import EchoDevice


@pytest.fixture(params=[False, True], ids=["modern", "legacy"])
def machine(request: pytest.FixtureRequest) -> InProcessMachine:
    return InProcessMachine(
        EchoDevice(num_queues=2, queue_size=64), memory_size=1 << 20, legacy=request.param
    )


def test_identification_registers(machine: InProcessMachine) -> None:
    assert machine.read(Reg.MAGIC_VALUE, 4) == MAGIC_VALUE
    assert machine.read(Reg.VERSION, 4) == (1 if machine.transport.legacy else 2)
    assert machine.read(Reg.DEVICE_ID, 4) == 3
    assert machine.read(Reg.VENDOR_ID, 4) == VENDOR_ID


def test_feature_words(machine: InProcessMachine) -> None:
    machine.write(Reg.DEVICE_FEATURES_SEL, 4, 1)
    high = machine.read(Reg.DEVICE_FEATURES, 4)
    assert bool(high & 1) == (not machine.transport.legacy)  # VERSION_1 is bit 32
    machine.write(Reg.DEVICE_FEATURES_SEL, 4, 0)
    assert machine.read(Reg.DEVICE_FEATURES, 4) & bit(Feature.RING_EVENT_IDX)
    machine.write(Reg.DEVICE_FEATURES_SEL, 4, 7)
    assert machine.read(Reg.DEVICE_FEATURES, 4) == 0


def test_queue_num_max_and_missing_queue(machine: InProcessMachine) -> None:
    machine.write(Reg.QUEUE_SEL, 4, 1)
    assert machine.read(Reg.QUEUE_NUM_MAX, 4) == 64
    machine.write(Reg.QUEUE_SEL, 4, 2)
    assert machine.read(Reg.QUEUE_NUM_MAX, 4) == 0
    machine.write(Reg.QUEUE_NUM, 4, 8)  # ignored, not a crash


def test_unaligned_or_narrow_register_access_is_ignored(machine: InProcessMachine) -> None:
    assert machine.read(Reg.MAGIC_VALUE, 2) == 0
    assert machine.read(Reg.MAGIC_VALUE + 1, 4) == 0
    machine.write(Reg.STATUS, 1, 1)
    assert machine.read(Reg.STATUS, 4) == 0


def test_status_write_zero_resets(machine: InProcessMachine) -> None:
    drv = machine.driver()
    drv.negotiate(bit(Feature.VERSION_1))
    drv.setup_queues(2)
    drv.driver_ok()
    assert drv.status & DeviceStatus.DRIVER_OK
    assert machine.device.queues[0].active
    drv.reset()
    assert machine.read(Reg.STATUS, 4) == 0
    assert not machine.device.queues[0].active
    assert machine.device.driver_features == 0


def test_interrupt_status_and_ack(machine: InProcessMachine) -> None:
    levels: list[bool] = []
    machine.transport.interrupt = levels.append
    machine.transport.queue_interrupt(0)
    machine.transport.config_interrupt()
    assert machine.read(Reg.INTERRUPT_STATUS, 4) == Interrupt.VRING | Interrupt.CONFIG
    machine.write(Reg.INTERRUPT_ACK, 4, Interrupt.VRING)
    assert machine.read(Reg.INTERRUPT_STATUS, 4) == Interrupt.CONFIG
    machine.write(Reg.INTERRUPT_ACK, 4, Interrupt.CONFIG)
    assert levels == [True, True, False]


def test_config_generation_counts_changes() -> None:
    machine = InProcessMachine(EchoDevice(), memory_size=1 << 20)
    before = machine.read(Reg.CONFIG_GENERATION, 4)
    machine.device.config_changed()
    assert machine.read(Reg.CONFIG_GENERATION, 4) == before + 1


def test_modern_queue_addresses_are_64_bit() -> None:
    machine = InProcessMachine(EchoDevice(), memory_size=1 << 20)
    machine.write(Reg.QUEUE_SEL, 4, 0)
    machine.write(Reg.QUEUE_DESC_LOW, 4, 0x1234_5000)
    machine.write(Reg.QUEUE_DESC_HIGH, 4, 0x1)
    assert machine.read(Reg.QUEUE_DESC_LOW, 4) == 0x1234_5000
    assert machine.read(Reg.QUEUE_DESC_HIGH, 4) == 1
    machine.write(Reg.QUEUE_READY, 4, 1)
    assert machine.device.queues[0].desc_addr == 0x1_1234_5000  # handed to the device
    machine.write(Reg.QUEUE_DESC_LOW, 4, 0)  # refused while live
    assert machine.read(Reg.QUEUE_DESC_LOW, 4) == 0x1234_5000
    assert machine.device.queues[0].desc_addr == 0x1_1234_5000


def test_notify_for_missing_queue_is_ignored(machine: InProcessMachine) -> None:
    notified: list[int] = []
    machine.transport.notify = notified.append
    status = machine.read(Reg.STATUS, 4)
    machine.write(Reg.QUEUE_NOTIFY, 4, 9)
    machine.write(Reg.QUEUE_NOTIFY, 4, 0xFFFF_FFFF)
    assert notified == []
    assert machine.read(Reg.STATUS, 4) == status  # and the device did not break
    machine.write(Reg.QUEUE_NOTIFY, 4, 0)
    assert notified == [0]


def test_legacy_pfn_layout() -> None:
    machine = InProcessMachine(EchoDevice(queue_size=16), memory_size=1 << 20, legacy=True)
    drv = machine.driver()
    drv.negotiate(0)
    drv.setup_queues(1)
    q = machine.device.queues[0]
    dq = drv.queues[0]
    assert (q.desc_addr, q.avail_addr, q.used_addr) == (dq.desc_addr, dq.avail_addr, dq.used_addr)
    assert machine.read(Reg.QUEUE_PFN, 4) == dq.desc_addr // 4096
    drv.driver_ok()
    assert q.active
    machine.write(Reg.QUEUE_PFN, 4, 0)
    assert not q.active


def test_config_space_reads_of_every_width() -> None:
    import tempfile

    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.storage.raw import RawImage

    with tempfile.NamedTemporaryFile() as f:
        f.truncate(1 << 20)
        f.flush()
        machine = InProcessMachine(BlkDevice(RawImage(f.name)), memory_size=1 << 20)
        capacity = (1 << 20) // 512
        assert machine.read(0x100, 8) == capacity
        assert machine.read(0x100, 4) == capacity
        assert machine.read(0x100, 2) == capacity & 0xFFFF
        assert machine.read(0x101, 1) == capacity >> 8 & 0xFF
        assert machine.read(0x100 + 200, 4) == 0  # beyond the config: zeros
        assert machine.read(0x100, 3) == 0  # not a valid width


def test_register_accesses_do_not_wait_for_stuck_storage() -> None:
    """The Xen shim's IOREQ thread only writes registers and kick eventfds: a request stuck in
    the storage never keeps a vCPU waiting on an MMIO access."""
    import os
    import tempfile
    import threading

    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.driver.blk import BlkDriver
    from pyvirtio.spec.blk import BlkRequestType
    from pyvirtio.storage.raw import RawImage

    with tempfile.NamedTemporaryFile() as f:
        f.truncate(1 << 20)
        device = BlkDevice(RawImage(f.name))
        machine = InProcessMachine(device, memory_size=4 << 20, threaded=True)
        release = threading.Event()
        original = device.image.readv
        device.image.readv = lambda b, o: (release.wait(30), original(b, o))  # type: ignore[method-assign]
        drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
        req = drv.submit(BlkRequestType.IN, 0, in_len=512)
        for _ in range(100):  # register reads and a second notification all return at once
            assert machine.read(Reg.MAGIC_VALUE, 4) == MAGIC_VALUE
        drv.transport.notify(0)
        assert not req.done
        release.set()
        drv.wait([req])
        machine.close()
        assert os.path.exists(f.name)
