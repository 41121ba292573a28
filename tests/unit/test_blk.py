"""virtio-blk through the in-process driver: every request type, feature and error path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.driver.blk import DRIVER_FEATURES, BlkDriver, BlkRequestError
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import (
    REQ_HEADER,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.mmio import Interrupt, Reg
from pyvirtio.spec.ring import DescFlag
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.storage.io_uring import Ring
from pyvirtio.storage.raw import UringImage

from .conftest import IMAGE_SIZE, Blk


@pytest.fixture(params=["sync", "io_uring"])
def io_engine(request: pytest.FixtureRequest) -> str:
    """Every test of this module runs with each I/O engine."""
    return str(request.param)


def host_read(blk: Blk, offset: int, length: int) -> bytes:
    with blk.path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def host_write(blk: Blk, offset: int, data: bytes) -> None:
    with blk.path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


# -- features and config ---------------------------------------------------------------------


def test_config_reports_geometry_and_limits(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(queue_size=256, num_queues=3, logical_block_size=4096)
    cfg = blk.driver.config
    assert cfg.capacity == IMAGE_SIZE // 512
    assert cfg.blk_size == 4096
    assert cfg.seg_max == 254  # queue size - 2: header and status take a descriptor each
    assert cfg.size_max > 0
    assert cfg.num_queues == 3
    assert cfg.writeback == 1
    assert cfg.discard_sector_alignment == 8
    assert cfg.max_discard_seg >= 1 and cfg.max_write_zeroes_seg >= 1
    assert cfg.write_zeroes_may_unmap == 1
    features = blk.driver.transport.features
    for f in (
        BlkFeature.SIZE_MAX,
        BlkFeature.SEG_MAX,
        BlkFeature.BLK_SIZE,
        BlkFeature.TOPOLOGY,
        BlkFeature.FLUSH,
        BlkFeature.CONFIG_WCE,
        BlkFeature.MQ,
        BlkFeature.DISCARD,
        BlkFeature.WRITE_ZEROES,
    ):
        assert features & bit(f), f.name
    assert not features & bit(BlkFeature.RO)
    assert len(blk.driver.queues) == 3


def test_single_queue_does_not_offer_mq(blk: Blk) -> None:
    assert not blk.device.offered_features & bit(BlkFeature.MQ)
    assert len(blk.driver.queues) == 1


def test_read_only_offers_ro_and_no_write_features(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(read_only=True)
    offered = blk.device.offered_features
    assert offered & bit(BlkFeature.RO)
    assert not offered & (bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES))


def test_topology_physical_block_exponent(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk()
    phys = blk.image.physical_block_size
    assert 512 << blk.driver.config.physical_block_exp == phys
    assert blk.driver.config.min_io_size == 1


def test_invalid_options_are_refused(make_blk: Callable[..., Blk]) -> None:
    with pytest.raises(ValueError, match="logical block size"):
        make_blk(logical_block_size=1000)
    with pytest.raises(ValueError, match="serial"):
        make_blk(serial="x" * 21)


# -- data requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("legacy", [False, True])
def test_write_then_read_round_trips_to_the_image(
    make_blk: Callable[..., Blk], legacy: bool, threaded: bool
) -> None:
    blk = make_blk(legacy=legacy, threaded=threaded)
    data = os.urandom(5 * 4096 + 1024)
    blk.driver.write(16, data)
    assert host_read(blk, 16 * 512, len(data)) == data
    assert blk.driver.read(16, len(data)) == data


def test_read_sees_host_data(blk: Blk) -> None:
    data = os.urandom(8192)
    host_write(blk, 4096, data)
    assert blk.driver.read(8, 8192) == data


@pytest.mark.parametrize("indirect", [False, True])
def test_direct_and_indirect_chains(blk: Blk, indirect: bool) -> None:
    data = os.urandom(16 * 512)
    blk.driver.segment_size = 512
    req = blk.driver.request(BlkRequestType.OUT, 0, data_out=data, indirect=indirect)
    assert req.status == BlkStatus.OK
    req = blk.driver.request(BlkRequestType.IN, 0, in_len=len(data), indirect=indirect)
    assert req.status == BlkStatus.OK and req.data == data
    assert req.written == len(data) + 1


def test_header_and_data_in_one_descriptor(blk: Blk) -> None:
    """ANY_LAYOUT (implied by VERSION_1): the header may share a descriptor with data."""
    mmio = blk.driver.transport
    q = mmio.queues[0]
    data = os.urandom(1024)
    buf = mmio.allocator.alloc(16 + len(data))
    mmio.memory.write(buf, REQ_HEADER.pack(BlkRequestType.OUT, 0, 2) + data)
    status = mmio.allocator.alloc(1)
    q.add([(buf, 16 + len(data))], [(status, 1)], "combined", indirect=False)
    mmio.notify(0)
    assert q.get_used() == [("combined", 1)]
    assert mmio.memory.read(status, 1) == bytes([BlkStatus.OK])
    assert host_read(blk, 1024, 1024) == data


def test_status_sharing_a_descriptor_with_read_data(blk: Blk) -> None:
    mmio = blk.driver.transport
    q = mmio.queues[0]
    host_write(blk, 0, b"A" * 512)
    hdr = mmio.allocator.alloc(16)
    mmio.memory.write(hdr, REQ_HEADER.pack(BlkRequestType.IN, 0, 0))
    buf = mmio.allocator.alloc(513)
    q.add([(hdr, 16)], [(buf, 513)], "combined", indirect=False)
    mmio.notify(0)
    assert q.get_used() == [("combined", 513)]
    assert mmio.memory.read(buf, 513) == b"A" * 512 + bytes([BlkStatus.OK])


def test_multiqueue_requests_on_every_queue(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(num_queues=4)
    for q in range(4):
        blk.driver.write(q * 8, bytes([q + 1]) * 4096, queue=q)
    for q in range(4):
        assert blk.driver.read(q * 8, 4096, queue=(q + 1) % 4) == bytes([q + 1]) * 4096
    assert all(queue.used_idx > 0 for queue in blk.device.queues)


def test_many_requests_in_flight(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(threaded=True)
    drv = blk.driver
    reqs = [
        drv.submit(BlkRequestType.OUT, i * 8, data_out=bytes([i]) * 4096, kick=False)
        for i in range(32)
    ]
    drv.transport.notify(0)
    drv.wait(reqs)
    assert all(r.status == BlkStatus.OK for r in reqs)
    assert [drv.read(i * 8, 4096)[0] for i in range(32)] == list(range(32))


def test_get_id_returns_the_serial(make_blk: Callable[..., Blk]) -> None:
    assert make_blk(serial="disk-0042").driver.get_id() == b"disk-0042"
    assert make_blk(serial="x" * 20).driver.get_id() == b"x" * 20


def test_flush_calls_fdatasync(blk: Blk, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    fsync = Ring.fsync

    def ring_fsync(ring: Ring, fd: int, user_data: int, *, datasync: bool = True) -> None:
        assert datasync
        synced.append(fd)
        fsync(ring, fd, user_data, datasync=datasync)

    monkeypatch.setattr(Ring, "fsync", ring_fsync)  # the io_uring engine's fdatasync
    blk.driver.flush()
    assert synced == [blk.image.fd]


# -- cache modes -----------------------------------------------------------------------------


def _record_dsync(blk: Blk, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    seen: list[bool] = []
    original = blk.image.writev

    def writev(buffers, offset, *, dsync=False):  # type: ignore[no-untyped-def]
        seen.append(dsync)
        original(buffers, offset, dsync=dsync)

    monkeypatch.setattr(blk.image, "writev", writev)
    if isinstance(blk.image, UringImage):
        start = blk.image.start_writev

        def start_writev(buffers, offset, *, dsync=False):  # type: ignore[no-untyped-def]
            seen.append(dsync)
            return start(buffers, offset, dsync=dsync)

        monkeypatch.setattr(blk.image, "start_writev", start_writev)
    return seen


def test_config_wce_switches_between_writeback_and_writethrough(
    blk: Blk, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record_dsync(blk, monkeypatch)
    blk.driver.write(0, b"a" * 512)
    blk.driver.set_writeback(False)
    assert (
        blk.driver.config.__class__.unpack(blk.driver.transport.read_config_bytes(96)).writeback
        == 0
    )
    blk.driver.write(0, b"b" * 512)
    blk.driver.set_writeback(True)
    blk.driver.write(0, b"c" * 512)
    assert seen == [False, True, False]


def test_writethrough_option_starts_in_writethrough(
    make_blk: Callable[..., Blk], monkeypatch: pytest.MonkeyPatch
) -> None:
    blk = make_blk(writethrough=True)
    assert blk.driver.config.writeback == 0
    seen = _record_dsync(blk, monkeypatch)
    blk.driver.write(0, b"a" * 512)
    assert seen == [True]


def test_driver_without_flush_gets_writethrough(
    make_blk: Callable[..., Blk], monkeypatch: pytest.MonkeyPatch
) -> None:
    """§5.2.6.5: FLUSH offered but neither FLUSH nor CONFIG_WCE negotiated: writes are stable."""
    features = DRIVER_FEATURES & ~bit(BlkFeature.FLUSH) & ~bit(BlkFeature.CONFIG_WCE)
    blk = make_blk(driver_kw={"features": features})
    seen = _record_dsync(blk, monkeypatch)
    blk.driver.write(0, b"a" * 512)
    assert seen == [True]


# -- discard and write zeroes ----------------------------------------------------------------


def test_discard_punches_a_hole(blk: Blk) -> None:
    blk.driver.write(0, os.urandom(1 << 20))
    os.fsync(blk.image.fd)
    before = os.stat(blk.path).st_blocks
    assert blk.driver.discard([(0, 2048, 0)]) == BlkStatus.OK
    assert os.stat(blk.path).st_blocks < before
    assert host_read(blk, 0, 1 << 20) == bytes(1 << 20)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_reads_back_zeros(blk: Blk, unmap: bool) -> None:
    blk.driver.write(0, b"\xaa" * 65536)
    flags = WRITE_ZEROES_FLAG_UNMAP if unmap else 0
    assert blk.driver.discard([(8, 16, flags), (64, 8, flags)], zeroes=True) == BlkStatus.OK
    data = host_read(blk, 0, 65536)
    assert data[: 8 * 512] == b"\xaa" * 4096
    assert data[8 * 512 : 24 * 512] == bytes(8192)
    assert data[24 * 512 : 64 * 512] == b"\xaa" * (40 * 512)
    assert data[64 * 512 : 72 * 512] == bytes(4096)


def test_write_zeroes_falls_back_to_writing_zeros(blk: Blk) -> None:
    blk.driver.write(0, b"\xaa" * 8192)
    blk.image.can_zero_range = False
    assert blk.driver.discard([(0, 16, 0)], zeroes=True) == BlkStatus.OK
    assert host_read(blk, 0, 8192) == bytes(8192)


def test_discard_with_unmap_flag_is_unsupported(blk: Blk) -> None:
    """§5.2.6.5: UNSUPP for discard with unmap set, and for unknown flags."""
    assert blk.driver.discard([(0, 8, WRITE_ZEROES_FLAG_UNMAP)]) == BlkStatus.UNSUPP
    assert blk.driver.discard([(0, 8, 4)], zeroes=True) == BlkStatus.UNSUPP


def test_discard_payload_errors(blk: Blk) -> None:
    assert blk.driver.discard([(IMAGE_SIZE // 512, 8, 0)]) == BlkStatus.IOERR
    assert blk.driver.discard([(1, 8, 0)]) == BlkStatus.OK  # 512-byte blocks: aligned
    req = blk.driver.request(BlkRequestType.DISCARD, data_out=b"\0" * 15)
    assert req.status == BlkStatus.IOERR
    too_many = [(i * 8, 8, 0) for i in range(blk.device.config_bytes()[40] + 1)]
    assert blk.driver.discard(too_many) == BlkStatus.UNSUPP  # beyond max_discard_seg


def test_discard_not_negotiated_is_unsupported(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(driver_kw={"features": DRIVER_FEATURES & ~bit(BlkFeature.DISCARD)})
    assert blk.driver.discard([(0, 8, 0)]) == BlkStatus.UNSUPP


# -- error paths -----------------------------------------------------------------------------


def test_out_of_range_sector_is_ioerr(blk: Blk) -> None:
    last = IMAGE_SIZE // 512
    req = blk.driver.request(BlkRequestType.IN, last, in_len=512)
    assert req.status == BlkStatus.IOERR
    req = blk.driver.request(BlkRequestType.OUT, last - 1, data_out=b"x" * 1024)
    assert req.status == BlkStatus.IOERR
    req = blk.driver.request(BlkRequestType.IN, 2**60, in_len=512)
    assert req.status == BlkStatus.IOERR
    assert blk.driver.read(last - 1, 512) == bytes(512)


def test_misaligned_request_on_4k_disk_is_ioerr(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(logical_block_size=4096)
    assert blk.driver.request(BlkRequestType.IN, 1, in_len=4096).status == BlkStatus.IOERR
    assert blk.driver.request(BlkRequestType.IN, 8, in_len=512).status == BlkStatus.IOERR
    assert blk.driver.request(BlkRequestType.IN, 8, in_len=4096).status == BlkStatus.OK


def test_write_to_read_only_disk_is_ioerr_and_writes_nothing(make_blk: Callable[..., Blk]) -> None:
    blk = make_blk(read_only=True)
    req = blk.driver.request(BlkRequestType.OUT, 0, data_out=b"x" * 512)
    assert req.status == BlkStatus.IOERR
    assert host_read(blk, 0, 512) == bytes(512)
    for kind in (BlkRequestType.DISCARD, BlkRequestType.WRITE_ZEROES):
        req = blk.driver.request(kind, data_out=b"\0" * 16)
        assert req.status == BlkStatus.IOERR
    assert blk.driver.read(0, 512) == bytes(512)


@pytest.mark.parametrize("req_type", [2, 3, 10, 14, 15, 16, 18, 20, 22, 24, 26, 99, 0x7FFFFFFF])
def test_unknown_or_unoffered_request_types_are_unsupp(blk: Blk, req_type: int) -> None:
    assert blk.driver.request(req_type, 0, in_len=512).status == BlkStatus.UNSUPP


def test_legacy_barrier_bit_is_ignored(blk: Blk) -> None:
    req = blk.driver.request(BlkRequestType.IN | 0x80000000, 0, in_len=512)
    assert req.status == BlkStatus.OK


def _raw_request(blk: Blk, out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> list:  # type: ignore[type-arg]
    q = blk.driver.transport.queues[0]
    q.add(out, in_, "raw", indirect=False)
    blk.driver.transport.notify(0)
    return q.get_used()


def test_header_too_short_is_ioerr(blk: Blk) -> None:
    mem, alloc = blk.driver.transport.memory, blk.driver.transport.allocator
    hdr = alloc.alloc(8)
    mem.write(hdr, b"\0" * 8)
    status = alloc.alloc(1)
    assert _raw_request(blk, [(hdr, 8)], [(status, 1)]) == [("raw", 1)]
    assert mem.read(status, 1) == bytes([BlkStatus.IOERR])
    assert blk.driver.read(0, 512) == bytes(512)  # the device keeps serving


def test_missing_status_byte_needs_reset(blk: Blk) -> None:
    mem, alloc = blk.driver.transport.memory, blk.driver.transport.allocator
    hdr = alloc.alloc(16)
    mem.write(hdr, REQ_HEADER.pack(BlkRequestType.FLUSH, 0, 0))
    _raw_request(blk, [(hdr, 16)], [])
    assert blk.driver.transport.status & DeviceStatus.NEEDS_RESET
    assert blk.machine.transport.interrupt_status & Interrupt.CONFIG


def test_buffer_outside_guest_memory_is_ioerr(blk: Blk) -> None:
    mem, alloc = blk.driver.transport.memory, blk.driver.transport.allocator
    hdr = alloc.alloc(16)
    mem.write(hdr, REQ_HEADER.pack(BlkRequestType.IN, 0, 0))
    status = alloc.alloc(1)
    beyond = 0x4000_0000 + (64 << 20) - 256  # straddles the end of guest RAM
    used = _raw_request(blk, [(hdr, 16)], [(beyond, 512), (status, 1)])
    assert used == [("raw", 513)]
    assert mem.read(status, 1) == bytes([BlkStatus.IOERR])
    assert not blk.driver.transport.status & DeviceStatus.NEEDS_RESET
    assert blk.driver.read(0, 512) == bytes(512)


def test_status_outside_guest_memory_needs_reset(blk: Blk) -> None:
    mem, alloc = blk.driver.transport.memory, blk.driver.transport.allocator
    hdr = alloc.alloc(16)
    mem.write(hdr, REQ_HEADER.pack(BlkRequestType.IN, 0, 0))
    _raw_request(blk, [(hdr, 16)], [(0x1000, 1)])
    assert blk.driver.transport.status & DeviceStatus.NEEDS_RESET


def test_header_in_a_device_writable_descriptor_is_ioerr(blk: Blk) -> None:
    mem, alloc = blk.driver.transport.memory, blk.driver.transport.allocator
    buf = alloc.alloc(17)
    mem.write(buf, REQ_HEADER.pack(BlkRequestType.OUT, 0, 0) + b"\xff")
    assert _raw_request(blk, [], [(buf, 17)]) == [("raw", 17)]
    assert mem.read(buf + 16, 1) == bytes([BlkStatus.IOERR])


def test_storage_error_is_ioerr(blk: Blk, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kw: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blk.image, "readv", fail)
    monkeypatch.setattr(blk.image, "start_readv", fail, raising=False)
    req = blk.driver.request(BlkRequestType.IN, 0, in_len=512)
    assert req.status == BlkStatus.IOERR
    with pytest.raises(BlkRequestError):
        blk.driver.read(0, 512)


# -- capacity change -------------------------------------------------------------------------


def test_resize_raises_config_interrupt_and_new_capacity(blk: Blk) -> None:
    drv = blk.driver
    generation = blk.machine.read(Reg.CONFIG_GENERATION, 4)
    os.truncate(blk.path, IMAGE_SIZE * 2)
    assert blk.device.refresh_capacity()
    assert not blk.device.refresh_capacity()
    assert drv.transport.ack_interrupt() & Interrupt.CONFIG
    assert blk.machine.read(Reg.CONFIG_GENERATION, 4) != generation
    assert drv.capacity == IMAGE_SIZE * 2 // 512
    drv.write(IMAGE_SIZE // 512 + 8, b"z" * 512)
    assert host_read(blk, IMAGE_SIZE + 4096, 512) == b"z" * 512


def test_features_not_offered_are_refused_at_features_ok(blk: Blk) -> None:
    mmio = blk.driver.transport
    mmio.reset()
    mmio.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    mmio.write_driver_features(bit(Feature.VERSION_1) | bit(BlkFeature.GEOMETRY))
    mmio.add_status(DeviceStatus.FEATURES_OK)
    assert not mmio.status & DeviceStatus.FEATURES_OK


def test_modern_device_refuses_driver_without_version_1(blk: Blk) -> None:
    mmio = blk.driver.transport
    mmio.reset()
    mmio.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    mmio.write_driver_features(bit(BlkFeature.FLUSH))
    mmio.add_status(DeviceStatus.FEATURES_OK)
    assert not mmio.status & DeviceStatus.FEATURES_OK


def test_reset_and_reinitialise(blk: Blk) -> None:
    blk.driver.write(0, b"q" * 512)
    machine = blk.machine
    driver = BlkDriver(machine.driver())
    assert driver.read(0, 512) == b"q" * 512


def test_segment_descriptor_flags_are_what_linux_sends(blk: Blk) -> None:
    """A sanity check on the driver itself: header readable, data and status writable."""
    q = blk.driver.transport.queues[0]
    req = blk.driver.submit(BlkRequestType.IN, 0, in_len=512, indirect=False, kick=False)
    head = next(iter(q._pending))
    flags = []
    i = head
    while True:
        _, _, f, nxt = q.read_desc(i)
        flags.append(f)
        if not f & DescFlag.NEXT:
            break
        i = nxt
    assert [f & DescFlag.WRITE for f in flags] == [0, DescFlag.WRITE, DescFlag.WRITE]
    blk.driver.transport.notify(0)
    blk.driver.wait([req])


def test_large_requests_on_an_executor(make_blk: Callable[..., Blk]) -> None:
    """Requests above the threshold run on the executor, at most ``parallel_requests`` at a
    time (the others on the queue thread); every request completes with its data."""
    from concurrent.futures import ThreadPoolExecutor

    blk = make_blk(threaded=True, queue_size=256)
    blk.device.executor = ThreadPoolExecutor(2)
    blk.device.parallel_threshold = 8192
    blk.device.parallel_requests = 2
    drv = blk.driver
    drv.segment_size = 65536
    blobs = [os.urandom(n) for n in (512, 16384, 4096, 65536, 131072, 1024, 32768, 8704)]
    reqs = [
        drv.submit(BlkRequestType.OUT, i * 512, data_out=b, kick=False) for i, b in enumerate(blobs)
    ]
    drv.transport.notify(0)
    drv.wait(reqs)
    assert [r.status for r in reqs] == [BlkStatus.OK] * len(blobs)
    for i, b in enumerate(blobs):
        assert drv.read(i * 512, len(b)) == b
    blk.device.executor.shutdown()


# -- field regressions (anchors.md §d.6) ------------------------------------------------------


def test_more_segments_than_seg_max_are_still_served(blk: Blk) -> None:
    """Windows' viostor sent 129 segments against seg_max 126 and SPDK refused the request;
    pyvirtio serves any chain its queue can hold."""
    drv = blk.driver
    drv.segment_size = 512
    count = drv.config.seg_max + 3
    data = os.urandom(512 * count)
    req = drv.request(BlkRequestType.OUT, 0, data_out=data, indirect=True)
    assert req.status == BlkStatus.OK
    assert drv.read(0, len(data)) == data


def test_a_head_published_twice_is_served_twice_without_harm(blk: Blk) -> None:
    q = blk.driver.transport.queues[0]
    req = blk.driver.submit(BlkRequestType.IN, 0, in_len=512, kick=False)
    head = next(h for h, p in q._pending.items() if p.token is req)
    q.publish_heads([head])  # the same head again while it is in flight
    blk.driver.transport.notify(0)
    used = [q.used_elem(i) for i in range(q.used_idx)]
    assert used == [(head, 513), (head, 513)]
    assert not blk.driver.transport.status & DeviceStatus.NEEDS_RESET
    # The device keeps serving the queue.
    blk.driver.transport.queues[0]._pending.pop(head)
    q.last_used_idx = q.used_idx
    assert blk.driver.get_id() == b""
    assert blk.device.queues[0].used_idx == 3


def test_buffer_straddling_two_adjacent_regions_is_served(image_path: Path) -> None:
    from pyvirtio.devices.blk import BlkDevice
    from pyvirtio.storage.raw import RawImage

    device = BlkDevice(RawImage(str(image_path)))
    machine = InProcessMachine(device, regions=[(0x4000_0000, 1 << 20), (0x4010_0000, 1 << 20)])
    drv = BlkDriver(machine.driver())
    mem, alloc = drv.transport.memory, drv.transport.allocator
    hdr, status = alloc.alloc(16), alloc.alloc(1)
    mem.write(hdr, REQ_HEADER.pack(BlkRequestType.OUT, 0, 0))
    data = os.urandom(4096)
    straddle = 0x4010_0000 - 2048
    mem.write(straddle, data)
    q = drv.queues[0]
    q.add([(hdr, 16), (straddle, 4096)], [(status, 1)], "s", indirect=False)
    drv.transport.notify(0)
    assert q.get_used() == [("s", 1)]
    assert mem.read(status, 1) == bytes([BlkStatus.OK])
    with image_path.open("rb") as f:
        assert f.read(4096) == data


def test_queue_statistics_count_requests_bytes_errors_and_latency(blk: Blk) -> None:
    blk.driver.write(0, b"x" * 8192)
    assert blk.driver.read(0, 4096) == b"x" * 4096
    blk.driver.request(BlkRequestType.IN, IMAGE_SIZE // 512, in_len=512)  # past the end
    blk.driver.request(99)  # unknown type
    snap = blk.device.stats[0].snapshot()
    assert snap["requests"] == 4 and snap["in_flight"] == 0
    assert snap["errors"] == {"ioerr": 1, "unsupp": 1}
    assert snap["bytes_read"] >= 8192 + 16 * 4  # data out and the headers
    assert snap["bytes_written"] >= 4096 + 512
    buckets = snap["latency_buckets"]
    assert isinstance(buckets, dict) and sum(buckets.values()) == 4
