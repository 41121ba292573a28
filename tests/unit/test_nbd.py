"""NBD storage against nbdkit (Debian's, from scripts/host-deps): what the export offers becomes
the device's, each operation maps onto its NBD command, and the failure paths: a server that
answers errors, dies, hangs, or comes back."""

from __future__ import annotations

import errno
import mmap
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from rigs.nbd import NbdServer, nbdkit

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import WRITE_ZEROES_FLAG_UNMAP, BlkFeature, BlkStatus
from pyvirtio.spec.features import bit
from pyvirtio.storage.base import Storage, StorageError
from pyvirtio.storage.nbd import NbdStorage, import_nbd
from pyvirtio.storage.raw import RawImage
from pyvirtio.system_bindings import DEBIAN_DIST_PACKAGES

MiB = 1 << 20
#: Short, so that the failure paths are quick; long enough for a loaded 2-core machine.
TIMEOUT = 3.0


def guest_buffer(size: int, data: bytes | None = None) -> memoryview:
    """A view into shared anonymous memory, as guest RAM is."""
    view = memoryview(mmap.mmap(-1, size))
    if data is not None:
        view[:] = data
    return view


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    made: list[NbdServer] = []

    def start(plugin: Sequence[str], filters: Sequence[str] = ()) -> NbdServer:
        server = nbdkit(tmp_path / f"nbd{len(made)}.sock", plugin, filters).start()
        made.append(server)
        return server

    yield start
    for server in made:
        server.kill()


@pytest.fixture
def storages() -> Iterator[Callable[..., NbdStorage]]:
    made: list[NbdStorage] = []

    def open_(uri: str, **kw: object) -> NbdStorage:
        kw.setdefault("timeout", TIMEOUT)
        storage = NbdStorage(uri, **kw)  # type: ignore[arg-type]
        made.append(storage)
        return storage

    yield open_
    for storage in made:
        storage.close()


def requests(log: Path) -> list[str]:
    """The requests in an nbdkit log filter's file, e.g. 'Zero offset=0x0 ... trim=1 fua=0'."""
    out = []
    for line in log.read_text().splitlines():
        m = re.search(r"connection=\d+ (Read|Write|Flush|Trim|Zero) id=\d+ ?(.*?) \.\.\.$", line)
        if m:
            out.append(f"{m[1]} {m[2]}".strip())
    return out


def test_binding_imports_from_the_venv_without_debian_path() -> None:
    """The venv's interpreter (not Debian's) loads libnbd's binding, and only it."""
    module = import_nbd()
    assert hasattr(module, "NBD") and hasattr(module.Buffer, "from_buffer")
    assert DEBIAN_DIST_PACKAGES not in sys.path
    out = subprocess.run(
        [sys.executable, "-c", "import nbd"], capture_output=True, text=True, check=False
    )
    if out.returncode == 0:  # an interpreter that has it anyway: nothing to prove
        return
    code = "from pyvirtio.storage.nbd import import_nbd; print(import_nbd().NBD().get_version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert re.match(r"1\.\d+\.\d+", out.stdout), out


def test_storage_protocol_is_what_both_implement(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    image = tmp_path / "raw.img"
    image.write_bytes(bytes(MiB))
    raw = RawImage(str(image))
    try:
        nbd = storages(servers(["memory", "1M"]).uri)
        both: list[Storage] = [raw, nbd]  # what mypy checks; at run time, the attributes:
        for storage in both:
            for name in Storage.__annotations__:
                assert hasattr(storage, name), (storage, name)
            assert storage.size == MiB and storage.query_size() == MiB
    finally:
        raw.close()


def test_export_properties(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage]
) -> None:
    s = storages(servers(["memory", "64M"]).uri)
    assert (s.size, s.logical_block_size, s.physical_block_size) == (64 * MiB, 512, 512)
    assert s.can_flush and s.can_fua and s.can_discard and s.can_write_zeroes
    assert not s.read_only and s.connected


def test_block_size_constraints_become_the_devices(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    """NBD's minimum and preferred block sizes are the logical and physical block sizes; the
    maximum splits commands; buffers the minimum does not divide go through a bounce buffer."""
    log = tmp_path / "nbd.log"
    server = servers(
        [
            "memory",
            "16M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
            f"logfile={log}",
        ],
        filters=["log", "blocksize-policy"],
    )
    s = storages(server.uri)
    assert (s.logical_block_size, s.physical_block_size) == (4096, 65536)
    data = os.urandom(3 * MiB)
    s.writev([guest_buffer(3 * MiB, data)], MiB)
    assert sorted(r for r in requests(log) if r.startswith("Write")) == [
        f"Write offset={hex((1 + i) * MiB)} count=0x100000 fua=0" for i in range(3)
    ]
    back = guest_buffer(3 * MiB)
    s.readv([back], MiB)
    assert back == data
    # 1 KiB + 3 KiB: each is below the minimum, together one block.
    odd = [guest_buffer(1024, data[:1024]), guest_buffer(3072, data[1024:4096])]
    s.writev(odd, 0)
    parts = [guest_buffer(512), guest_buffer(3584)]
    s.readv(parts, 0)
    assert b"".join(p.tobytes() for p in parts) == data[:4096]
    assert "Write offset=0x0 count=0x1000 fua=0" in requests(log)

    device = BlkDevice(s)
    machine = InProcessMachine(device)
    try:
        driver = BlkDriver(machine.driver())
        assert driver.config.blk_size == 4096
        assert driver.config.physical_block_exp == 4  # 4096 << 4 = 64 KiB
        assert driver.read(MiB // 512, 8192) == data[:8192]
    finally:
        machine.close()


def test_operations_map_onto_nbd_commands(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    log = tmp_path / "nbd.log"
    s = storages(servers(["memory", "16M", f"logfile={log}"], filters=["log"]).uri)
    buf = guest_buffer(8192, os.urandom(8192))
    s.writev([buf[:4096]], 0, dsync=True)
    s.writev([buf[:4096], buf[4096:]], 65536)
    s.write_zeroes(MiB, 4096, unmap=False)
    s.write_zeroes(MiB, 8192, unmap=True, dsync=True)
    s.discard(2 * MiB, 65536)
    s.flush()
    s.readv([buf], 65536)
    sent = requests(log)
    sent[1:3] = sorted(sent[1:3])  # one command per buffer, sent together: any order
    assert sent == [
        "Write offset=0x0 count=0x1000 fua=1",
        "Write offset=0x10000 count=0x1000 fua=0",
        "Write offset=0x11000 count=0x1000 fua=0",
        "Zero offset=0x100000 count=0x1000 trim=0 fua=0 fast=0",
        "Zero offset=0x100000 count=0x2000 trim=1 fua=1 fast=0",
        "Trim offset=0x200000 count=0x10000 fua=0",
        "Flush",
        "Read offset=0x10000 count=0x2000",
    ]


def test_read_only_export(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage]
) -> None:
    s = storages(servers(["memory", "4M"]).uri)
    assert not s.read_only
    ro = storages(servers(["-r", "memory", "4M"]).uri)
    assert ro.read_only and not ro.can_discard and not ro.can_write_zeroes
    device = BlkDevice(ro)
    offered = device.offered_features
    assert offered & bit(BlkFeature.RO)
    assert not offered & (bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES))
    # Asking for read-only on a writable export.
    assert storages(s.path, read_only=True).read_only


def test_features_follow_what_the_export_can(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    """No flush, no trim (nbdkit's eval plugin with only reads and writes): no FLUSH,
    CONFIG_WCE or DISCARD; no zero (the nozero filter): no WRITE_ZEROES."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(MiB))
    plain = storages(
        servers(
            [
                "eval",
                f"get_size=echo {MiB}",
                f"pread=dd if={backing} skip=$4 count=$3 iflag=skip_bytes,count_bytes",
                f"pwrite=dd of={backing} seek=$4 conv=notrunc oflag=seek_bytes",
            ]
        ).uri
    )
    assert not plain.can_flush and not plain.can_discard
    offered = BlkDevice(plain).offered_features
    assert not offered & (bit(BlkFeature.FLUSH) | bit(BlkFeature.CONFIG_WCE))
    assert not offered & bit(BlkFeature.DISCARD)
    data = os.urandom(4096)
    plain.writev([guest_buffer(4096, data)], 4096, dsync=True)  # durable when acknowledged
    plain.flush()  # nothing to do: not an error
    assert backing.read_bytes()[4096:8192] == data

    nozero = storages(servers(["memory", "4M", "zeromode=none"], filters=["nozero"]).uri)
    assert not nozero.can_write_zeroes and nozero.can_discard
    offered = BlkDevice(nozero).offered_features
    assert offered & bit(BlkFeature.DISCARD) and not offered & bit(BlkFeature.WRITE_ZEROES)


def test_virtio_blk_requests_through_nbd(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage]
) -> None:
    """The guest's view: a device on an NBD export, driven through virtio-mmio, with the
    queue on its own thread as in the daemon."""
    s = storages(servers(["memory", "16M"]).uri)
    device = BlkDevice(s, num_queues=2)
    machine = InProcessMachine(device, threaded=True)
    try:
        driver = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
        assert driver.capacity == 16 * MiB // 512
        data = os.urandom(2 * MiB)
        driver.write(8, data, queue=0)
        assert driver.read(8, len(data), queue=1) == data
        driver.flush()
        assert driver.discard([(8, 8, 0)]) == BlkStatus.OK
        assert driver.discard([(16, 8, WRITE_ZEROES_FLAG_UNMAP)], zeroes=True) == BlkStatus.OK
        assert driver.read(16, 4096) == bytes(4096)
        assert driver.read(24, 4096) == data[8192:12288]
    finally:
        machine.close()


def test_one_queue_keeps_many_requests_in_flight(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage]
) -> None:
    """Every read takes the server 0.3 s (nbdkit's delay filter): 8 reads submitted at once on
    one queue complete together, not one after the other; each counts as a request."""
    from pyvirtio.spec.blk import BlkRequestType

    s = storages(servers(["memory", "4M", "delay-read=300ms"], filters=["delay"]).uri)
    device = BlkDevice(s)
    machine = InProcessMachine(device, threaded=True)
    try:
        driver = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
        start = time.monotonic()
        reqs = [driver.submit(BlkRequestType.IN, 8 * i, in_len=4096, kick=False) for i in range(8)]
        driver.transport.kick(0)
        driver.wait(reqs)
        elapsed = time.monotonic() - start
        assert all(r.status == BlkStatus.OK for r in reqs)
        assert elapsed < 1.5, f"8 reads took {elapsed:.2f}s: not in flight together"
        stats = device.stats[0]
        assert (stats.requests, stats.in_flight, stats.bytes_written) == (8, 0, 8 * 4097)
    finally:
        machine.close()


def test_queues_share_the_connection_from_many_threads(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage]
) -> None:
    s = storages(servers(["memory", "64M"]).uri)
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            out, back = guest_buffer(65536), guest_buffer(65536)
            for i in range(200):
                out[:] = os.urandom(65536)
                offset = (k * 200 + i) * 65536
                s.writev([out[:4096], out[4096:]], offset)
                s.readv([back[:61440], back[61440:]], offset)
                assert back == out
                if i % 50 == 0:
                    s.flush()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_server_error_fails_the_request_and_keeps_the_connection(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    trigger = tmp_path / "fail-writes"
    server = servers(
        ["memory", "4M", "error-pwrite-rate=1", f"error-pwrite-file={trigger}"],
        filters=["error"],
    )
    s = storages(server.uri)
    buf = guest_buffer(4096, os.urandom(4096))
    trigger.touch()
    start = time.monotonic()
    with pytest.raises(OSError) as failed:
        s.writev([buf], 0)
    assert failed.value.errno == errno.EIO
    assert time.monotonic() - start < 1  # not retried: the server answered
    assert s.connected
    trigger.unlink()
    s.writev([buf], 0)
    s.flush()  # no connection was lost: nothing to report


def test_dead_server_fails_requests_within_the_timeout_and_reconnects(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    """A killed server: requests fail (EIO) within the timeout, the storage's thread survives;
    once the server is back, the flushed data reads back."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MiB))
    server = servers(["file", str(disk)])
    s = storages(server.uri)
    data = os.urandom(65536)
    s.writev([guest_buffer(65536, data)], 0)
    s.flush()
    server.kill()
    back = guest_buffer(65536)
    start = time.monotonic()
    with pytest.raises(OSError) as failed:
        s.readv([back], 0)
    assert failed.value.errno == errno.EIO
    assert TIMEOUT - 0.5 < time.monotonic() - start < TIMEOUT + 2
    # Past the timeout, a request does not wait any more while the server stays away.
    start = time.monotonic()
    with pytest.raises(OSError):
        s.readv([back], 0)
    assert time.monotonic() - start < 0.5
    assert not s.connected
    server.start()
    deadline = time.monotonic() + 10
    while not s.connected:
        assert time.monotonic() < deadline, "no reconnection"
        time.sleep(0.05)
    s.readv([back], 0)
    assert back == data
    assert [t.name for t in threading.enumerate()].count("nbd") >= 1


def test_request_waits_for_a_quick_restart(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    """A server back within the timeout: requests in flight or sent meanwhile are sent again
    on the new connection and succeed."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MiB))
    server = servers(["file", str(disk)])
    s = storages(server.uri)
    data = os.urandom(4096)
    server.kill()
    result: list[BaseException | None] = []

    def write() -> None:
        try:
            s.writev([guest_buffer(4096, data)], 8192)
            s.flush()
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.5)
    server.start()
    writer.join(TIMEOUT + 5)
    assert result == [None]
    assert disk.read_bytes()[8192:12288] == data


def test_lost_unflushed_write_fails_the_next_flush(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    """A write acknowledged but not flushed when the server died may be lost: the next flush
    says so (once), as fsync reports a lost write-back."""
    server = servers(["memory", "4M"])
    s = storages(server.uri)
    s.writev([guest_buffer(4096, os.urandom(4096))], 0)
    server.kill()
    server.start()  # a fresh memory disk: the write is indeed gone
    with pytest.raises(OSError) as failed:
        s.flush()
    assert failed.value.errno == errno.EIO
    s.flush()
    # Flushed writes are not reported: write, flush, lose the connection, flush.
    s.writev([guest_buffer(4096, os.urandom(4096))], 0)
    s.flush()
    server.kill()
    server.start()
    s.flush()


def test_hung_server_times_out_and_is_replaced(
    servers: Callable[..., NbdServer], storages: Callable[..., NbdStorage], tmp_path: Path
) -> None:
    """A server that stops answering (SIGSTOP): the request fails with ETIMEDOUT within the
    timeout and its connection is dropped (nothing arrives later into the buffer); once the
    server answers again, a new connection serves requests."""
    disk = tmp_path / "disk.img"
    data = os.urandom(4096)
    disk.write_bytes(data + bytes(MiB))
    server = servers(["file", str(disk)])
    s = storages(server.uri)
    server.pause()
    back = guest_buffer(4096)
    start = time.monotonic()
    with pytest.raises(OSError) as failed:
        s.readv([back], 0)
    assert failed.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - start < TIMEOUT + 1
    assert back == bytes(4096)
    server.resume()
    deadline = time.monotonic() + 15
    while not s.connected:
        assert time.monotonic() < deadline, "no reconnection"
        time.sleep(0.05)
    s.readv([back], 0)
    assert back == data


def test_unreachable_server_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="No such file"):
        NbdStorage(f"nbd+unix:///?socket={tmp_path}/none.sock", timeout=TIMEOUT)
    with pytest.raises(StorageError):
        NbdStorage("http://example.invalid/", timeout=TIMEOUT)


def test_close_with_the_server_gone_is_prompt(
    servers: Callable[..., NbdServer], tmp_path: Path
) -> None:
    server = servers(["memory", "4M"])
    s = NbdStorage(server.uri, timeout=TIMEOUT)
    server.kill()
    start = time.monotonic()
    s.close()
    assert time.monotonic() - start < 2


# -- pyvirtio blk --nbd ------------------------------------------------------------------------


def run_blk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", "blk", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_option_errors(tmp_path: Path) -> None:
    sock = str(tmp_path / "s.sock")
    for args, message in (
        (["--image", "x.img", "--nbd", "nbd://h/e"], "mutually exclusive"),
        (["--nbd", f"nbd+unix:///?socket={tmp_path}/none"], "No such file"),
        (["--nbd", "nbd://h/e", "--direct"], "--direct goes with --image"),
        (["--nbd", "nbd://h/e", "--nbd-timeout", "0"], "--nbd-timeout must be positive"),
    ):
        out = run_blk(*args, "--socket-path", sock)
        assert out.returncode == 2, out
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_serves_an_export_and_survives_its_server(
    servers: Callable[..., NbdServer], tmp_path: Path
) -> None:
    """``pyvirtio blk --nbd`` through vhost-user: requests fail while the server is gone, the
    daemon stays up, reconnects, and stops cleanly on SIGTERM."""
    from pyvirtio.driver.blk import BlkRequestError
    from pyvirtio.driver.vhost_user import VhostUserDriver
    from pyvirtio.spec.ids import DeviceId

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * MiB))
    server = servers(["file", str(disk)])
    sock = tmp_path / "blk.sock"
    cmd = [sys.executable, "-m", "pyvirtio", "blk", "--nbd", server.uri, "--socket-path"]
    proc = subprocess.Popen(
        [*cmd, str(sock), "--nbd-timeout", "2", "-v"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        transport = VhostUserDriver(str(sock), DeviceId.BLOCK)
        driver = BlkDriver(transport, wait=transport.wait_interrupt)
        assert driver.capacity == 8 * MiB // 512
        data = os.urandom(65536)
        driver.write(0, data)
        driver.flush()
        server.kill()
        with pytest.raises(BlkRequestError) as failed:
            driver.read(0, 4096)
        assert failed.value.req.status == BlkStatus.IOERR
        server.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert driver.read(0, 65536) == data
                break
            except BlkRequestError:
                assert time.monotonic() < deadline, "the daemon did not reconnect"
                time.sleep(0.2)
        transport.close()
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        stderr = proc.communicate()[1]
    assert "reconnected" in stderr, stderr
    assert disk.read_bytes()[:65536] == data
