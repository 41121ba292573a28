"""The io_uring binding and the storage engine on it, against real files: every operation,
errors as the kernel reports them, completions out of order, the storage contract of both
engines, a thread without a ring, and a device reset while the kernel still holds a request."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import BlkRequestType
from pyvirtio.storage import io_uring, raw
from pyvirtio.storage.base import AsyncStorage, Completion
from pyvirtio.storage.io_uring import IOV_PER_SLOT, Ring
from pyvirtio.storage.raw import ImageError, RawImage, UringImage, open_image

pytestmark = pytest.mark.skipif(
    io_uring.available() is not None, reason=f"no io_uring here: {io_uring.available()}"
)

SIZE = 1 << 20


def guest_buffer(size: int, data: bytes | None = None) -> memoryview:
    """A view into shared anonymous memory, as guest RAM is."""
    view = memoryview(mmap.mmap(-1, size))
    if data is not None:
        view[: len(data)] = data
    return view


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(SIZE))
    return p


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(8)
    yield r
    r.close()


def reap_all(ring: Ring, count: int) -> dict[int, int]:
    done: dict[int, int] = {}
    while len(done) < count:
        done.update(ring.reap(1))
    return done


# -- the binding ---------------------------------------------------------------------------------


def test_ring_reads_and_writes(ring: Ring, path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        first, second = os.urandom(4096), os.urandom(512)
        ring.write(fd, [guest_buffer(4096, first)], 0, 0)
        ring.write(fd, [memoryview(second)], 8192, 1)  # a read-only view: the buffer protocol
        assert reap_all(ring, 2) == {0: 4096, 1: 512}
        with path.open("rb") as f:
            assert f.read(4096) == first
            f.seek(8192)
            assert f.read(512) == second
        into = guest_buffer(4096)
        ring.read(fd, [into], 0, 3)
        assert reap_all(ring, 1) == {3: 4096}
        assert bytes(into) == first
    finally:
        os.close(fd)


def test_ring_vectors_beyond_the_slots_own_iovecs(ring: Ring, path: Path) -> None:
    count = IOV_PER_SLOT + 5
    data = os.urandom(512 * count)
    fd = os.open(path, os.O_RDWR)
    try:
        ring.write(fd, [memoryview(data)[i * 512 : (i + 1) * 512] for i in range(count)], 0, 2)
        small = [guest_buffer(512) for _ in range(3)]
        ring.read(fd, small, SIZE - 1536, 7)  # another slot's iovecs meanwhile
        small[0][:1] = b"z"
        assert reap_all(ring, 2) == {2: len(data), 7: 1536}
        assert b"".join(bytes(b) for b in small) == bytes(1536)
        assert not ring._big_iovs  # the big request's iovec array is let go once reaped
        views = [guest_buffer(512) for _ in range(count)]
        ring.read(fd, views, 0, 5)
        assert reap_all(ring, 1) == {5: len(data)}
        assert b"".join(bytes(v) for v in views) == data
    finally:
        os.close(fd)


def test_ring_fsync_and_fallocate(ring: Ring, path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        ring.write(fd, [memoryview(b"\xaa" * SIZE)], 0, 0)
        assert reap_all(ring, 1) == {0: SIZE}
        ring.fsync(fd, 1)
        ring.fsync(fd, 2, datasync=False)
        assert reap_all(ring, 2) == {1: 0, 2: 0}
        before = os.fstat(fd).st_blocks
        punch = raw.FALLOC_FL_PUNCH_HOLE | raw.FALLOC_FL_KEEP_SIZE
        ring.fallocate(fd, punch, 0, 65536, 3)
        assert reap_all(ring, 1) == {3: 0}
        assert os.fstat(fd).st_blocks < before
        assert os.pread(fd, 65536 + 1, 0) == bytes(65536) + b"\xaa"
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)


def test_ring_reports_errors_as_negative_errno(ring: Ring, path: Path) -> None:
    ro = os.open(path, os.O_RDONLY)
    try:
        ring.write(ro, [memoryview(b"x" * 512)], 0, 0)
        ring.read(-1, [guest_buffer(512)], 0, 1)
        ring.fallocate(ro, 0xFF, 0, 512, 2)  # unknown mode bits
        done = reap_all(ring, 3)
        assert done[0] == -errno.EBADF and done[1] == -errno.EBADF
        assert done[2] < 0
        ring.read(ro, [guest_buffer(4096)], SIZE - 512, 3)  # short at end of file
        ring.read(ro, [guest_buffer(4096)], SIZE, 4)
        assert reap_all(ring, 2) == {3: 512, 4: 0}
    finally:
        os.close(ro)


def test_completions_arrive_in_the_order_they_finish(ring: Ring, path: Path) -> None:
    r, w = os.pipe()
    fd = os.open(path, os.O_RDONLY)
    try:
        waiting = guest_buffer(16)
        ring.read(r, [waiting], 0, 0)  # a pipe with nothing in it: in flight until written
        ring.read(fd, [guest_buffer(4096)], 0, 1)
        assert ring.reap(1) == [(1, 4096)]
        assert ring.reap(0) == []
        os.write(w, b"later")
        assert ring.reap(1) == [(0, 5)]
        assert bytes(waiting[:5]) == b"later"
    finally:
        for x in (r, w, fd):
            os.close(x)


def test_more_requests_than_entries_are_submitted_as_slots_free(path: Path) -> None:
    ring = Ring(4)
    fd = os.open(path, os.O_RDONLY)
    try:
        views = [guest_buffer(512) for _ in range(ring.entries)]
        for i, view in enumerate(views):
            ring.read(fd, [view], i * 512, i)
        assert ring.unsubmitted == ring.entries
        assert sorted(reap_all(ring, ring.entries)) == list(range(ring.entries))
        assert ring.unsubmitted == 0
    finally:
        os.close(fd)
        ring.close()
        ring.close()  # twice is harmless
    assert ring.fd == -1


def test_available_and_supported_operations(ring: Ring) -> None:
    assert io_uring.available() is None
    assert ring.supports()
    assert not ring.supports([255])


# -- open_image --------------------------------------------------------------------------------


def test_open_image_picks_the_engine(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for engine, cls in (("auto", UringImage), ("io_uring", UringImage), ("sync", RawImage)):
        image = open_image(str(path), engine=engine)
        assert type(image) is cls
        assert isinstance(image, AsyncStorage) == (cls is UringImage)
        image.close()
    with pytest.raises(ImageError, match="unknown I/O engine"):
        open_image(str(path), engine="aio")
    monkeypatch.setattr(io_uring, "available", lambda: "io_uring_setup: not permitted")
    image = open_image(str(path))
    assert type(image) is RawImage
    image.close()
    with pytest.raises(ImageError, match="io_uring cannot be used"):
        open_image(str(path), engine="io_uring")
    with pytest.raises(ImageError):  # not an io_uring problem: auto does not hide it
        open_image(str(path.parent / "missing.img"))


# -- the storage contract, both engines ----------------------------------------------------------


@pytest.fixture(params=["sync", "io_uring"])
def image(request: pytest.FixtureRequest, path: Path) -> Iterator[RawImage]:
    img = open_image(str(path), engine=request.param)
    yield img
    img.close()


def test_storage_contract(image: RawImage, path: Path) -> None:
    data = os.urandom(3 * 4096)
    views = [memoryview(data)[i * 4096 : (i + 1) * 4096] for i in range(3)]
    image.writev(views, 4096)
    image.flush()
    into = [guest_buffer(4096) for _ in range(3)]
    image.readv(into, 4096)
    assert b"".join(bytes(v) for v in into) == data
    image.write_zeroes(4096, 4096, unmap=False)
    image.write_zeroes(8192, 4096, unmap=True, dsync=True)
    image.discard(0, 4096)
    assert path.read_bytes()[: 4 * 4096] == bytes(3 * 4096) + data[2 * 4096 :]
    with pytest.raises(OSError) as exc:
        image.readv([guest_buffer(4096)], SIZE - 512)
    assert exc.value.errno == errno.EIO


def start_all(storage: AsyncStorage, starts: list[Callable[[], Completion]]) -> None:
    """Start every request, then complete them through wait_any as they finish."""
    pending = {start() for start in starts}
    while pending:
        for done in storage.wait_any(pending, block=True):
            pending.remove(done)
            done.wait()


def test_async_requests_complete_through_wait_any(path: Path) -> None:
    image = UringImage(str(path))
    try:
        blobs = [os.urandom(4096) for _ in range(40)]
        start_all(
            image,
            [
                lambda i=i, b=b: image.start_writev([memoryview(b)], i * 4096)  # type: ignore[misc]
                for i, b in enumerate(blobs)
            ]
            + [image.start_flush],
        )
        views = [guest_buffer(4096) for _ in blobs]
        start_all(
            image,
            [
                lambda i=i, v=v: image.start_readv([v], i * 4096)  # type: ignore[misc]
                for i, v in enumerate(views)
            ],
        )
        assert [bytes(v) for v in views] == blobs
        start_all(
            image,
            [
                lambda: image.start_discard(0, 4096),
                lambda: image.start_write_zeroes(4096, 4096, unmap=False),
                lambda: image.start_write_zeroes(8192, 4096, unmap=True, dsync=True),
                lambda: image.start_writev([memoryview(b"d" * 512)], 65536, dsync=True),
            ],
        )
        assert path.read_bytes()[: 3 * 4096] == bytes(3 * 4096)
        assert path.read_bytes()[65536 : 65536 + 512] == b"d" * 512
        assert image.wait_any([], block=True) == []
    finally:
        image.close()


def test_async_errors_surface_at_wait(path: Path) -> None:
    image = UringImage(str(path), read_only=True)
    try:
        write = image.start_writev([memoryview(b"x" * 512)], 0)
        past_end = image.start_readv([guest_buffer(4096)], SIZE - 512)
        assert set(image.wait_any([write, past_end], block=True)) <= {write, past_end}
        with pytest.raises(OSError) as exc:
            write.wait()
        assert exc.value.errno == errno.EBADF
        with pytest.raises(OSError) as exc:
            past_end.wait()
        assert exc.value.errno == errno.EIO
        write.wait()  # waited for: nothing more
        assert image.wait_any([write, past_end], block=False) == []
    finally:
        image.close()


def test_requests_the_ring_cannot_do_are_done_synchronously(path: Path) -> None:
    image = UringImage(str(path))
    try:
        image.can_zero_range = False  # write-zeroes without unmap writes zeros
        os.pwrite(image.fd, b"\xaa" * 8192, 0)
        zeroes = image.start_write_zeroes(0, 8192, unmap=False)
        assert image.wait_any([zeroes], block=True) == [zeroes]
        zeroes.wait()
        assert os.pread(image.fd, 8192, 0) == bytes(8192)
    finally:
        image.close()


def test_a_thread_without_a_ring_does_its_io_synchronously(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    image = UringImage(str(path))

    def refused(entries: int) -> Ring:
        raise OSError(errno.EPERM, "io_uring: Operation not permitted")

    monkeypatch.setattr(io_uring, "Ring", refused)
    seen: list[bytes] = []

    def worker() -> None:
        write = image.start_writev([memoryview(b"s" * 512)], 0)
        view = guest_buffer(512)
        read = image.start_readv([view], 0)
        assert set(image.wait_any([write, read], block=True)) == {write, read}
        write.wait()
        read.wait()
        seen.append(bytes(view))

    try:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    finally:
        image.close()
    assert seen == [b"s" * 512]
    assert "no io_uring in this thread" in caplog.text


def test_a_request_that_cannot_be_prepared_gives_its_slot_back(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = UringImage(str(path))
    try:
        engine = image._engine()
        assert engine is not None
        free = len(engine.free)

        def broken(*args: object) -> None:
            raise OSError(errno.EAGAIN, "io_uring: submission queue full")

        monkeypatch.setattr(engine.ring, "read", broken)
        with pytest.raises(OSError):
            image.start_readv([guest_buffer(512)], 0)
        assert len(engine.free) == free
        assert all(r is None for r in engine.in_flight)
    finally:
        image.close()


# -- a device reset while the kernel holds a request ----------------------------------------------


def test_reset_waits_for_requests_in_flight_in_the_kernel(path: Path) -> None:
    """A read the kernel cannot finish yet (its image is, for this test, a pipe) is in flight
    when the driver resets the device: the reset returns only once the kernel is done with the
    guest's buffer, and the queue works again after."""
    image = UringImage(str(path))
    device = BlkDevice(image)
    machine = InProcessMachine(device, threaded=True)
    drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
    r, w = os.pipe()
    real_fd = image.fd
    events: list[str] = []
    try:
        image.fd = r
        req = drv.submit(BlkRequestType.IN, 0, in_len=4096)
        started = threading.Event()

        def reset() -> None:
            started.set()
            drv.transport.reset()
            events.append("reset returned")

        # Wait until the worker has the read in flight on its ring (the pipe is still empty).
        for _ in range(2000):
            if device.stats[0].in_flight:
                break
            threading.Event().wait(0.005)
        assert device.stats[0].in_flight == 1
        t = threading.Thread(target=reset)
        t.start()
        started.wait()
        t.join(0.3)
        events.append("pipe written")
        os.write(w, b"p" * 4096)
        t.join(20)
        assert not t.is_alive()
        assert events == ["pipe written", "reset returned"]
        assert req.status is None  # never completed: the ring it was on is gone
    finally:
        image.fd = real_fd
        os.close(r)
        os.close(w)
    drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
    drv.write(0, b"n" * 4096)
    assert drv.read(0, 4096) == b"n" * 4096
    machine.close()
    image.close()


def test_wait_any_never_waits_for_a_ring_with_nothing_on_it(path: Path) -> None:
    image = UringImage(str(path))
    try:
        read = image.start_readv([guest_buffer(512)], 0)
        read.wait()  # waited for directly: wait_any no longer has it
        assert image.wait_any([read], block=True) == [read]
        read.wait()
    finally:
        image.close()


def test_close_waits_for_what_the_kernel_holds(path: Path) -> None:
    """A ring closed with a read in flight returns once the kernel is done with its buffer;
    a request prepared and never submitted is dropped."""
    ring = Ring(4)
    r, w = os.pipe()
    events: list[str] = []
    try:
        held = guest_buffer(16)
        ring.read(r, [held], 0, 0)
        assert ring.reap(0) == []  # submitted, in flight
        ring.read(r, [guest_buffer(16)], 0, 1)  # prepared only

        def write_later() -> None:
            threading.Event().wait(0.3)
            events.append("written")
            os.write(w, b"done")

        t = threading.Thread(target=write_later)
        t.start()
        ring.close()
        events.append("closed")
        t.join()
        assert events == ["written", "closed"]
        assert bytes(held[:4]) == b"done"
        assert ring.fd == -1
    finally:
        os.close(r)
        os.close(w)
