"""virtio-vsock on an unmodified Debian guest, with `pyvirtio vsock`: streams from the guest to
host programs and back, and from host programs (several at once) to a guest service, their
bytes checked end to end. The guest uses socat's VSOCK addresses through Linux's stock
vmw_vsock_virtio_transport."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest
from rigs.qemu import VhostUserDevice
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import GUEST_TIMEOUT
from tests.e2e.test_rng import _daemon

pytestmark = pytest.mark.e2e

CID = 7
UP = 2 << 20  # guest -> host
DOWN = 2 << 20  # host -> guest
ECHO = 256 << 10  # per host stream through the guest's echo service
STREAMS = 4

SCRIPT = f"""
socat VSOCK-LISTEN:1234,reuseaddr,fork EXEC:cat &
dd if=/dev/urandom of=/tmp/up bs=1M count={UP >> 20} 2>/dev/null
echo "@@RESULT up_sha $(sha256sum /tmp/up | cut -c1-64)"
socat -u FILE:/tmp/up VSOCK-CONNECT:2:5000 || exit 10
socat -u VSOCK-CONNECT:2:5001 CREATE:/tmp/down || exit 11
echo "@@RESULT down_sha $(sha256sum /tmp/down | cut -c1-64)"
socat -u VSOCK-LISTEN:1235 CREATE:/tmp/bye &
bye=$!
sleep 0.5
echo @@READY
wait $bye || exit 12
echo "@@RESULT bye $(cat /tmp/bye)"
"""


def _server(path: str, handle: object) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(GUEST_TIMEOUT)

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                handle(conn)  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _connect(uds: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, "the back-end closed instead of answering OK"
        line += chunk
    assert line.startswith(b"OK "), line
    return s


def _echo_round(uds: str, results: dict[int, bool], index: int) -> None:
    data = os.urandom(ECHO)
    s = _connect(uds, 1234)
    sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
    sender.start()
    back = bytearray()
    while chunk := s.recv(65536):
        back += chunk
    sender.join()
    s.close()
    results[index] = bytes(back) == data


def test_streams_both_ways(rig: X86Guest, tmp_path: Path) -> None:
    uds = str(tmp_path / "v.sock")
    sock = tmp_path / "vhost.sock"
    received: list[bytes] = []
    down = os.urandom(DOWN)

    def receive(conn: socket.socket) -> None:
        data = bytearray()
        while chunk := conn.recv(65536):
            data += chunk
        received.append(bytes(data))

    up_server = _server(f"{uds}_5000", receive)
    down_server = _server(f"{uds}_5001", lambda conn: conn.sendall(down))
    with _daemon(
        ["vsock", "--socket-path", str(sock), "--guest-cid", str(CID), "--uds-path", uds],
        tmp_path / "vsock.log",
    ) as daemon:
        guest = rig.guest(
            SCRIPT,
            [VhostUserDevice(sock, "vhost-user-vsock-device")],
            workdir=tmp_path / "guest",
            timeout=GUEST_TIMEOUT,
        )
        with guest:
            guest.start()
            guest.wait_for_console("@@READY", GUEST_TIMEOUT)
            results: dict[int, bool] = {}
            rounds = [
                threading.Thread(target=_echo_round, args=(uds, results, i)) for i in range(STREAMS)
            ]
            for t in rounds:
                t.start()
            for t in rounds:
                t.join(120)
            bye = _connect(uds, 1235)
            bye.sendall(b"done\n")
            bye.close()
            result = guest.wait()
        assert daemon.poll() is None, "the daemon died"
    up_server.join(10)
    down_server.join(10)
    print(result.results)
    assert received and hashlib.sha256(received[0]).hexdigest() == result.results["up_sha"]
    assert result.results["down_sha"] == hashlib.sha256(down).hexdigest()
    assert results == dict.fromkeys(range(STREAMS), True)
    assert result.results["bye"] == "done"
