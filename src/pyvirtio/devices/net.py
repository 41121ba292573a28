"""virtio-net (VIRTIO 1.2 §5.1) on a network port: a TAP device or a pyvirtio switch.

One receive and one transmit queue. Frames carry the virtio-net header both ways, which is
also what TAP devices and the switch carry, so transmitting is one ``writev`` of the guest's
buffers. Received frames are read into a buffer of the device's and copied into as many of
the guest's receive buffers as they need (MRG_RXBUF, §5.1.6.3.2): the size of a frame is only
known once it is read.

Offloads: the device offers checksum offload both ways (CSUM, GUEST_CSUM) and, when the port
takes segmentation offload (a TAP), TSO both ways (HOST_TSO4/6, GUEST_TSO4/6). A frame with a
partial checksum for a guest that did not take GUEST_CSUM gets its checksum completed here.
The config space has the MAC address and the link status (MAC, STATUS).

Nothing waits without bound: a frame the port cannot take is dropped (counted). Frames from
the port are read as they come by a thread of the device's own, into a queue of at most
``RX_QUEUE_FRAMES`` frames and ``RX_QUEUE_BYTES`` bytes (what a NIC's receive ring holds: a
switch's datagram sockets hold only ten), and wait there for the guest's buffers; past that,
they wait in the port, which drops what it cannot hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque

from pyvirtio.device import DeviceError, VirtioDevice
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.network.port import NetPort
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import (
    CONFIG,
    HEADER,
    HEADER_SIZE,
    NUM_BUFFERS_OFFSET,
    RX_QUEUE,
    TX_QUEUE,
    GsoType,
    HeaderFlag,
    NetFeature,
    NetStatus,
)
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

#: The largest frame with its header: a 64 KiB GSO frame plus Ethernet and virtio-net headers.
MAX_FRAME = HEADER_SIZE + 65550
#: The header of a legacy driver without MRG_RXBUF has no num_buffers (§5.1.6).
LEGACY_HEADER_SIZE = 10
#: Frames read from the port that wait for the guest's receive buffers, at most.
RX_QUEUE_FRAMES = 256
RX_QUEUE_BYTES = 4 << 20


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def random_mac() -> bytes:
    """A locally administered unicast address."""
    return bytes([0x52, 0x54, 0x00]) + os.urandom(3)


def complete_checksum(frame: memoryview, csum_start: int, csum_offset: int) -> bool:
    """Finish a partial checksum (NEEDS_CSUM) in ``frame`` (the Ethernet frame): the field holds
    the pseudo-header sum, and the ones' complement sum from ``csum_start`` on goes there."""
    field = csum_start + csum_offset
    if field + 2 > len(frame) or csum_start >= len(frame):
        return False
    data = bytes(frame[csum_start:])
    if len(data) % 2:
        data += b"\0"
    total = sum(memoryview(data).cast("H"))  # native order: the ones' complement sum is
    while total >> 16:  # independent of byte order as long as the result is stored the same
        total = (total & 0xFFFF) + (total >> 16)
    value = ~total & 0xFFFF
    frame[field : field + 2] = value.to_bytes(2, "little")
    return True


class NetDevice(VirtioDevice):
    device_id = DeviceId.NET

    def __init__(self, port: NetPort, *, mac: bytes | None = None, queue_size: int = 1024) -> None:
        self.port = port
        self.mac = mac if mac is not None else random_mac()
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise ValueError("the MAC address must be 6 bytes, unicast")
        super().__init__(2, queue_size)
        self._bounce = memoryview(bytearray(MAX_FRAME))
        self._received: deque[bytearray] = deque()  # frames from the port, for the guest
        self._received_bytes = 0
        self._received_lock = threading.Lock()
        self._frame: bytearray | None = None  # the frame being given to the guest
        self._errors = GuestErrorLog(log)
        self.counters = dict.fromkeys(
            ("tx", "tx_dropped", "tx_gso", "tx_csum", "rx", "rx_dropped", "rx_gso", "rx_csum_done"),
            0,
        )
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._thread = threading.Thread(target=self._poll_port, name="net-port", daemon=True)
        self._thread.start()

    # -- features and config -------------------------------------------------------------------

    def device_features(self) -> int:
        features = (
            bit(NetFeature.MAC)
            | bit(NetFeature.STATUS)
            | bit(NetFeature.MRG_RXBUF)
            | bit(NetFeature.CSUM)
            | bit(NetFeature.GUEST_CSUM)
        )
        if self.port.takes_gso:
            features |= (
                bit(NetFeature.HOST_TSO4)
                | bit(NetFeature.HOST_TSO6)
                | bit(NetFeature.GUEST_TSO4)
                | bit(NetFeature.GUEST_TSO6)
            )
        return features

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, NetStatus.LINK_UP, 1, 0)[:8]

    def on_features(self) -> None:
        self.port.set_offloads(
            csum=self.negotiated(NetFeature.GUEST_CSUM),
            tso4=self.negotiated(NetFeature.GUEST_TSO4),
            tso6=self.negotiated(NetFeature.GUEST_TSO6),
        )

    def _header_size(self) -> int:
        modern = self.negotiated(Feature.VERSION_1) or self.negotiated(NetFeature.MRG_RXBUF)
        return HEADER_SIZE if modern else LEGACY_HEADER_SIZE

    # -- queues --------------------------------------------------------------------------------

    def has_work(self, queue: SplitQueue) -> bool:
        if queue.index == RX_QUEUE:
            return self._frame is not None or bool(self._received)
        return True

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        if queue.index != TX_QUEUE:
            raise DeviceError(f"queue {queue.index}: virtio-net has queues 0 and 1")
        self._transmit(chain)
        return 0

    def handle_chains(
        self, queue: SplitQueue, chain: DescriptorChain
    ) -> list[tuple[DescriptorChain, int]]:
        if queue.index == RX_QUEUE:
            return self._receive(queue, chain)
        return super().handle_chains(queue, chain)

    def on_reset(self) -> None:
        self._frame = None

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)
        self._thread.join()
        os.close(self._wake)
        log.info("net: %s", ", ".join(f"{k} {v}" for k, v in self.counters.items()))

    # -- transmit ------------------------------------------------------------------------------

    def _transmit(self, chain: DescriptorChain) -> None:
        size = self._header_size()
        if chain.fault is not None or chain.writable or chain.read_len < size + 14:
            self._errors.warning("net: malformed transmit buffer dropped (%s)", chain.fault)
            self.counters["tx_dropped"] += 1
            return
        taken = chain.take_readable(size)
        assert taken is not None
        header, frame = taken
        flags, gso_type = header[0], header[1]
        if gso_type & ~GsoType.ECN and not self.port.takes_gso:
            self._errors.warning("net: segmentation offload that was not offered; dropped")
            self.counters["tx_dropped"] += 1
            return
        if gso_type:
            self.counters["tx_gso"] += 1
        if flags & HeaderFlag.NEEDS_CSUM:
            self.counters["tx_csum"] += 1
        full = header.ljust(HEADER_SIZE, b"\0")  # the port's header has num_buffers
        if self.port.send([memoryview(full), *frame]):
            self.counters["tx"] += 1
        else:
            self.counters["tx_dropped"] += 1

    # -- receive -------------------------------------------------------------------------------

    def _read_frame(self) -> bool:
        """The next frame for the guest, from the queue of received ones; False if none."""
        if self._frame is not None:
            return True
        with self._received_lock:
            if not self._received:
                return False
            frame = self._received.popleft()
            full = (
                self._received_bytes >= RX_QUEUE_BYTES or len(self._received) + 1 >= RX_QUEUE_FRAMES
            )
            self._received_bytes -= len(frame)
        if full:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)  # room again: read the port
        flags, gso_type, _, _, csum_start, csum_offset, _ = HEADER.unpack_from(frame)
        if gso_type:
            self.counters["rx_gso"] += 1
        partial = flags & HeaderFlag.NEEDS_CSUM and not self.negotiated(NetFeature.GUEST_CSUM)
        if partial and complete_checksum(memoryview(frame)[HEADER_SIZE:], csum_start, csum_offset):
            frame[0] = 0
            self.counters["rx_csum_done"] += 1
        self._frame = frame
        return True

    def _receive(
        self, queue: SplitQueue, chain: DescriptorChain
    ) -> list[tuple[DescriptorChain, int]]:
        """The next frame from the port into ``chain`` and, with MRG_RXBUF, as many more of the
        guest's buffers as it needs. Without a frame, or without enough buffers yet, the chains
        go back to the ring; a frame too large for a guest without MRG_RXBUF is dropped."""
        if chain.fault is not None or chain.readable:
            raise DeviceError("net: a receive buffer must be device-writable")
        mergeable = self.negotiated(NetFeature.MRG_RXBUF)
        header_size = self._header_size()
        while self._read_frame():
            assert self._frame is not None
            total = len(self._frame) - HEADER_SIZE + header_size
            chains, room = [chain], chain.write_len
            while room < total and mergeable:
                more = queue.pop()
                if more is None:  # not enough buffers yet: wait for the guest's next ones
                    queue.unpop(chains)
                    return []
                chains.append(more)
                if more.fault is not None or more.readable:
                    queue.unpop(chains)
                    raise DeviceError("net: a receive buffer must be device-writable")
                room += more.write_len
            if room < total:
                self._frame = None
                self.counters["rx_dropped"] += 1
                continue
            return self._deliver(chains, header_size, total)
        queue.unpop([chain])
        return []

    def _deliver(
        self, chains: list[DescriptorChain], header_size: int, total: int
    ) -> list[tuple[DescriptorChain, int]]:
        frame = self._frame
        assert frame is not None
        if header_size == HEADER_SIZE:
            frame[NUM_BUFFERS_OFFSET : NUM_BUFFERS_OFFSET + 2] = len(chains).to_bytes(2, "little")
            data = memoryview(frame)
        else:  # a legacy header: two bytes shorter
            data = memoryview(frame[:header_size] + frame[HEADER_SIZE:])
        done = []
        pos = 0
        for taken in chains:
            start = pos
            for view in taken.writable:
                n = min(len(view), total - pos)
                if n <= 0:
                    break
                view[:n] = data[pos : pos + n]
                pos += n
            done.append((taken, pos - start))
        self._frame = None
        self.counters["rx"] += 1
        return done

    # -- the port ------------------------------------------------------------------------------

    def _poll_port(self) -> None:
        """Read frames from the port as they come, while the queue for the guest has room."""
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        port_fd = self.port.fileno()
        try:
            while not self._stopping:
                room = self._has_room()
                if room:
                    poller.register(port_fd, select.POLLIN)
                events = poller.poll()
                if room:
                    poller.unregister(port_fd)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                if any(fd == port_fd for fd, _ in events) and self._read_port():
                    self.notify_queue(RX_QUEUE)
        except Exception:
            log.exception("net: port thread failed")

    def _has_room(self) -> bool:
        with self._received_lock:
            return len(self._received) < RX_QUEUE_FRAMES and self._received_bytes < RX_QUEUE_BYTES

    def _read_port(self) -> bool:
        """Frames from the port into the queue for the guest; whether any came."""
        got = False
        while self._has_room():
            size = self.port.receive_into(self._bounce)
            if size is None:
                break
            if size < HEADER_SIZE + 14:
                self.counters["rx_dropped"] += 1
                continue
            frame = bytearray(self._bounce[:size])
            with self._received_lock:
                self._received.append(frame)
                self._received_bytes += size
            got = True
        return got
