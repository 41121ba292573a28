"""A hostile vhost-user front-end: wrong kinds of file descriptors, memory that shrinks, messages
cut at any byte, floods and stalls, over a real socket to a real daemon.

It is built from pyvirtio's own front-end pieces; what it adds is the freedom to send anything.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import GUEST_RAM_BASE, USER_ADDR_BASE, VhostUserDriver
from pyvirtio.driver.vhost_user_frontend import FrontendError, VhostUserFrontend
from pyvirtio.driver.virtqueue import DriverQueue, GuestAllocator
from pyvirtio.memory.guest import GuestMemory, MemoryRegion
from pyvirtio.spec.blk import REQ_HEADER, BlkRequestType
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.vhost_user.channel import send_message
from pyvirtio.vhost_user.protocol import (
    F_PROTOCOL_FEATURES,
    FrontendReq,
    MemoryRegionDesc,
    ProtocolFeature,
    VringAddr,
    encode,
)

ALL_PROTOCOL = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.INFLIGHT_SHMFD)
)
MEMORY = 4 << 20


def serve_well(path: str, timeout: float = 10.0) -> None:
    """What a good front-end does: connect (retrying while the daemon ends another session),
    write and read back through every queue, disconnect."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            transport = VhostUserDriver(path, DeviceId.BLOCK, timeout=5.0)
            try:
                drv = BlkDriver(transport, wait=transport.wait_interrupt)
                for q in range(len(drv.queues)):
                    data = os.urandom(8192)
                    drv.write(64 * q, data, queue=q)
                    assert drv.read(64 * q, len(data), queue=q) == data
                return
            finally:
                transport.close()
        except (FrontendError, OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"a well-behaved front-end was not served: {exc}") from None
            time.sleep(0.1)


# -- file descriptors of every kind --------------------------------------------------------------


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def eventfd_at_max() -> int:
    """An eventfd whose counter cannot take one more write: a blocking write would hang."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
    return fd


def pipe_unread() -> tuple[int, int]:
    """(write end, read end) of a pipe nobody reads, its buffer already full."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return w, r


def dev_zero() -> int:
    return os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)


def memfd(size: int, *, sealable: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("hostile", flags)
    os.ftruncate(fd, size)
    return fd


# -- a session set up by hand --------------------------------------------------------------------


class Session:
    """A vhost-user session whose every step can be replaced: the caller hands over the fds."""

    def __init__(self, path: str, protocol: int = ALL_PROTOCOL, timeout: float = 5.0) -> None:
        self.fe = VhostUserFrontend(path, timeout=timeout)
        self.protocol = self.fe.negotiate_protocol(protocol)
        self.fe.set_owner()
        offered = self.fe.get_features()
        self.features = offered & (
            bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX) | bit(Feature.RING_INDIRECT_DESC)
        )
        self.fe.set_features(self.features | (offered & bit(F_PROTOCOL_FEATURES)))
        self.memfd = memfd(MEMORY)
        region = MemoryRegion.from_fd(GUEST_RAM_BASE, MEMORY, self.memfd)
        self.memory = GuestMemory([region])
        self.allocator = GuestAllocator(GUEST_RAM_BASE, MEMORY)
        self.queues: list[DriverQueue] = []
        self.fds: list[int] = [self.memfd]

    @property
    def region(self) -> MemoryRegionDesc:
        return MemoryRegionDesc(GUEST_RAM_BASE, MEMORY, USER_ADDR_BASE, 0)

    def own(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def set_mem_table(self) -> None:
        self.fe.set_mem_table([(self.region, self.memfd)])

    def add_queue(self, size: int = 16) -> DriverQueue:
        q = DriverQueue(
            self.memory, self.allocator, len(self.queues), size, event_idx=False, indirect=False
        )
        self.queues.append(q)
        return q

    def start_queue(self, q: DriverQueue, *, kick: int, call: int) -> None:
        to_user = USER_ADDR_BASE - GUEST_RAM_BASE
        self.fe.set_vring_num(q.index, q.size)
        self.fe.set_vring_base(q.index, 0)
        self.fe.set_vring_addr(
            VringAddr(
                q.index, 0, q.desc_addr + to_user, q.used_addr + to_user, q.avail_addr + to_user, 0
            )
        )
        self.fe.set_vring_fd(FrontendReq.SET_VRING_CALL, q.index, call)
        self.fe.set_vring_fd(FrontendReq.SET_VRING_KICK, q.index, kick)
        self.fe.set_vring_enable(q.index, True)

    def submit_read(self, q: DriverQueue, sector: int = 0, length: int = 4096) -> int:
        """Put a read request on ``q`` (no kick); returns the status byte's address."""
        header = self.allocator.alloc(16)
        self.memory.write(header, REQ_HEADER.pack(BlkRequestType.IN, 0, sector))
        data = self.allocator.alloc(length)
        status = self.allocator.alloc(1)
        self.memory.write(status, b"\xff")
        q.add([(header, 16)], [(data, length), (status, 1)], "req", indirect=False)
        return status

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        send_message(self.fe.sock, data, fds or [])

    def close(self) -> None:
        self.fe.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@contextmanager
def session(path: str, **kw: object) -> Iterator[Session]:
    s = Session(path, **kw)  # type: ignore[arg-type]
    try:
        yield s
    finally:
        s.close()


def raw_connect(path: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking, as QEMU connects: waits while the backlog is full
    s.settimeout(timeout)
    return s


def message(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return encode(request, payload, flags)


# -- a recorded session, replayed cut at every byte ----------------------------------------------


@dataclass
class Recorded:
    """One message a well-behaved front-end sent, with what kind of fds it carried."""

    data: bytes
    fds: list[tuple[str, int]]  # ("eventfd" | "socket" | "memfd", size)


def _kind(fd: int) -> tuple[str, int]:
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link == "anon_inode:[eventfd]":
        return "eventfd", 0
    if link.startswith("socket:"):
        return "socket", 0
    return "memfd", os.fstat(fd).st_size


def record_session(path: str) -> list[Recorded]:
    """The messages :func:`serve_well` sends, recorded on their way to the daemon."""
    from pyvirtio.driver import vhost_user_frontend

    recorded: list[Recorded] = []
    real = vhost_user_frontend.send_message

    def recording(conn: socket.socket, data: bytes, fds: list[int]) -> None:
        recorded.append(Recorded(data, [_kind(fd) for fd in fds]))
        real(conn, data, fds)

    vhost_user_frontend.send_message = recording  # type: ignore[assignment]
    try:
        serve_well(path)
    finally:
        vhost_user_frontend.send_message = real
    return recorded


def make_fd(kind: str, size: int) -> int:
    if kind == "eventfd":
        return eventfd()
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.close()
        return b.detach()
    return memfd(size)


def replay_cut(path: str, messages: list[Recorded], cut: int) -> None:
    """Send the first ``cut`` bytes of the recorded stream (each message's fds with its first
    byte), stop sending, and read what the daemon answers until it ends the session (it has
    then handled every complete message and met the cut one)."""
    s = raw_connect(path, timeout=10.0)
    try:
        left = cut
        for msg in messages:
            if left <= 0:
                break
            fds = [make_fd(kind, size) for kind, size in msg.fds]
            try:
                send_message(s, msg.data[:left], fds)
            except OSError:
                return  # the daemon ended the session first (a refused request): fine
            finally:
                for fd in fds:
                    os.close(fd)
            left -= len(msg.data)
        s.shutdown(socket.SHUT_WR)
        while True:
            data, ancdata, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
            for level, kind, cdata in ancdata:  # the in-flight fd of GET_INFLIGHT_FD
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for i in range(0, len(cdata) - len(cdata) % 4, 4):
                        os.close(int.from_bytes(cdata[i : i + 4], "little"))
            if not data:
                return
    except ConnectionResetError:
        return
    finally:
        s.close()
