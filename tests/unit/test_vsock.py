"""virtio-vsock with hybrid vsock on the host, through the in-process driver: streams both ways
with real UNIX sockets, many at once, flow control, host sockets that stall or go away, and
hostile packets."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyvirtio.devices.vsock import VsockDevice
from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.vsock import VsockDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.spec.vsock import HEADER, HOST_CID, VsockOp, VsockType
from pyvirtio.unix_socket import listening_socket

CID = 42


@dataclass
class Rig:
    uds: str
    device: VsockDevice
    machine: InProcessMachine
    driver: VsockDriver


@pytest.fixture
def rig() -> Iterator[Rig]:
    directory = tempfile.mkdtemp(prefix="vs-")
    uds = os.path.join(directory, "v.sock")
    with listening_socket(uds) as listener:
        device = VsockDevice(CID, uds, listener=listener, buf_alloc=64 * 1024)
        machine = InProcessMachine(device, memory_size=8 << 20, threaded=True)
        try:
            driver = VsockDriver(machine.driver(), wait=machine.wait_interrupt)
            yield Rig(uds, device, machine, driver)
        finally:
            machine.close()


def _host_server(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(10)
    return server


def _echo(conn: socket.socket) -> None:
    """Send back everything, then close."""
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def test_guest_connects_to_a_host_program(rig: Rig) -> None:
    server = _host_server(f"{rig.uds}_5000")
    thread = threading.Thread(target=lambda: _echo(server.accept()[0]), daemon=True)
    thread.start()
    stream = rig.driver.connect(5000)
    data = os.urandom(600 * 1024)  # well past both sides' credit: flow control at work
    back = bytearray()
    for pos in range(0, len(data), 32 * 1024):
        stream.send(data[pos : pos + 32 * 1024])
        while len(back) < pos + 32 * 1024 and len(back) < len(data):
            back += stream.recv(65536)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    stream.shutdown()
    thread.join(10)
    server.close()


def test_host_program_connects_to_a_guest_listener(rig: Rig) -> None:
    rig.driver.listen(1234)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(10)
    host.connect(rig.uds)
    host.sendall(b"CONNECT 1234\n")
    stream = rig.driver.accept(1234)
    line = host.recv(64)
    assert line.startswith(b"OK ") and line.endswith(b"\n")
    to_guest = os.urandom(300 * 1024)
    sender = threading.Thread(target=host.sendall, args=(to_guest,), daemon=True)
    sender.start()
    assert stream.recv_exactly(len(to_guest)) == to_guest
    sender.join(10)
    stream.send(b"from the guest")
    assert host.recv(64) == b"from the guest"
    host.close()
    assert stream.recv(10) == b""  # the host side closed: the guest sees the end


def test_many_streams_at_once(rig: Rig) -> None:
    server = _host_server(f"{rig.uds}_7000")
    echoes = []

    def serve() -> None:
        for _ in range(8):
            t = threading.Thread(target=_echo, args=(server.accept()[0],), daemon=True)
            t.start()
            echoes.append(t)

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    streams = [rig.driver.connect(7000) for _ in range(8)]
    payloads = [os.urandom(20000 + i) for i in range(8)]
    for stream, payload in zip(streams, payloads, strict=True):
        stream.send(payload)
    for stream, payload in zip(streams, payloads, strict=True):
        assert stream.recv_exactly(len(payload)) == payload
    acceptor.join(10)
    server.close()


def test_no_host_listener_means_refused(rig: Rig) -> None:
    with pytest.raises(DriverError, match="refused"):
        rig.driver.connect(4444)


def test_a_host_program_that_never_reads_stalls_only_its_stream(rig: Rig) -> None:
    stalled_server = _host_server(f"{rig.uds}_8000")
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(stalled_server.accept()[0]), daemon=True).start()
    stalled = rig.driver.connect(8000)
    with pytest.raises(TimeoutError):  # its credit runs out: the guest must wait
        stalled.send(os.urandom(4 << 20), timeout=2)
    echo_server = _host_server(f"{rig.uds}_8001")
    threading.Thread(target=lambda: _echo(echo_server.accept()[0]), daemon=True).start()
    other = rig.driver.connect(8001)
    other.send(b"still flowing")
    assert other.recv_exactly(13) == b"still flowing"
    # bounded buffering: the device holds at most its advertised buffer per connection
    conn = next(c for c in rig.device._conns.values() if c.host_port == 8000)
    assert len(conn.backlog) <= rig.device.buf_alloc
    for s in held:
        s.close()


def test_bad_connect_lines_are_dropped(rig: Rig) -> None:
    for line in (b"HELLO\n", b"CONNECT x\n", b"CONNECT 1 2\n", b"A" * 100):
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(5)
        host.connect(rig.uds)
        host.sendall(line)
        try:
            answer = host.recv(64)
        except ConnectionResetError:  # closed with the rest of our line unread
            answer = b""
        assert answer == b""
        host.close()


def _raw_tx(rig: Rig, header: bytes, payload: bytes = b"") -> None:
    drv = rig.driver
    addr = drv.transport.allocator.alloc(len(header) + len(payload) + 1)
    drv.transport.memory.write(addr, header + payload)
    buffers = [(addr, len(header))] + ([(addr + len(header), len(payload))] if payload else [])
    drv.transport.queues[1].add(buffers, [], (addr, len(header) + len(payload) + 1), False)
    drv.transport.kick(1)


def test_hostile_packets_are_dropped_or_reset(rig: Rig) -> None:
    # a wrong source CID, a payload that is not what the header says, a non-stream type
    _raw_tx(rig, HEADER.pack(99, HOST_CID, 1, 5000, 0, VsockType.STREAM, VsockOp.REQUEST, 0, 0, 0))
    _raw_tx(
        rig, HEADER.pack(CID, HOST_CID, 1, 5000, 100, VsockType.STREAM, VsockOp.RW, 0, 0, 0), b"x"
    )
    _raw_tx(rig, HEADER.pack(CID, HOST_CID, 2, 5000, 0, 2, VsockOp.REQUEST, 0, 0, 0))
    _raw_tx(rig, b"short")
    # the non-stream request is reset; the others are dropped
    rig.driver._wait_until(lambda: (2, 5000) in rig.driver.resets, time.monotonic() + 5)
    assert not rig.driver.transport.status & DeviceStatus.NEEDS_RESET
    assert rig.device._conns == {}


def test_guest_that_overruns_its_credit_is_reset(rig: Rig) -> None:
    held: list[socket.socket] = []
    server = _host_server(f"{rig.uds}_9000")
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    stream = rig.driver.connect(9000)
    for _ in range(40):  # ignores the device's credit (64 KiB): 40 x 16 KiB to a stalled host
        if stream.closed:
            break
        stream.peer_buf_alloc = 1 << 30
        rig.driver._send(stream, VsockOp.RW, payload=os.urandom(16 * 1024))
        rig.driver.poll()
    rig.driver._wait_until(lambda: stream.closed, time.monotonic() + 5)
    assert stream.closed
    for s in held:
        s.close()
