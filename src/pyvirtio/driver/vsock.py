"""A virtio-vsock driver: the guest's side of stream sockets, as Linux's virtio_transport does it
(receive buffers of a header and 4 KiB posted in advance, credit-based flow control), small
enough for tests and the load generator.

Single-threaded: :meth:`VsockDriver.poll` takes what the device put in the receive queue and
dispatches it; the blocking calls (:meth:`VsockStream.recv`, :meth:`VsockStream.send`,
:meth:`VsockDriver.connect`, :meth:`VsockDriver.accept`) poll until what they wait for comes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.transport import DriverTransport
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.vsock import (
    CONFIG,
    HEADER,
    HEADER_SIZE,
    HOST_CID,
    RX_QUEUE,
    TX_QUEUE,
    ShutdownFlag,
    VsockOp,
    VsockType,
)

RX_BUFFER = 4096
RX_BUFFERS = 64
BUF_ALLOC = 256 * 1024
FIRST_PORT = 50000


@dataclass
class _Packet:
    header: tuple[int, ...]
    payload: bytes


@dataclass(eq=False)
class VsockStream:
    """One stream connection, guest side."""

    driver: VsockDriver
    port: int  # ours
    peer_port: int
    established: bool = False
    closed: bool = False
    peer_shutdown: bool = False
    received: bytearray = field(default_factory=bytearray)
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    fwd_cnt: int = 0
    credit_told: int = 0

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        pos = 0
        while pos < len(data):
            if self.closed:
                raise DriverError("the connection was reset")
            credit = self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)
            if credit <= 0:
                self.driver._wait_until(lambda: self.closed or self._credit() > 0, deadline)
                continue
            chunk = data[pos : pos + min(credit, RX_BUFFER * 16)]
            self.driver._send(self, VsockOp.RW, payload=chunk)
            self.tx_cnt += len(chunk)
            pos += len(chunk)

    def _credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def recv(self, size: int, timeout: float = 10.0) -> bytes:
        """Up to ``size`` bytes, at least one unless the peer shut down (then b"")."""
        deadline = time.monotonic() + timeout
        self.driver._wait_until(
            lambda: bool(self.received) or self.peer_shutdown or self.closed, deadline
        )
        data = bytes(self.received[:size])
        del self.received[:size]
        self.fwd_cnt += len(data)
        if self.fwd_cnt - self.credit_told >= BUF_ALLOC // 2:
            self.driver._send(self, VsockOp.CREDIT_UPDATE)
        return data

    def recv_exactly(self, size: int, timeout: float = 10.0) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = self.recv(size - len(out), timeout)
            if not chunk:
                raise DriverError(f"the peer ended the stream after {len(out)} of {size} bytes")
            out += chunk
        return bytes(out)

    def shutdown(self) -> None:
        """Shut both directions down; the peer answers with RST."""
        self.driver._send(self, VsockOp.SHUTDOWN, flags=int(ShutdownFlag.RCV | ShutdownFlag.SEND))


class VsockDriver:
    """virtio-vsock on any driver transport (virtio-mmio, vhost-user)."""

    def __init__(
        self, transport: DriverTransport, *, wait: Callable[[float], bool] | None = None
    ) -> None:
        if transport.device_id != DeviceId.VSOCK:
            raise DriverError(f"device id {transport.device_id} is not a vsock device")
        self.transport = transport
        self._wait = wait
        transport.negotiate(bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX))
        self.cid: int = CONFIG.unpack(transport.read_config_bytes(CONFIG.size))[0]
        transport.setup_queues(3)
        transport.driver_ok()
        self.streams: dict[tuple[int, int], VsockStream] = {}
        self.listening: dict[int, deque[VsockStream]] = {}
        self.resets: list[tuple[int, int]] = []  # (our port, peer port) the device reset
        self._next_port = FIRST_PORT
        rx = transport.queues[RX_QUEUE]
        for _ in range(RX_BUFFERS):
            self._post_rx()
        transport.kick(rx.index)

    # -- queues --------------------------------------------------------------------------------

    def _post_rx(self) -> None:
        addr = self.transport.allocator.alloc(HEADER_SIZE + RX_BUFFER)
        self.transport.queues[RX_QUEUE].add(
            [], [(addr, HEADER_SIZE), (addr + HEADER_SIZE, RX_BUFFER)], addr, indirect=False
        )

    def _send(self, stream: VsockStream, op: int, *, flags: int = 0, payload: bytes = b"") -> None:
        header = HEADER.pack(
            self.cid,
            HOST_CID,
            stream.port,
            stream.peer_port,
            len(payload),
            VsockType.STREAM,
            op,
            flags,
            BUF_ALLOC,
            stream.fwd_cnt,
        )
        stream.credit_told = stream.fwd_cnt
        memory, allocator = self.transport.memory, self.transport.allocator
        tx = self.transport.queues[TX_QUEUE]
        while tx.num_free < 2:
            self._reap_tx()
            if tx.num_free < 2 and self._wait is not None:
                self._wait(0.1)
        addr = allocator.alloc(HEADER_SIZE + max(1, len(payload)))
        memory.write(addr, header + payload)
        buffers = [(addr, HEADER_SIZE)]
        if payload:
            buffers.append((addr + HEADER_SIZE, len(payload)))
        tx.add(buffers, [], (addr, HEADER_SIZE + max(1, len(payload))), indirect=False)
        self.transport.kick(TX_QUEUE)

    def _reap_tx(self) -> None:
        for (addr, size), _ in self.transport.queues[TX_QUEUE].get_used():
            self.transport.allocator.free(addr, size)

    def poll(self) -> None:
        """Dispatch what the device put in the receive queue, and refill it."""
        self._reap_tx()
        rx = self.transport.queues[RX_QUEUE]
        used = rx.get_used()
        for addr, written in used:
            if written >= HEADER_SIZE:
                data = self.transport.memory.read(addr, written)
                self._dispatch(_Packet(HEADER.unpack(data[:HEADER_SIZE]), data[HEADER_SIZE:]))
            self.transport.allocator.free(addr, HEADER_SIZE + RX_BUFFER)
            self._post_rx()
        if used:
            self.transport.kick(RX_QUEUE)

    def _dispatch(self, packet: _Packet) -> None:
        src_cid, dst_cid, src_port, dst_port, length, _, op, flags, buf_alloc, fwd_cnt = (
            packet.header
        )
        if src_cid != HOST_CID or dst_cid != self.cid or length != len(packet.payload):
            raise DriverError(f"bad packet from the device: {packet.header}")
        key = (dst_port, src_port)
        stream = self.streams.get(key)
        if stream is None:
            if op == VsockOp.REQUEST and dst_port in self.listening:
                stream = VsockStream(self, dst_port, src_port, established=True)
                stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
                self.streams[key] = stream
                self.listening[dst_port].append(stream)
                self._send(stream, VsockOp.RESPONSE)
            elif op == VsockOp.RST:
                self.resets.append(key)
            return
        stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == VsockOp.RESPONSE:
            stream.established = True
        elif op == VsockOp.RW:
            stream.received += packet.payload
        elif op == VsockOp.SHUTDOWN:
            stream.peer_shutdown = True
            if (
                flags & (ShutdownFlag.RCV | ShutdownFlag.SEND)
                == ShutdownFlag.RCV | ShutdownFlag.SEND
            ):
                self._send(stream, VsockOp.RST)
                stream.closed = True
                del self.streams[key]
        elif op == VsockOp.RST:
            stream.closed = True
            self.resets.append(key)
            del self.streams[key]
        elif op == VsockOp.CREDIT_REQUEST:
            self._send(stream, VsockOp.CREDIT_UPDATE)

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        while True:
            self.poll()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("vsock: timed out")
            if self._wait is None:
                raise DriverError("vsock: waiting on a synchronous device")
            self._wait(min(left, 0.1))

    # -- sockets -------------------------------------------------------------------------------

    def connect(self, port: int, timeout: float = 10.0) -> VsockStream:
        """Connect to the host (CID 2) on ``port``; DriverError if the device resets it."""
        stream = VsockStream(self, self._next_port, port)
        self._next_port += 1
        self.streams[(stream.port, port)] = stream
        self._send(stream, VsockOp.REQUEST)
        self._wait_until(lambda: stream.established or stream.closed, time.monotonic() + timeout)
        if stream.closed:
            raise DriverError(f"connection to host port {port} refused")
        return stream

    def listen(self, port: int) -> None:
        self.listening.setdefault(port, deque())

    def accept(self, port: int, timeout: float = 10.0) -> VsockStream:
        pending = self.listening[port]
        self._wait_until(lambda: bool(pending), time.monotonic() + timeout)
        return pending.popleft()
