"""One hostile front-end must never end, wedge or leak the daemon (issue: hostile peers).

Every test runs against a real ``pyvirtio blk`` process; the fixture then checks that the
daemon is alive, serves a well-behaved front-end and holds no leaked fds.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

import pytest

from pyvirtio.driver.vhost_user_frontend import FrontendError
from pyvirtio.spec.features import bit
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FrontendReq,
    MemoryRegionDesc,
    ProtocolFeature,
    encode_single_region,
    encode_u64,
)
from tests.hostile.conftest import Daemon
from tests.hostile.frontend import (
    MEMORY,
    dev_zero,
    eventfd,
    eventfd_at_max,
    memfd,
    message,
    pipe_unread,
    raw_connect,
    session,
)

ACK = FLAG_NEED_REPLY


def test_front_end_gone_before_its_reply(daemon: Daemon) -> None:
    """EPIPE on the reply ends that session only."""
    for _ in range(20):
        s = raw_connect(daemon.socket)
        s.sendall(message(FrontendReq.GET_FEATURES) * 8)
        s.close()
    daemon.check_serves()


def test_front_end_gives_up_while_waiting_behind_another(daemon: Daemon) -> None:
    first = raw_connect(daemon.socket)
    first.sendall(message(FrontendReq.GET_FEATURES))
    assert len(first.recv(64)) == 20  # its session is established
    waiting = raw_connect(daemon.socket)
    waiting.sendall(message(FrontendReq.GET_FEATURES) * 8)
    waiting.close()  # gives up
    first.close()
    daemon.check_serves()


def test_backend_channel_that_is_a_pipe(daemon: Daemon) -> None:
    with session(daemon.socket) as s:
        r, w = os.pipe2(os.O_CLOEXEC)
        s.own(r)
        s.own(w)
        with pytest.raises(FrontendError):
            s.fe.command(FrontendReq.SET_BACKEND_REQ_FD, b"", [w])


def test_refused_overlapping_region_keeps_the_installed_ones(daemon: Daemon) -> None:
    """ADD_MEM_REG that overlaps is refused; the region already installed keeps working."""
    with session(daemon.socket) as s:
        assert s.protocol & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        s.fe.command(FrontendReq.ADD_MEM_REG, encode_single_region(s.region), [s.memfd])
        other = s.own(memfd(MEMORY))
        overlapping = MemoryRegionDesc(s.region.guest_addr + 4096, 8192, 0x1000_0000_0000, 0)
        with pytest.raises(FrontendError, match="failure"):
            s.fe.command(FrontendReq.ADD_MEM_REG, encode_single_region(overlapping), [other])
        q = s.add_queue()
        kick = s.own(eventfd())
        s.start_queue(q, kick=kick, call=s.own(eventfd()))
        status = s.submit_read(q)
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 5
        while s.memory.read(status, 1) == b"\xff" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.memory.read(status, 1) == b"\x00"


@pytest.mark.parametrize("kind", ["eventfd_at_max", "blocking_eventfd_at_max", "pipe"])
def test_call_fd_that_would_block(daemon: Daemon, kind: str) -> None:
    """A call fd that blocks never wedges a queue worker, nor the next session."""
    with session(daemon.socket) as s:
        s.set_mem_table()
        q = s.add_queue()
        if kind == "pipe":
            call, reader = pipe_unread()
            s.own(reader)
        else:
            call = eventfd_at_max()
            if kind == "eventfd_at_max":
                os.set_blocking(call, False)
        s.own(call)
        kick = s.own(eventfd())
        try:
            s.start_queue(q, kick=kick, call=call)
        except FrontendError:
            assert kind == "pipe", "an eventfd at its maximum count is still an eventfd"
            return
        for sector in range(4):
            s.submit_read(q, sector)
            os.eventfd_write(kick, 1)
            time.sleep(0.05)
    daemon.check_serves(timeout=10)


@pytest.mark.parametrize("where", ["dev_zero_offset", "memfd_too_small", "memfd_truncated"])
def test_memory_smaller_than_the_region(daemon: Daemon, where: str) -> None:
    """Memory the daemon would fault on (SIGBUS) is refused or made safe before it maps it."""
    with session(daemon.socket) as s:
        if where == "dev_zero_offset":
            fd = s.own(dev_zero())
            desc = MemoryRegionDesc(s.region.guest_addr, MEMORY, s.region.user_addr, 1 << 40)
            with pytest.raises(FrontendError, match="failure"):
                s.fe.set_mem_table([(desc, fd)])
            return
        if where == "memfd_too_small":
            fd = s.own(memfd(MEMORY // 2))
            with pytest.raises(FrontendError, match="failure"):
                s.fe.set_mem_table([(s.region, fd)])
            return
        s.set_mem_table()
        q = s.add_queue()
        kick = s.own(eventfd())
        s.start_queue(q, kick=kick, call=s.own(eventfd()))
        status = s.submit_read(q)
        with pytest.raises(PermissionError):  # sealed against shrinking by the daemon
            os.ftruncate(s.memfd, 0)
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 5
        while s.memory.read(status, 1) == b"\xff" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.memory.read(status, 1) == b"\x00"


def test_truncated_unsealable_memfd_is_refused(daemon: Daemon) -> None:
    with session(daemon.socket) as s:
        fd = s.own(memfd(MEMORY, sealable=False))
        with pytest.raises(FrontendError, match="failure"):
            s.fe.set_mem_table([(s.region, fd)])


def test_inflight_fd_smaller_than_declared(daemon: Daemon) -> None:
    with session(daemon.socket) as s:
        fd = s.own(memfd(4096))
        payload = struct.pack("<QQHHxxxx", 1 << 20, 0, 2, 128)
        with pytest.raises(FrontendError, match="failure"):
            s.fe.command(FrontendReq.SET_INFLIGHT_FD, payload, [fd])


def test_zero_sized_regions_leak_no_fds(daemon: Daemon) -> None:
    before = daemon.fd_count()
    with session(daemon.socket) as s:
        empty = MemoryRegionDesc(s.region.guest_addr, 0, s.region.user_addr, 0)
        for _ in range(50):
            fd = memfd(4096)
            with pytest.raises(FrontendError):
                s.fe.command(FrontendReq.ADD_MEM_REG, encode_single_region(empty), [fd])
            os.close(fd)
        during = daemon.fd_count()
    assert during - before < 10, f"{during - before} fds held for 50 refused regions"


def test_dev_zero_as_kick_fd(daemon: Daemon) -> None:
    """Not an eventfd: refused, and no core spins on it."""
    with session(daemon.socket) as s:
        s.set_mem_table()
        q = s.add_queue()
        zero = s.own(dev_zero())
        with pytest.raises(FrontendError, match="failure"):
            s.start_queue(q, kick=zero, call=s.own(eventfd()))
        cpu = daemon.cpu_seconds()
        time.sleep(1.0)
        assert daemon.cpu_seconds() - cpu < 0.5


def test_semaphore_eventfd_as_kick_fd(daemon: Daemon) -> None:
    with session(daemon.socket) as s:
        s.set_mem_table()
        q = s.add_queue()
        kick = s.own(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE))
        os.eventfd_write(kick, 1 << 40)
        with pytest.raises(FrontendError, match="failure"):
            s.start_queue(q, kick=kick, call=s.own(eventfd()))


@pytest.mark.parametrize("request_", [FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR])
def test_vring_fds_must_be_eventfds(daemon: Daemon, request_: FrontendReq) -> None:
    with session(daemon.socket) as s:
        zero = s.own(dev_zero())
        with pytest.raises(FrontendError, match="failure"):
            s.fe.set_vring_fd(request_, 0, zero)


def test_sealed_memfd_is_sealed_by_the_daemon(daemon: Daemon) -> None:
    """A sealable memfd gets F_SEAL_SHRINK: the front-end can no longer pull memory away."""
    with session(daemon.socket) as s:
        s.set_mem_table()
        seals = fcntl.fcntl(s.memfd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(s.memfd, 0)


def test_unsupported_with_need_reply_and_a_flood(daemon: Daemon) -> None:
    s = raw_connect(daemon.socket)
    s.sendall(message(FrontendReq.GET_FEATURES, b"", 0) * 2000)
    got = 0
    while got < 2000 * 20:
        chunk = s.recv(65536)
        assert chunk
        got += len(chunk)
    s.close()
    s = raw_connect(daemon.socket)
    s.sendall(message(FrontendReq.SET_LOG_BASE, encode_u64(0), ACK))
    reply = s.recv(64)
    assert reply == b"" or struct.unpack_from("<Q", reply, 12)[0] != 0
    s.close()
