"""The vhost-user back-end, driven by pyvirtio's own front-end over a real socket."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import VhostUserDriver
from pyvirtio.driver.vhost_user_frontend import FrontendError, VhostUserFrontend
from pyvirtio.runner import drain_eventfd
from pyvirtio.shims.vhost_user.server import VhostUserServer
from pyvirtio.spec.blk import BlkRequestType, BlkStatus
from pyvirtio.spec.ids import DeviceId
from pyvirtio.storage.raw import RawImage
from pyvirtio.unix_socket import listening_socket
from pyvirtio.vhost_user.protocol import (
    HEADER,
    FrontendReq,
    ProtocolError,
    ProtocolFeature,
    VringState,
    decode_header,
    decode_mem_table,
    encode,
)

IMAGE = 16 << 20


class Served:
    """A server in a thread: its socket, its image, and the device of the session in progress."""

    def __init__(self, path: str, image: RawImage, server: VhostUserServer) -> None:
        self.path = path
        self.image = image
        self.server = server

    @property
    def device(self) -> BlkDevice:
        session = self.server.session
        assert session is not None, "no session in progress"
        assert isinstance(session.device, BlkDevice)
        return session.device


@contextmanager
def serve(tmp_path: Path, **kw: object) -> Iterator[Served]:
    image_path = tmp_path / "disk.img"
    if not image_path.exists():
        image_path.write_bytes(b"")
        os.truncate(image_path, IMAGE)
    read_only = bool(kw.pop("read_only", False))
    image = RawImage(str(image_path), read_only=read_only)
    path = str(tmp_path / "vu.sock")
    with listening_socket(path) as listener:
        server = VhostUserServer(lambda: BlkDevice(image, **kw), listener)  # type: ignore[arg-type]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield Served(path, image, server)
        finally:
            server.stop()
            thread.join(5)
            assert not thread.is_alive()
            image.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, num_queues=2, serial="vu-test") as s:
        yield s


def connect(path: str, **kw: object) -> tuple[VhostUserDriver, BlkDriver]:
    transport = VhostUserDriver(path, DeviceId.BLOCK, **kw)  # type: ignore[arg-type]
    return transport, BlkDriver(transport, wait=transport.wait_interrupt)


# -- codec ------------------------------------------------------------------------------------


def test_header_round_trip_and_checks() -> None:
    data = encode(FrontendReq.GET_FEATURES, b"12345678", 0)
    assert decode_header(data[:12]) == (1, 1, 8)
    with pytest.raises(ProtocolError, match="version"):
        decode_header(HEADER.pack(1, 2, 0))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(HEADER.pack(1, 1, 1 << 20))
    with pytest.raises(ProtocolError):
        decode_mem_table(struct.pack("<II", 9, 0) + bytes(9 * 32))
    with pytest.raises(ProtocolError):
        VringState.decode(b"\0" * 7)


# -- sessions ---------------------------------------------------------------------------------


def test_io_through_vhost_user(server: Served) -> None:
    path = server.path
    transport, drv = connect(path)
    assert drv.config.capacity == IMAGE // 512
    assert len(drv.queues) == 2
    assert drv.get_id() == b"vu-test"
    data = os.urandom(300 * 1024)
    drv.write(8, data, queue=1)
    assert drv.read(8, len(data), queue=0) == data
    # The device signalled its call eventfds (the driver may not have needed to wait on them).
    pending = [drain_eventfd(fd) for fd in transport.call_fds]
    assert transport.interrupts > 0 or any(pending)
    transport.close()


def test_reconnect_gets_fresh_state(server: Served) -> None:
    path = server.path
    t1, d1 = connect(path)
    first = server.device
    d1.write(0, b"a" * 4096)
    t1.close()
    t2, d2 = connect(path)
    assert d2.read(0, 4096) == b"a" * 4096
    assert server.device is not first
    assert server.device.queues[0].used_idx == d2.queues[0].last_used_idx
    t2.close()


def test_get_vring_base_stops_and_set_vring_base_resumes(server: Served) -> None:
    path = server.path
    transport, drv = connect(path)
    for i in range(5):
        drv.write(i, b"x" * 512)
    assert transport.stop() == [5, 0]
    assert not server.device.queues[0].active
    transport.close()


def test_resize_sends_config_change(tmp_path: Path) -> None:
    with serve(tmp_path) as served:
        transport, drv = connect(
            served.path,
            protocol_features=(1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.REPLY_ACK),
        )
        channel = transport.frontend.set_backend_req_fd()
        channel.settimeout(5)
        os.truncate(tmp_path / "disk.img", IMAGE * 2)
        assert served.device.refresh_capacity()
        header = channel.recv(12)
        assert decode_header(header)[0] == 2  # CONFIG_CHANGE_MSG
        assert drv.capacity == IMAGE * 2 // 512
        transport.close()


def test_read_only_device(tmp_path: Path) -> None:
    with serve(tmp_path, read_only=True) as served:
        transport, drv = connect(served.path)
        req = drv.request(BlkRequestType.OUT, 0, data_out=b"x" * 512)
        assert req.status == BlkStatus.IOERR
        transport.close()


# -- malformed input --------------------------------------------------------------------------


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    return s


def test_failed_request_with_need_reply_gets_error_ack(server: Served) -> None:
    path = server.path
    with VhostUserFrontend(path) as fe:
        fe.negotiate_protocol(1 << ProtocolFeature.REPLY_ACK)
        with pytest.raises(FrontendError, match="failure"):
            fe.set_vring_num(7, 64)  # vring 7 does not exist
        with pytest.raises(FrontendError, match="failure"):
            fe.set_vring_num(0, 100)  # not a power of two
        with pytest.raises(FrontendError, match="failure"):
            fe.set_features(1 << 60)  # never offered
        assert fe.get_queue_num() == 2  # the session is still alive


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(1, 0x2, 0),  # bad version
        HEADER.pack(1, 0x1, 1 << 30),  # absurd size
        HEADER.pack(999, 0x1, 0),  # unknown request
        HEADER.pack(FrontendReq.GET_VRING_BASE, 0x1, 4) + b"\0" * 4,  # short payload
        HEADER.pack(FrontendReq.SET_MEM_TABLE, 0x1, 8) + struct.pack("<II", 1, 0),  # no fds
        HEADER.pack(FrontendReq.GET_VRING_BASE, 0x1, 8) + VringState(50, 0).encode(),
    ],
)
def test_malformed_messages_close_the_connection(server: Served, data: bytes) -> None:
    path = server.path
    s = raw_connect(path)
    s.sendall(data)
    assert s.recv(64) == b""  # closed, no crash
    s.close()
    transport, drv = connect(path)  # and the daemon serves the next front-end
    assert drv.read(0, 512) == bytes(512)
    transport.close()


def test_truncated_message_and_disconnect(server: Served) -> None:
    path = server.path
    s = raw_connect(path)
    s.sendall(HEADER.pack(FrontendReq.SET_FEATURES, 0x1, 8) + b"\0\0")
    s.close()
    transport, drv = connect(path)
    assert drv.get_id() == b"vu-test"
    transport.close()


def test_fds_on_messages_that_take_none_are_closed(server: Served) -> None:
    path = server.path
    s = raw_connect(path)
    r, w = os.pipe()
    s.sendmsg(
        [encode(FrontendReq.GET_FEATURES)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))],
    )
    assert len(s.recv(64)) == 20
    os.close(r)
    s.close()
    time.sleep(0.2)
    # Our end is closed: the back-end's copy of the read end must be gone too.
    with pytest.raises(BrokenPipeError):
        for _ in range(100):
            os.write(w, b"x" * 65536)
    os.close(w)


def test_socket_is_private(server: Served) -> None:
    path = server.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_mem_table_with_bad_region_is_refused(server: Served) -> None:
    path = server.path
    from pyvirtio.vhost_user.protocol import MemoryRegionDesc

    with VhostUserFrontend(path) as fe:
        fe.negotiate_protocol(1 << ProtocolFeature.REPLY_ACK)
        fd = os.memfd_create("small")
        os.ftruncate(fd, 4096)
        with pytest.raises(FrontendError, match="failure"):
            fe.set_mem_table([(MemoryRegionDesc(0, 1 << 40, 0, 0), fd)])
        os.close(fd)
        assert fe.get_queue_num() == 2


# -- CLI --------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_print_capabilities() -> None:
    out = run_cli("blk", "--print-capabilities")
    assert out.returncode == 0
    assert '"type": "block"' in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--socket-path", "/tmp/x.sock"], "--image is required"),
        (["--image", "/nonexistent/disk.img", "--socket-path", "/tmp/x.sock"], "cannot open image"),
        (["--image", "IMG", "--socket-path", "/tmp/x.sock", "--queue-size", "100"], "power of two"),
        (["--image", "IMG", "--socket-path", "/tmp/x.sock", "--num-queues", "0"], "positive"),
        (["--image", "IMG", "--socket-path", "/nonexistent/dir/x.sock"], "cannot create socket"),
        (["--image", "IMG"], "--socket-path or --fd"),
        (["--image", "IMG", "--socket-path", "/tmp/x.sock", "--serial", "x" * 21], "serial"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    out = run_cli("blk", *[str(img) if a == "IMG" else a for a in args])
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "s.sock"
    proc = _start_backend(img, sock, "-v")
    try:
        transport, drv = connect(str(sock))
        drv.write(0, b"q" * 512)
        proc.terminate()
        assert proc.wait(10) == 0
        transport.close()
    finally:
        proc.kill()
    assert img.read_bytes()[:512] == b"q" * 512
    assert not sock.exists()


def test_cli_fd_socket_activation(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "a.sock"))
    listener.listen(1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvirtio",
            "blk",
            "--image",
            str(img),
            "--fd",
            str(listener.fileno()),
        ],
        pass_fds=[listener.fileno()],
    )
    try:
        transport, drv = connect(str(tmp_path / "a.sock"))
        assert drv.read(0, 512) == bytes(512)
        transport.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        listener.close()


def _start_backend(img: Path, sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvirtio",
            "blk",
            "--image",
            str(img),
            "--socket-path",
            str(sock),
            *extra,
        ],
        stderr=subprocess.PIPE,
    )
    for _ in range(200):
        if sock.exists():
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("back-end did not come up")


CHUNK = 512 * 1024


def test_backend_killed_mid_io_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the back-end while it holds requests, restart it, reconnect: every request
    completes OK (in-flight tracking) and the image holds the last data written."""
    import mmap as _mmap

    img = tmp_path / "d.img"
    img.touch()
    os.truncate(img, 20 << 20)
    sock = tmp_path / "s.sock"
    # Large writethrough writes: the back-end holds requests long enough to be caught.
    proc = _start_backend(img, sock, "--writethrough")
    transport, drv = connect(str(sock))
    assert transport.inflight is not None  # INFLIGHT_SHMFD was negotiated
    drv.segment_size = 64 * 1024  # within SIZE_MAX, and 8 segments per request
    desc, fd = transport.inflight
    area = _mmap.mmap(fd, desc.mmap_size)
    flags = memoryview(area)[16 : 16 + 16 * desc.queue_size : 16]  # DescStateSplit.inflight
    try:
        for rnd in range(5):
            reqs = [
                drv.submit(BlkRequestType.OUT, i * 1024, data_out=bytes([rnd * 40 + i]) * CHUNK)
                for i in range(40)
            ]
            deadline = time.monotonic() + 10
            while not any(flags) and time.monotonic() < deadline:
                pass  # the back-end has taken requests it has not returned yet
            assert any(flags), "the back-end never took the requests"
            proc.kill()
            proc.wait()
            proc = _start_backend(img, sock, "--writethrough")
            transport.reconnect()
            drv.wait(reqs, timeout=30)
            assert [r.status for r in reqs] == [BlkStatus.OK] * 40
            proc.terminate()
            assert proc.wait(10) == 0
            assert proc.stderr is not None
            assert b"resubmitting" in proc.stderr.read()
            proc = _start_backend(img, sock, "--writethrough")
            transport.reconnect()
        for i in range(40):
            assert drv.read(i * 1024, CHUNK) == bytes([4 * 40 + i]) * CHUNK
    finally:
        flags.release()
        area.close()
        transport.close()
        proc.kill()


def test_stuck_storage_does_not_block_the_control_plane(tmp_path: Path) -> None:
    """A request stuck in the storage (say, a hung NFS server) holds its queue's thread only:
    the socket keeps answering, and other queues keep serving."""
    with serve(tmp_path, num_queues=2) as served:
        release = threading.Event()
        original = served.image.readv

        def stuck_on_sector_8(buffers, offset):  # type: ignore[no-untyped-def]
            if offset == 8 * 512:
                release.wait(30)
            original(buffers, offset)

        served.image.readv = stuck_on_sector_8  # type: ignore[method-assign]
        transport, drv = connect(served.path)
        stuck = drv.submit(BlkRequestType.IN, 8, in_len=512, queue=0)
        time.sleep(0.2)
        assert not stuck.done
        assert drv.transport.read_config_bytes(8)  # GET_CONFIG answered
        assert drv.read(16, 512, queue=1) == bytes(512)  # the other queue serves
        release.set()
        drv.wait([stuck])
        assert stuck.status == BlkStatus.OK
        transport.close()
