"""Live migration over vhost-user: the dirty log (LOG_SHMFD, VHOST_F_LOG_ALL, SET_LOG_BASE) and
a device handed from one back-end to another, driven by pyvirtio's own front-end as QEMU drives
it, over real sockets with real fds."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from pyvirtio.driver.blk import BlkDriver, BlkRequest
from pyvirtio.driver.vhost_user import GUEST_RAM_BASE, VhostUserDriver
from pyvirtio.driver.vhost_user_frontend import FrontendError, VhostUserFrontend
from pyvirtio.memory.dirty_log import LOG_PAGE, DirtyLog
from pyvirtio.spec import ring
from pyvirtio.spec.blk import BlkRequestType, BlkStatus
from pyvirtio.vhost_user.protocol import F_LOG_ALL, FrontendReq, LogDesc, ProtocolFeature
from tests.unit.test_vhost_user import Served, connect, serve

SECTOR = 512


def _bits(log: bytearray) -> set[int]:
    return {i for i in range(len(log) * 8) if log[i // 8] >> (i % 8) & 1}


def test_dirty_log_sets_one_bit_per_page_written() -> None:
    bitmap = bytearray(8)  # 64 pages
    log = DirtyLog(memoryview(bitmap))
    log.mark(0, 1)
    log.mark(7 * LOG_PAGE + 4095, 2)  # straddles pages 7 and 8 (two bytes of the bitmap)
    log.mark(10 * LOG_PAGE, 20 * LOG_PAGE)  # 10..29: whole bytes in the middle
    log.mark(3 * LOG_PAGE, 0)  # nothing written
    log.mark(60 * LOG_PAGE, 100 * LOG_PAGE)  # clipped at the log's end
    log.mark(1 << 40, LOG_PAGE)  # beyond it: nothing
    assert _bits(bitmap) == {0, 7, 8, *range(10, 30), *range(60, 64)}
    log.release()
    log.mark(5 * LOG_PAGE, 1)  # released: nothing
    assert not bitmap[0] >> 5 & 1


def _guest_ram(transport: VhostUserDriver) -> bytes:
    return transport.memory.read(GUEST_RAM_BASE, transport.memory_size)


def _pages(addr: int, length: int) -> set[int]:
    return set(range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1))


def _wait_used(transport: VhostUserDriver, count: int) -> None:
    """Wait until the device has used ``count`` buffers, reading guest memory only (a driver
    that completed them would write its own pages)."""
    deadline = time.monotonic() + 10
    while transport.queues[0].used_idx != count:
        assert time.monotonic() < deadline, "the device did not complete the requests"
        time.sleep(0.001)


def _migrate_reads(server: Served) -> tuple[VhostUserDriver, BlkDriver, list[BlkRequest], bytes]:
    """Reads submitted before a snapshot of guest memory and served after it, with the dirty
    log on: the copy of the snapshot with the logged pages taken again must equal guest memory
    (what a migration copies last). Returns the driver, the requests (used by the device, not
    yet completed by the driver) and the image's contents."""
    contents = os.urandom(256 * 1024)
    os.pwrite(server.image.fd, contents, 0)
    transport, drv = connect(server.path)
    queue = transport.queues[0]
    used_ring = _pages(queue.used_addr, ring.used_ring_size(queue.size))
    gap = -(queue.used_addr + ring.used_ring_size(queue.size)) % LOG_PAGE
    transport.allocator.alloc(gap, 1)  # no request buffer shares a page with the used ring
    transport.start_dirty_log()
    reqs = [
        drv.submit(BlkRequestType.IN, i * 16, in_len=(i % 4 + 1) * 4096, kick=False)
        for i in range(24)
    ]
    before = _guest_ram(transport)
    transport.collect_dirty_pages()  # what setting up logged: the VMM's first pass sends it
    transport.notify(0)
    _wait_used(transport, len(reqs))
    bases = transport.stop()  # the source stops the device; everything it took completed
    assert bases == [len(reqs)]
    logged = transport.collect_dirty_pages()
    after = _guest_ram(transport)

    copy = bytearray(before)
    for page in logged:
        offset = page * LOG_PAGE - GUEST_RAM_BASE
        copy[offset : offset + LOG_PAGE] = after[offset : offset + LOG_PAGE]
    assert copy == after, "the device wrote pages it did not log"

    changed = {
        (GUEST_RAM_BASE + offset) // LOG_PAGE
        for offset in range(0, len(after), LOG_PAGE)
        if before[offset : offset + LOG_PAGE] != after[offset : offset + LOG_PAGE]
    }
    buffers: set[int] = set()
    for req in reqs:
        for addr, length in [*req.data_in, (req.status_addr, 1)]:
            buffers |= _pages(addr, length)
    assert not buffers & used_ring
    assert used_ring <= changed and buffers <= changed
    assert changed <= logged <= buffers | used_ring
    return transport, drv, reqs, contents


def test_device_writes_are_logged_and_the_device_moves_to_another_back_end(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serve(tmp_path / "a") as source:
        os.link(tmp_path / "a" / "disk.img", tmp_path / "b" / "disk.img")  # one image, two daemons
        with serve(tmp_path / "b") as destination:
            transport, drv, reqs, contents = _migrate_reads(source)
            transport.migrate(destination.path, [len(reqs)])
            drv.wait(reqs)  # completed by the source, collected on the destination
            for req in reqs:
                assert req.status == BlkStatus.OK
                start = req.sector * SECTOR
                assert req.data == contents[start : start + len(req.data)]
            data = os.urandom(64 * 1024)
            drv.write(1024, data)  # the destination serves from where the source stopped
            assert drv.read(1024, len(data)) == data
            assert destination.device.queues[0].last_avail_idx == len(reqs) + 2
            transport.close()


def test_logging_stops_when_log_all_is_cleared(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        transport, drv = connect(server.path)
        transport.start_dirty_log()
        drv.read(0, 4096)
        transport.stop_dirty_log()  # returns once the queue's worker stopped logging
        assert transport.collect_dirty_pages()
        drv.read(0, 4096)
        assert not transport.collect_dirty_pages()
        transport.close()


def _handshake(path: str, protocol: int) -> VhostUserFrontend:
    fe = VhostUserFrontend(path)
    fe.negotiate_protocol(protocol)
    fe.set_owner()
    return fe


def _log_fd(size: int, *, sealed: bool = True) -> int:
    fd = os.memfd_create("log", os.MFD_ALLOW_SEALING if sealed else 0)
    os.ftruncate(fd, size)
    return fd


def _session_ended(fe: VhostUserFrontend) -> bool:
    try:
        fe.get_features()
    except FrontendError:
        return True
    return False


@pytest.mark.parametrize(
    "fd_kind",
    ["pipe", "short memfd", "socket", "dev_zero"],
)
def test_a_bad_log_ends_the_session_only(tmp_path: Path, fd_kind: str) -> None:
    with serve(tmp_path) as server:
        fe = _handshake(server.path, 1 << ProtocolFeature.LOG_SHMFD)
        r, w = os.pipe()
        sockets = socket.socketpair()
        fds = {
            "pipe": r,
            "short memfd": _log_fd(4096),
            "socket": sockets[0].fileno(),
            "dev_zero": os.open("/dev/zero", os.O_RDWR),
        }
        with pytest.raises(FrontendError):
            fe.set_log_base(fds[fd_kind], 1 << 20)
        assert _session_ended(fe)
        fe.close()
        for fd in (r, w, fds["short memfd"], fds["dev_zero"]):
            os.close(fd)
        for s in sockets:
            s.close()
        transport, drv = connect(server.path)  # the daemon serves the next front-end
        assert drv.read(0, 512) == bytes(512)
        transport.close()


def test_set_log_base_needs_log_shmfd(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        fe = _handshake(server.path, 0)  # no LOG_SHMFD: no reply is expected
        fd = _log_fd(4096)
        fe._send(FrontendReq.SET_LOG_BASE, LogDesc(4096, 0).encode(), [fd])
        os.close(fd)
        assert _session_ended(fe)
        fe.close()


def test_log_all_is_offered_and_taken_while_rings_run(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        transport, drv = connect(server.path)
        assert transport.frontend.get_features() >> F_LOG_ALL & 1
        drv.write(0, b"x" * 4096)
        features = server.device.driver_features
        transport.start_dirty_log()  # LOG_ALL set while the ring runs: the device goes on
        assert server.device.driver_features == features
        assert drv.read(0, 4096) == b"x" * 4096
        assert server.device.queues[0].logging
        transport.close()
