"""A virtio-net driver, as Linux's virtio_net.c uses mergeable receive buffers: small buffers
posted in advance, a frame spread over as many as its header's num_buffers says."""

from __future__ import annotations

import time
from collections.abc import Callable

from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.transport import DriverTransport
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import (
    CONFIG,
    HEADER,
    HEADER_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    HeaderFlag,
    NetFeature,
)

#: What this driver takes by default: Linux's usual set without TSO.
DRIVER_FEATURES = (
    bit(Feature.VERSION_1)
    | bit(Feature.RING_EVENT_IDX)
    | bit(NetFeature.MAC)
    | bit(NetFeature.STATUS)
    | bit(NetFeature.MRG_RXBUF)
    | bit(NetFeature.CSUM)
    | bit(NetFeature.GUEST_CSUM)
)


class NetDriver:
    """virtio-net on any driver transport (virtio-mmio, vhost-user)."""

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int = DRIVER_FEATURES,
        rx_buffer: int = 1536,
        rx_buffers: int = 64,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if transport.device_id != DeviceId.NET:
            raise DriverError(f"device id {transport.device_id} is not a network device")
        self.transport = transport
        self._wait = wait
        self.features = transport.negotiate(features)
        mac, status, _, _ = CONFIG.unpack(transport.read_config_bytes(CONFIG.size))
        self.mac: bytes = mac
        self.status: int = status
        transport.setup_queues(2)
        transport.driver_ok()
        self.rx_buffer = rx_buffer
        for _ in range(rx_buffers):
            self.post_rx()
        transport.kick(RX_QUEUE)
        self._partial: list[bytes] = []
        self._expected = 0

    def post_rx(self, count: int = 1) -> None:
        for _ in range(count):
            addr = self.transport.allocator.alloc(self.rx_buffer)
            self.transport.queues[RX_QUEUE].add([], [(addr, self.rx_buffer)], addr, False)

    # -- transmit ------------------------------------------------------------------------------

    def send(self, frame: bytes, *, csum_start: int = 0, csum_offset: int = 0) -> None:
        """One Ethernet frame; with ``csum_offset``, the device completes its checksum
        (NEEDS_CSUM: the field holds the pseudo-header sum)."""
        flags = HeaderFlag.NEEDS_CSUM if csum_offset else 0
        header = HEADER.pack(flags, 0, 0, 0, csum_start, csum_offset, 0)
        tx = self.transport.queues[TX_QUEUE]
        self._reap_tx()
        if tx.num_free < 2:
            raise DriverError("transmit queue full")
        memory, allocator = self.transport.memory, self.transport.allocator
        addr = allocator.alloc(HEADER_SIZE + len(frame))
        memory.write(addr, header + frame)
        tx.add(
            [(addr, HEADER_SIZE), (addr + HEADER_SIZE, len(frame))],
            [],
            (addr, HEADER_SIZE + len(frame)),
            False,
        )
        self.transport.kick(TX_QUEUE)

    def _reap_tx(self) -> None:
        for (addr, size), _ in self.transport.queues[TX_QUEUE].get_used():
            self.transport.allocator.free(addr, size)

    # -- receive -------------------------------------------------------------------------------

    def poll(self) -> list[tuple[tuple[int, ...], bytes]]:
        """Frames the device delivered: (their header fields, the frame), reposting buffers."""
        frames = []
        rx = self.transport.queues[RX_QUEUE]
        memory = self.transport.memory
        for addr, written in rx.get_used():
            data = memory.read(addr, written)
            self.transport.allocator.free(addr, self.rx_buffer)
            self.post_rx()
            if not self._partial:
                if written < HEADER_SIZE:
                    raise DriverError(f"receive buffer with {written} bytes: no header")
                self._expected = HEADER.unpack_from(data)[6]
                if self._expected < 1:
                    raise DriverError("a frame in 0 buffers")
            self._partial.append(data)
            if len(self._partial) == self._expected:
                whole = b"".join(self._partial)
                self._partial = []
                frames.append((HEADER.unpack_from(whole), whole[HEADER_SIZE:]))
        self.transport.kick(RX_QUEUE)
        return frames

    def receive(self, count: int = 1, timeout: float = 10.0) -> list[tuple[tuple[int, ...], bytes]]:
        deadline = time.monotonic() + timeout
        got: list[tuple[tuple[int, ...], bytes]] = []
        while len(got) < count:
            got += self.poll()
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"received {len(got)} of {count} frames")
            if self._wait is None:
                raise DriverError("waiting on a synchronous device")
            self._wait(min(left, 0.1))
        return got
