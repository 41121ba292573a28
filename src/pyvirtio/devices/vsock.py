"""virtio-vsock (VIRTIO 1.2 §5.10) with hybrid vsock on the host, as Firecracker,
cloud-hypervisor and vhost-device-vsock do it: guest sockets meet host programs on UNIX
sockets.

- A host program connects to ``uds_path`` (the listener the device is given) and writes
  ``CONNECT <port>\\n``; the guest's listener on vsock port ``<port>`` gets a connection, and
  the host program reads ``OK <host port>\\n`` before the stream starts.
- A guest connection to the host (CID 2) on port ``<port>`` goes to the UNIX socket
  ``<uds_path>_<port>``, where a host program listens.

Streams are byte-exact both ways and many can be open at once. Flow control is vsock's credit
(§5.10.6.3): the device never sends the guest more than the guest's buffer space allows, and
advertises ``buf_alloc`` bytes of its own per connection; what a host socket does not take at
once waits in that connection's backlog, which the guest's credit bounds (a guest that
overruns it gets its connection reset). Data from the host is received straight into the
guest's receive buffers, so nothing from the host is buffered at all.

Threads: the queues' workers (the runner's) move packets; a host thread of the device's own
polls the UNIX sockets and tells the receive queue when there is something for the guest.
A host socket that stalls or disappears affects its own connection only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections import deque
from dataclasses import dataclass, field

from pyvirtio.device import DeviceError, VirtioDevice
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.vsock import (
    CONFIG,
    EVENT_QUEUE,
    FIRST_GUEST_CID,
    HEADER,
    HEADER_SIZE,
    HOST_CID,
    MAX_GUEST_CID,
    RX_QUEUE,
    TX_QUEUE,
    ShutdownFlag,
    VsockOp,
    VsockType,
)
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

#: Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD = 64 * 1024
#: Replies (control packets) waiting for receive buffers before the device stops taking the guest's
#: transmissions (their replies would pile up otherwise).
MAX_CONTROL = 256
#: Host programs connected to ``uds_path`` that have not finished their CONNECT line.
MAX_PENDING_CLIENTS = 64
MAX_CONNECT_LINE = 64
#: Host ports the device gives connections that host programs start.
FIRST_HOST_PORT = 1 << 30

_STREAM = VsockType.STREAM.value
_BOTH = ShutdownFlag.RCV | ShutdownFlag.SEND


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    host_port: int
    guest_port: int
    established: bool
    #: A host program's connection through ``CONNECT``: it is told ``OK`` on the guest's
    #: RESPONSE.
    from_host: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # bytes of the guest's forwarded to the host socket
    credit_told: int = 0  # fwd_cnt when the guest last heard it
    backlog: bytearray = field(default_factory=bytearray)
    readable: bool = False  # the host socket has data; queued for the receive queue
    guest_done_sending: bool = False
    host_eof: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def credit(self) -> int:
        """Bytes the guest can take now (§5.10.6.3)."""
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


@dataclass
class _Client:
    """A host program that connected to ``uds_path`` and has not said CONNECT yet."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)


class VsockDevice(VirtioDevice):
    device_id = DeviceId.VSOCK

    def __init__(
        self,
        guest_cid: int,
        uds_path: str,
        *,
        listener: socket.socket | None = None,
        buf_alloc: int = 64 * 1024,
        max_connections: int = 256,
        queue_size: int = 1024,
    ) -> None:
        """``listener``: the listening socket at ``uds_path`` (host-started connections);
        ``uds_path``: the prefix of ``<uds_path>_<port>``, where guest-started connections
        go. The device does not close the listener."""
        if not FIRST_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(f"guest CID {guest_cid} is not in {FIRST_GUEST_CID}..{MAX_GUEST_CID}")
        super().__init__(3, queue_size)
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = listener
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._replies: deque[tuple[int, int, int, int]] = (
            deque()
        )  # host port, guest port, op, flags
        self._readable: deque[_Conn] = deque()
        self._clients: list[_Client] = []
        self._next_port = FIRST_HOST_PORT
        self._errors = GuestErrorLog(log)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._thread = threading.Thread(target=self._host_loop, name="vsock-host", daemon=True)
        self._thread.start()

    # -- device hooks --------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.guest_cid)

    def has_work(self, queue: SplitQueue) -> bool:
        if queue.index == RX_QUEUE:
            return bool(self._replies or self._readable)
        if queue.index == TX_QUEUE:
            return len(self._replies) < MAX_CONTROL
        return False  # the event queue: the device has no events to report

    def on_reset(self) -> None:
        with self._lock:
            self._drop_all()
        self._poke()

    def close(self) -> None:
        self._stopping = True
        self._poke()
        self._thread.join()
        with self._lock:
            self._drop_all()
        os.close(self._wake)

    def _drop_all(self) -> None:
        for conn in self._conns.values():
            conn.sock.close()
        for client in self._clients:
            client.sock.close()
        self._conns.clear()
        self._clients.clear()
        self._replies.clear()
        self._readable.clear()

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        if queue.index == TX_QUEUE:
            self._transmitted(chain)
            return 0
        if queue.index == RX_QUEUE:
            return self._receive_into(chain)
        raise DeviceError("the device takes no buffers on the event queue")

    # -- from the guest (the transmit queue) ---------------------------------------------------

    def _transmitted(self, chain: DescriptorChain) -> None:
        if chain.fault is not None or chain.writable:
            self._errors.warning("vsock: malformed transmit buffer (%s)", chain.fault or "writable")
            return
        taken = chain.take_readable(HEADER_SIZE)
        if taken is None:
            self._errors.warning("vsock: packet shorter than its header")
            return
        header, payload = taken
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = (
            HEADER.unpack(header)
        )
        if src_cid != self.guest_cid or dst_cid != HOST_CID:
            self._errors.warning("vsock: packet from CID %d to CID %d dropped", src_cid, dst_cid)
            return
        if length != chain.read_len - HEADER_SIZE or length > MAX_PAYLOAD:
            self._errors.warning(
                "vsock: packet says %d payload bytes, carries %d",
                length,
                chain.read_len - HEADER_SIZE,
            )
            return
        wake_rx = False
        with self._lock:
            key = (dst_port, src_port)
            conn = self._conns.get(key)
            if kind != _STREAM:
                wake_rx = self._reply(key, VsockOp.RST)
            elif conn is None:
                if op == VsockOp.REQUEST:
                    wake_rx = self._guest_connects(dst_port, src_port, buf_alloc, fwd_cnt)
                elif op != VsockOp.RST:
                    wake_rx = self._reply(key, VsockOp.RST)
            else:
                conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
                wake_rx = self._on_packet(conn, op, flags, payload)
                if conn.credit() > 0 and not conn.readable:
                    self._poke()  # its socket may be read again
        if wake_rx:
            self.notify_queue(RX_QUEUE)

    def _reply(self, key: tuple[int, int], op: VsockOp, flags: int = 0) -> bool:
        self._replies.append((key[0], key[1], op, flags))
        return True

    def _guest_connects(self, port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> bool:
        key = (port, guest_port)
        if len(self._conns) >= self.max_connections:
            return self._reply(key, VsockOp.RST)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except OSError as exc:
            self._errors.warning(
                "vsock: guest port %d -> host port %d: %s", guest_port, port, exc.strerror
            )
            sock.close()
            return self._reply(key, VsockOp.RST)
        conn = _Conn(sock, port, guest_port, established=True)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self._conns[key] = conn
        self._poke()
        return self._reply(key, VsockOp.RESPONSE)

    def _on_packet(self, conn: _Conn, op: int, flags: int, payload: list[memoryview]) -> bool:
        if op == VsockOp.RW:
            return self._forward(conn, payload)
        if op == VsockOp.RESPONSE and not conn.established:
            conn.established = True
            with contextlib.suppress(OSError):
                conn.sock.send(f"OK {conn.host_port}\n".encode())
            self._poke()
            return False
        if op == VsockOp.CREDIT_REQUEST:
            return self._reply(conn.key, VsockOp.CREDIT_UPDATE)
        if op == VsockOp.CREDIT_UPDATE:
            return False
        if op == VsockOp.SHUTDOWN:
            if flags & ShutdownFlag.SEND:
                conn.guest_done_sending = True
                if not conn.backlog:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_WR)
            if flags & _BOTH == _BOTH:
                self._close(conn)
                return self._reply(conn.key, VsockOp.RST)
            return False
        if op == VsockOp.RST:
            self._close(conn)
            return False
        self._close(conn)  # a REQUEST for a connection that exists, or an unknown op
        return self._reply(conn.key, VsockOp.RST)

    def _forward(self, conn: _Conn, payload: list[memoryview]) -> bool:
        """Guest data to the host socket; what it does not take now waits in the backlog."""
        size = sum(len(v) for v in payload)
        if len(conn.backlog) + size > self.buf_alloc:
            self._errors.warning("vsock: guest port %d overran its credit", conn.guest_port)
            self._close(conn)
            return self._reply(conn.key, VsockOp.RST)
        sent = 0
        if not conn.backlog and size:
            try:
                sent = conn.sock.sendmsg(payload)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn)
                return self._reply(conn.key, VsockOp.RST)
        if sent < size:
            conn.backlog += b"".join(payload)[sent:]
            self._poke()
        return self._forwarded(conn, sent)

    def _forwarded(self, conn: _Conn, count: int) -> bool:
        """``count`` more bytes reached the host: tell the guest once it matters."""
        conn.fwd_cnt = (conn.fwd_cnt + count) & 0xFFFF_FFFF
        if (conn.fwd_cnt - conn.credit_told) & 0xFFFF_FFFF >= self.buf_alloc // 2:
            return self._reply(conn.key, VsockOp.CREDIT_UPDATE)
        return False

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.key, None)
        conn.sock.close()
        conn.readable = False

    # -- to the guest (the receive queue) ------------------------------------------------------

    def _header(self, host_port: int, guest_port: int, op: int, flags: int, length: int) -> bytes:
        conn = self._conns.get((host_port, guest_port))
        fwd_cnt = conn.fwd_cnt if conn is not None else 0
        if conn is not None:
            conn.credit_told = fwd_cnt
        return HEADER.pack(
            HOST_CID,
            self.guest_cid,
            host_port,
            guest_port,
            length,
            _STREAM,
            op,
            flags,
            self.buf_alloc,
            fwd_cnt,
        )

    def _receive_into(self, chain: DescriptorChain) -> int:
        if chain.fault is not None or chain.readable or chain.write_len < HEADER_SIZE:
            raise DeviceError("vsock: a receive buffer is device-writable and holds a header")
        with self._lock:
            if self._replies:
                host_port, guest_port, op, flags = self._replies.popleft()
                _write(chain.writable, 0, self._header(host_port, guest_port, op, flags, 0))
                return HEADER_SIZE
            while self._readable:
                conn = self._readable.popleft()
                if self._conns.get(conn.key) is not conn:
                    continue  # closed meanwhile
                return self._receive_data(conn, chain)
        return 0  # the work went away meanwhile: the driver drops an empty buffer

    def _receive_data(self, conn: _Conn, chain: DescriptorChain) -> int:
        space = min(chain.write_len - HEADER_SIZE, MAX_PAYLOAD, conn.credit())
        if space <= 0:
            conn.readable = False
            self._poke()
            return 0
        views = _views_from(chain.writable, HEADER_SIZE, space)
        try:
            count = conn.sock.recv_into(views[0]) if len(views) == 1 else _recv_views(conn, views)
        except BlockingIOError:
            conn.readable = False
            self._poke()
            return 0
        except OSError:
            count = -1
        if count <= 0:  # the host program sends no more (or failed): tell the guest
            conn.host_eof = True
            conn.readable = False
            op, flags = (
                (VsockOp.SHUTDOWN, int(ShutdownFlag.SEND)) if count == 0 else (VsockOp.RST, 0)
            )
            if count < 0:
                self._close(conn)
            _write(chain.writable, 0, self._header(conn.host_port, conn.guest_port, op, flags, 0))
            return HEADER_SIZE
        conn.tx_cnt = (conn.tx_cnt + count) & 0xFFFF_FFFF
        _write(
            chain.writable, 0, self._header(conn.host_port, conn.guest_port, VsockOp.RW, 0, count)
        )
        self._readable.append(conn)  # more may be there; EAGAIN says when not
        return HEADER_SIZE + count

    # -- the host side -------------------------------------------------------------------------

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_write(self._wake, 1)

    def _host_loop(self) -> None:
        try:
            while not self._stopping:
                poller, targets = self._poll_set()
                events = poller.poll()
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                wake_rx = False
                with self._lock:
                    for fd, mask in events:
                        target = targets.get(fd)
                        if target is not None:
                            wake_rx |= self._host_event(target, mask)
                if wake_rx:
                    self.notify_queue(RX_QUEUE)
        except Exception:  # a bug of ours: no more host connections, but the daemon lives
            log.exception("vsock: host thread failed")

    def _poll_set(self) -> tuple[select.poll, dict[int, object]]:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        targets: dict[int, object] = {}
        with self._lock:
            if self.listener is not None and len(self._clients) < MAX_PENDING_CLIENTS:
                poller.register(self.listener, select.POLLIN)
                targets[self.listener.fileno()] = self.listener
            for client in self._clients:
                poller.register(client.sock, select.POLLIN)
                targets[client.sock.fileno()] = client
            for conn in self._conns.values():
                mask = 0
                reading = conn.established and not conn.readable and not conn.host_eof
                if reading and conn.credit() > 0:
                    mask |= select.POLLIN
                if conn.backlog:
                    mask |= select.POLLOUT
                if mask:
                    poller.register(conn.sock, mask)
                    targets[conn.sock.fileno()] = conn
        return poller, targets

    def _host_event(self, target: object, mask: int) -> bool:
        if target is self.listener:
            return self._accept()
        if isinstance(target, _Client):
            return self._client_line(target)
        assert isinstance(target, _Conn)
        conn = target
        if self._conns.get(conn.key) is not conn:
            return False
        wake = False
        if mask & select.POLLOUT and conn.backlog:
            wake |= self._flush(conn)
        if mask & (select.POLLIN | select.POLLHUP | select.POLLERR) and not conn.readable:
            conn.readable = True  # data or an end: the receive queue finds out which
            self._readable.append(conn)
            wake = True
        return wake

    def _accept(self) -> bool:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return False
        sock.setblocking(False)
        self._clients.append(_Client(sock))
        return False

    def _client_line(self, client: _Client) -> bool:
        try:
            data = client.sock.recv(MAX_CONNECT_LINE - len(client.line))
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        client.line += data
        if data and b"\n" not in client.line and len(client.line) < MAX_CONNECT_LINE:
            return False
        self._clients.remove(client)
        words = bytes(client.line).split(b"\n", 1)[0].split()
        port = int(words[1]) if len(words) == 2 and words[1].isdigit() else -1
        if words[:1] != [b"CONNECT"] or not 0 <= port <= 0xFFFF_FFFF:
            client.sock.close()
            return False
        if len(self._conns) >= self.max_connections:
            client.sock.close()
            return False
        host_port = self._free_port()
        conn = _Conn(client.sock, host_port, port, established=False, from_host=True)
        self._conns[conn.key] = conn
        return self._reply(conn.key, VsockOp.REQUEST)

    def _free_port(self) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFF_FFFE else FIRST_HOST_PORT
            if all(key[0] != port for key in self._conns):
                return port

    def _flush(self, conn: _Conn) -> bool:
        try:
            sent = conn.sock.send(conn.backlog)
        except BlockingIOError:
            return False
        except OSError:
            self._close(conn)
            return self._reply(conn.key, VsockOp.RST)
        del conn.backlog[:sent]
        if not conn.backlog and conn.guest_done_sending:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        return self._forwarded(conn, sent)


def _write(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` into the byte stream ``views`` make, from ``offset``."""
    for view in _views_from(views, offset, len(data)):
        view[:] = data[: len(view)]
        data = data[len(view) :]


def _views_from(views: list[memoryview], offset: int, size: int) -> list[memoryview]:
    """Views of ``size`` bytes of the stream ``views`` make, from ``offset``."""
    out = []
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        part = view[offset : offset + size]
        out.append(part)
        size -= len(part)
        offset = 0
        if size == 0:
            break
    return out


def _recv_views(conn: _Conn, views: list[memoryview]) -> int:
    count, _, _, _ = conn.sock.recvmsg_into(views)
    return count


__all__ = ["EVENT_QUEUE", "VsockDevice"]
