"""A driver transport over vhost-user: this process plays both the guest and its VMM.

Guest memory is a memfd shared with the back-end through SET_MEM_TABLE; queues are laid out in
it by :class:`~pyvirtio.driver.virtqueue.DriverQueue` and handed over with SET_VRING_*; kicks and
interrupts are eventfds. Device drivers (``driver.blk``) run on it unchanged, which is how the
load generator and the vhost-user tests drive any vhost-user back-end without a guest.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import time
from collections.abc import Sequence

from pyvirtio.driver.vhost_user_frontend import FrontendError, VhostUserFrontend
from pyvirtio.driver.virtqueue import DriverQueue, GuestAllocator
from pyvirtio.memory.atomic import address_of, exchange_u64
from pyvirtio.memory.dirty_log import LOG_PAGE
from pyvirtio.memory.guest import GuestMemory, MemoryRegion
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    VRING_F_LOG,
    FrontendReq,
    InflightDesc,
    MemoryRegionDesc,
    ProtocolFeature,
    VringAddr,
)

#: Protocol features this front-end can use.
FRONTEND_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.INFLIGHT_SHMFD)
    | bit(ProtocolFeature.LOG_SHMFD)
)
#: Where guest RAM starts in the address space we present.
GUEST_RAM_BASE = 0x4000_0000
#: The "user address" we claim the memory has in the VMM; any value works if it is consistent.
USER_ADDR_BASE = 0x7F00_0000_0000


class VhostUserDriver:
    """Implements :class:`~pyvirtio.driver.transport.DriverTransport` over a vhost-user socket."""

    def __init__(
        self,
        path: str,
        device_id: int,
        *,
        memory_size: int = 64 << 20,
        timeout: float = 5.0,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
    ) -> None:
        self.device_id = device_id
        self.frontend = VhostUserFrontend(path, timeout=timeout)
        region, self.memfd = MemoryRegion.memfd(GUEST_RAM_BASE, memory_size)
        self.memory = GuestMemory([region])
        self.allocator = GuestAllocator(GUEST_RAM_BASE, memory_size)
        self.memory_size = memory_size
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        self._wanted_protocol = protocol_features
        self._poll = select.poll()
        self._protocol_negotiated = False
        #: The in-flight tracking area, kept across reconnections as QEMU keeps it.
        self.inflight: tuple[InflightDesc, int] | None = None
        self.interrupts = 0
        self._log: mmap.mmap | None = None

    # -- DriverTransport -----------------------------------------------------------------------

    def negotiate(self, wanted: int) -> int:
        fe = self.frontend
        fe.negotiate_protocol(self._wanted_protocol)
        fe.set_owner()
        offered = fe.get_features()
        self.features = offered & (wanted | bit(Feature.VERSION_1))
        self._protocol_negotiated = bool(offered & bit(F_PROTOCOL_FEATURES))
        self._set_features(logging=False)
        return self.features

    def _set_features(self, *, logging: bool) -> None:
        extra = bit(F_PROTOCOL_FEATURES) if self._protocol_negotiated else 0
        self.frontend.set_features(self.features | extra | (bit(F_LOG_ALL) if logging else 0))

    def has(self, feature: int) -> bool:
        return has(self.features, feature)

    def read_config_bytes(self, length: int) -> bytes:
        return self.frontend.get_config(0, length)

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.frontend.set_config(offset, value.to_bytes(size, "little"))

    def setup_queues(self, count: int, sizes: Sequence[int] | None = None) -> list[DriverQueue]:
        fe = self.frontend
        if fe.protocol_features >> ProtocolFeature.MQ & 1:
            available = fe.get_queue_num()
            if count > available:
                raise FrontendError(f"back-end has {available} queues, {count} wanted")
        for index in range(count):
            self.queues.append(
                DriverQueue(
                    self.memory,
                    self.allocator,
                    index,
                    sizes[index] if sizes else 128,
                    event_idx=self.has(Feature.RING_EVENT_IDX),
                    indirect=self.has(Feature.RING_INDIRECT_DESC),
                )
            )
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.kick_fds.append(kick)
            self.call_fds.append(call)
            self._poll.register(call, select.POLLIN)
        self._hand_over_rings()
        return self.queues

    # -- live migration ------------------------------------------------------------------------

    def start_dirty_log(self) -> None:
        """Have the back-end log its writes to guest memory, as QEMU does when a migration
        starts: SET_LOG_BASE (a sealed memfd, a bit per page), VHOST_F_LOG_ALL, and
        VHOST_VRING_F_LOG on the running rings."""
        size = -(-(GUEST_RAM_BASE + self.memory_size) // (LOG_PAGE * 8 * 8)) * 8
        fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
            self._log = mmap.mmap(fd, size)
            self.frontend.set_log_base(fd, size)
        finally:
            os.close(fd)
        self._set_features(logging=True)
        for queue in self.queues:
            self.frontend.set_vring_addr(self._vring_addr(queue, logging=True))

    def stop_dirty_log(self) -> None:
        """The migration ended: no more logging (the log stays mapped on both sides)."""
        self._set_features(logging=False)
        for queue in self.queues:
            self.frontend.set_vring_addr(self._vring_addr(queue, logging=False))

    def collect_dirty_pages(self) -> set[int]:
        """The guest-physical pages logged since the last call, cleared as QEMU clears them
        (an atomic exchange per 64 pages, while the back-end goes on logging)."""
        assert self._log is not None
        view = memoryview(self._log)
        base = address_of(view)
        pages: set[int] = set()
        for offset in range(0, len(view), 8):
            word = exchange_u64(base + offset, 0) if any(view[offset : offset + 8]) else 0
            while word:
                low = word & -word
                pages.add(offset * 8 + low.bit_length() - 1)
                word ^= low
        view.release()
        return pages

    def _vring_addr(self, queue: DriverQueue, *, logging: bool) -> VringAddr:
        to_user = USER_ADDR_BASE - GUEST_RAM_BASE
        return VringAddr(
            queue.index,
            1 << VRING_F_LOG if logging else 0,
            queue.desc_addr + to_user,
            queue.used_addr + to_user,
            queue.avail_addr + to_user,
            queue.used_addr,
        )

    def migrate(self, path: str, bases: Sequence[int]) -> None:
        """Go on with another back-end, as the destination of a live migration does: a new
        connection, a fresh in-flight area, and the rings resumed at ``bases`` (what the
        source's GET_VRING_BASE answered). The guest memory is the same: a migration has
        made it equal by then."""
        self.frontend.close()
        self.frontend = VhostUserFrontend(path, timeout=self.frontend.timeout)
        if self.inflight is not None:
            os.close(self.inflight[1])
            self.inflight = None
        features = self.features
        self.negotiate(features)
        if self.features != features:
            raise FrontendError("the destination back-end offers other features")
        self._hand_over_rings(bases)

    def _hand_over_rings(self, bases: Sequence[int] | None = None) -> None:
        """Memory table, in-flight area and vrings, as a VMM starts (or restarts) a device."""
        fe = self.frontend
        fe.set_mem_table(
            [(MemoryRegionDesc(GUEST_RAM_BASE, self.memory_size, USER_ADDR_BASE, 0), self.memfd)]
        )
        if fe.protocol_features >> ProtocolFeature.INFLIGHT_SHMFD & 1:
            if self.inflight is None:
                size = max(q.size for q in self.queues)
                self.inflight = fe.get_inflight_fd(len(self.queues), size)
            fe.set_inflight_fd(*self.inflight)
        for queue in self.queues:
            index = queue.index
            fe.set_vring_num(index, queue.size)
            # Without bases, the used index in guest memory: what a VMM that lost its back-end
            # knows for sure.
            fe.set_vring_base(index, queue.used_idx if bases is None else bases[index])
            fe.set_vring_addr(self._vring_addr(queue, logging=False))
            fe.set_vring_fd(FrontendReq.SET_VRING_CALL, index, self.call_fds[index])
            fe.set_vring_fd(FrontendReq.SET_VRING_KICK, index, self.kick_fds[index])
            if self._protocol_negotiated:
                fe.set_vring_enable(index, True)

    def reconnect(self, timeout: float = 10.0) -> None:
        """Connect again after the back-end went away (QEMU's ``reconnect=1``): same guest
        memory, same rings and requests in flight, same in-flight area."""
        self.frontend.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.frontend = VhostUserFrontend(self.frontend.path, timeout=self.frontend.timeout)
                break
            except FrontendError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        features = self.features
        self.negotiate(features)
        if self.features != features:
            raise FrontendError("the back-end came back with other features")
        self._hand_over_rings()

    def driver_ok(self) -> None:
        pass

    def notify(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)

    def kick(self, index: int) -> bool:
        if self.queues[index].kick_prepare():
            self.notify(index)
            return True
        return False

    # -- interrupts ----------------------------------------------------------------------------

    def wait_interrupt(self, timeout: float) -> bool:
        """Wait for any call eventfd; consumes what fired."""
        events = self._poll.poll(timeout * 1000)
        for fd, _ in events:
            try:
                os.eventfd_read(fd)
                self.interrupts += 1
            except BlockingIOError:
                pass
        return bool(events)

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> list[int]:
        """GET_VRING_BASE on every queue, as a VMM stopping the device; returns the bases."""
        return [self.frontend.get_vring_base(q.index) for q in self.queues]

    def close(self) -> None:
        self.frontend.close()
        for fd in [*self.kick_fds, *self.call_fds, self.memfd]:
            os.close(fd)
        if self.inflight is not None:
            os.close(self.inflight[1])
            self.inflight = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.kick_fds, self.call_fds = [], []
        self.queues = []
