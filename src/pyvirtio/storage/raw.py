"""A raw disk image: a regular file or a block device, read and written in place.

Data moves with ``preadv``/``pwritev`` straight between the image and guest memory views: no
bounce copies on the normal path. With O_DIRECT the kernel may refuse buffers or offsets that are
not aligned to the image's logical block size; such requests go through an aligned bounce buffer.
Discard punches holes (``fallocate`` or BLKDISCARD), write-zeroes uses ``fallocate`` zero-range
(BLKZEROOUT) and falls back to writing zeros.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Collection, Iterator

from pyvirtio.storage import io_uring
from pyvirtio.storage.base import Buffers, Completion, StorageError
from pyvirtio.storage.io_uring import Ring

log = logging.getLogger(__name__)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# <linux/fs.h>
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

#: Largest write of zeros issued at once when fallocate cannot zero a range.
_ZERO_CHUNK = 1 << 20
#: fallocate() errors that mean "this file system cannot", for good. EINVAL is not one of
#: them: it refuses one range (an empty one, say), not the operation.
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY, errno.ENODEV)


class ImageError(StorageError):
    """The image cannot be opened or used as asked."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: Most iovecs one preadv/pwritev takes (Linux UIO_MAXIOV).
IOV_MAX = 1024


def _chunks(buffers: Buffers, offset: int) -> Iterator[tuple[Buffers, int]]:
    for i in range(0, len(buffers), IOV_MAX):
        chunk = buffers[i : i + IOV_MAX]
        yield chunk, offset
        offset += sum(len(b) for b in chunk)


class RawImage:
    """An open raw image (a :class:`~pyvirtio.storage.base.Storage`). Offsets and lengths are
    in bytes."""

    #: fdatasync; discard punches holes (a no-op where the file system cannot); write-zeroes
    #: falls back to writing zeros.
    can_flush = True
    can_discard = True
    can_write_zeroes = True

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = os.O_RDONLY if read_only else os.O_RDWR
        flags |= os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise ImageError(f"cannot open image {path!r}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not self.is_block_device and not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise ImageError(f"image {path!r} is neither a regular file nor a block device")
        self.logical_block_size = 512
        self.physical_block_size = max(512, st.st_blksize)
        if self.is_block_device:
            self.logical_block_size = self._ioctl_int(BLKSSZGET, "i")
            self.physical_block_size = self._ioctl_int(BLKPBSZGET, "I")
        elif direct:
            # Regular files on O_DIRECT: the file system's block size is a safe alignment.
            self.logical_block_size = max(512, os.fstatvfs(self.fd).f_bsize)
        self.size = self.query_size()
        self.can_punch_holes = not read_only
        self.can_zero_range = not read_only
        self._bounce_lock = threading.Lock()

    def _ioctl_int(self, request: int, fmt: str) -> int:
        buf = bytearray(struct.calcsize(fmt))
        fcntl.ioctl(self.fd, request, buf)
        value: int = struct.unpack(fmt, buf)[0]
        return value

    def query_size(self) -> int:
        """The image's current size in bytes (it may have been resized underneath us)."""
        if self.is_block_device:
            return self._ioctl_int(BLKGETSIZE64, "Q")
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- data ----------------------------------------------------------------------------------

    def readv(self, buffers: Buffers, offset: int) -> None:
        """Fill ``buffers`` from ``offset``; reads past the end of the image raise OSError."""
        if len(buffers) > IOV_MAX:
            for chunk, pos in _chunks(buffers, offset):
                self.readv(chunk, pos)
            return
        total = sum(len(b) for b in buffers)
        try:
            done = os.preadv(self.fd, buffers, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self._bounce_read(buffers, offset, total)
            return
        if done != total:
            self._finish_short(buffers, offset, done, write=False)

    def writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> None:
        """Write ``buffers`` at ``offset``; with ``dsync`` the data is durable on return."""
        if len(buffers) > IOV_MAX:
            for chunk, pos in _chunks(buffers, offset):
                self.writev(chunk, pos, dsync=dsync)
            return
        total = sum(len(b) for b in buffers)
        flags = os.RWF_DSYNC if dsync else 0
        try:
            done = os.pwritev(self.fd, buffers, offset, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self._bounce_write(buffers, offset, total, dsync)
            return
        if done != total:
            self._finish_short(buffers, offset, done, write=True, dsync=dsync)

    def _finish_short(
        self, buffers: Buffers, offset: int, done: int, *, write: bool, dsync: bool = False
    ) -> None:
        """Continue a short transfer; a read that hits end of file fails with EIO."""
        rest: list[memoryview] = []
        skip = done
        for b in buffers:
            if skip >= len(b):
                skip -= len(b)
                continue
            rest.append(b[skip:])
            skip = 0
        pos = offset + done
        while rest:
            if write:
                n = os.pwritev(self.fd, rest, pos, os.RWF_DSYNC if dsync else 0)
            else:
                n = os.preadv(self.fd, rest, pos)
            if n == 0:
                raise OSError(errno.EIO, "short transfer at end of image")
            pos += n
            while rest and n >= len(rest[0]):
                n -= len(rest[0])
                rest.pop(0)
            if rest and n:
                rest[0] = rest[0][n:]

    def _aligned_span(self, offset: int, total: int) -> tuple[int, int]:
        bs = self.logical_block_size
        start = offset - offset % bs
        end = -(-(offset + total) // bs) * bs
        return start, end - start

    def _bounce_read(self, buffers: Buffers, offset: int, total: int) -> None:
        start, length = self._aligned_span(offset, total)
        with mmap.mmap(-1, length) as bounce:
            n = os.preadv(self.fd, [bounce], start)
            if n < offset - start + total:
                raise OSError(errno.EIO, "short read at end of image")
            pos = offset - start
            for b in buffers:
                b[:] = bounce[pos : pos + len(b)]
                pos += len(b)

    def _bounce_write(self, buffers: Buffers, offset: int, total: int, dsync: bool) -> None:
        start, length = self._aligned_span(offset, total)
        # Read-modify-write of partial blocks must not interleave with another one.
        with self._bounce_lock, mmap.mmap(-1, length) as bounce:
            if start != offset or length != total:
                os.preadv(self.fd, [bounce], start)
            pos = offset - start
            for b in buffers:
                bounce[pos : pos + len(b)] = b
                pos += len(b)
            n = os.pwritev(self.fd, [bounce], start, os.RWF_DSYNC if dsync else 0)
            if n != length:
                raise OSError(errno.EIO, "short write")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    # -- discard and write-zeroes --------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; its contents become unspecified (zeros on files)."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            return
        if not self.can_punch_holes:
            return  # discard is a hint; nothing to do where holes are not supported
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            log.info("%s: file system cannot punch holes; discard becomes a no-op", self.path)
            self.can_punch_holes = False

    def write_zeroes(self, offset: int, length: int, *, unmap: bool, dsync: bool = False) -> None:
        """Make a range read back as zeros, deallocating it if ``unmap`` allows."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        elif unmap and self.can_punch_holes:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.can_punch_holes = False
                self.write_zeroes(offset, length, unmap=False, dsync=dsync)
                return
        elif self.can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.can_zero_range = False
                self._write_zero_bytes(offset, length, dsync)
                return
        else:
            self._write_zero_bytes(offset, length, dsync)
            return
        if dsync:
            os.fdatasync(self.fd)

    def _write_zero_bytes(self, offset: int, length: int, dsync: bool) -> None:
        with mmap.mmap(-1, min(length, _ZERO_CHUNK)) as zeros:
            view = memoryview(zeros)
            try:
                while length:
                    n = min(length, len(zeros))
                    self.writev([view[:n]], offset, dsync=dsync)
                    offset += n
                    length -= n
            finally:
                view.release()


# -- io_uring -------------------------------------------------------------------------------------

_DONE, _READ, _WRITE, _FLUSH, _DISCARD, _ZEROES = range(-1, 5)
#: Requests in flight per thread (the ring's size; its completion queue holds twice as many).
URING_DEPTH = 256


class _UringRequest:
    """A request a :class:`UringImage` started (a :class:`~pyvirtio.storage.base.Completion`)."""

    __slots__ = ("buffers", "dsync", "engine", "kind", "length", "offset", "result", "unmap")

    def __init__(
        self,
        engine: _Engine | None,
        kind: int,
        buffers: Buffers,
        offset: int,
        length: int,
        dsync: bool = False,
        unmap: bool = False,
    ) -> None:
        self.engine = engine
        self.kind = kind
        self.buffers = buffers
        self.offset = offset
        self.length = length
        self.dsync = dsync
        self.unmap = unmap
        #: What the system call returned (-errno on failure); None while in flight.
        self.result: int | None = None

    def wait(self) -> None:
        kind = self.kind
        if kind == _DONE:
            return
        engine = self.engine
        assert engine is not None
        if self.result is None:
            engine.wait_for(self)
        result = self.result
        assert result is not None
        self.kind = _DONE  # waited for: wait_any hands it out no more
        if result != self.length or kind > _WRITE:
            self.kind = kind
            try:
                engine.image.finish(self, result)
            finally:
                self.kind = _DONE


class _Engine:
    """One thread's ring and the requests it has in flight on it."""

    def __init__(self, image: UringImage, ring: Ring) -> None:
        self.image = image
        self.ring = ring
        self.free = list(range(ring.entries - 1, -1, -1))
        self.in_flight: list[_UringRequest | None] = [None] * ring.entries
        #: Completed, not yet handed out by wait_any.
        self.done: list[_UringRequest] = []

    def slot(self, request: _UringRequest) -> int:
        free = self.free
        while not free:
            self.collect(1)
        slot = free.pop()
        self.in_flight[slot] = request
        return slot

    def collect(self, wait: int) -> None:
        in_flight, free, done = self.in_flight, self.free, self.done
        for slot, result in self.ring.reap(wait):
            request = in_flight[slot]
            assert request is not None
            in_flight[slot] = None
            free.append(slot)
            request.result = result
            done.append(request)

    def wait_for(self, request: _UringRequest) -> None:
        while request.result is None:
            self.collect(1)


class UringImage(RawImage):
    """A raw image whose queues do their I/O through io_uring: an
    :class:`~pyvirtio.storage.base.AsyncStorage`.

    Each thread that starts requests gets a ring of its own (a queue's worker keeps up to
    :data:`URING_DEPTH` requests in flight on it, submitted with one system call per batch and
    completed in the order they finish). A thread that cannot have a ring (a seccomp filter
    loaded since the image was opened, a memory limit) does its requests synchronously, as
    :class:`RawImage` does. Synchronous calls (:meth:`RawImage.readv` and the others) stay
    as they are."""

    queue_depth = URING_DEPTH

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        why = io_uring.available()
        if why is not None:
            raise ImageError(f"io_uring cannot be used: {why}")
        super().__init__(path, read_only=read_only, direct=direct)
        self._local = threading.local()
        self._warned = False

    def _engine(self) -> _Engine | None:
        try:
            engine: _Engine | None = self._local.engine
        except AttributeError:
            try:
                engine = _Engine(self, io_uring.Ring(URING_DEPTH))
            except OSError as exc:
                if not self._warned:
                    log.warning(
                        "%s: no io_uring in this thread (%s): synchronous I/O", self.path, exc
                    )
                    self._warned = True
                engine = None
            self._local.engine = engine
        return engine

    def _start(self, request: _UringRequest) -> _UringRequest:
        """Do ``request`` synchronously (the thread has no ring, or io_uring would not do); it
        is complete at once, and wait_any hands it out with the others."""
        self.finish(request, -errno.ENOSYS)
        request.kind = _DONE
        request.result = 0
        if request.engine is not None:
            request.engine.done.append(request)
        return request

    @staticmethod
    def _submit(engine: _Engine, request: _UringRequest, prepare: Callable[[int], None]) -> None:
        """Give ``request`` a slot and have ``prepare`` put it on the ring; a request that
        cannot be prepared (OSError) gives its slot back."""
        slot = engine.slot(request)
        try:
            prepare(slot)
        except BaseException:
            engine.in_flight[slot] = None
            engine.free.append(slot)
            raise

    def start_readv(self, buffers: Buffers, offset: int) -> _UringRequest:
        engine = self._engine()
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        request = _UringRequest(engine, _READ, buffers, offset, length)
        if engine is None or len(buffers) > IOV_MAX:
            return self._start(request)
        fd, ring = self.fd, engine.ring
        self._submit(engine, request, lambda slot: ring.read(fd, buffers, offset, slot))
        return request

    def start_writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> _UringRequest:
        engine = self._engine()
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        request = _UringRequest(engine, _WRITE, buffers, offset, length, dsync)
        if engine is None or len(buffers) > IOV_MAX:
            return self._start(request)
        fd, ring, rwf = self.fd, engine.ring, os.RWF_DSYNC if dsync else 0
        self._submit(engine, request, lambda slot: ring.write(fd, buffers, offset, slot, rwf))
        return request

    def start_flush(self) -> _UringRequest:
        engine = self._engine()
        request = _UringRequest(engine, _FLUSH, (), 0, 0)
        if engine is None:
            return self._start(request)
        fd, ring = self.fd, engine.ring
        self._submit(engine, request, lambda slot: ring.fsync(fd, slot))
        return request

    def start_discard(self, offset: int, length: int) -> _UringRequest:
        engine = self._engine()
        request = _UringRequest(engine, _DISCARD, (), offset, length)
        if engine is None or self.is_block_device or not self.can_punch_holes:
            return self._start(request)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        fd, ring = self.fd, engine.ring
        self._submit(engine, request, lambda slot: ring.fallocate(fd, mode, offset, length, slot))
        return request

    def start_write_zeroes(
        self, offset: int, length: int, *, unmap: bool, dsync: bool = False
    ) -> _UringRequest:
        engine = self._engine()
        request = _UringRequest(engine, _ZEROES, (), offset, length, dsync, unmap)
        if unmap and self.can_punch_holes:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        elif self.can_zero_range:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        else:
            mode = 0
        if engine is None or self.is_block_device or not mode:
            return self._start(request)
        fd, ring = self.fd, engine.ring
        self._submit(engine, request, lambda slot: ring.fallocate(fd, mode, offset, length, slot))
        return request

    def wait_any(self, started: Collection[Completion], *, block: bool) -> list[Completion]:
        engine = self._engine()
        if engine is None:
            return list(started)  # everything was done synchronously
        if engine.ring.unsubmitted or not engine.done:
            engine.collect(0)
        while True:
            ready: list[Completion] = []
            later: list[_UringRequest] = []
            for request in engine.done:
                if request in started:
                    ready.append(request)
                elif request.kind != _DONE:  # waited for directly: forget it
                    later.append(request)
            engine.done = later
            if ready or not block or not started:
                return ready
            if len(engine.free) == engine.ring.entries:
                # Nothing of this thread's is on the ring: what it started is complete (and
                # its wait() says how); waiting for a completion would never return.
                return list(started)
            engine.collect(1)

    def finish(self, request: _UringRequest, result: int) -> None:
        """Complete what io_uring did not, or could not do: a short transfer, a buffer
        O_DIRECT refuses, an operation the file system lacks (``result``: what io_uring
        returned, or -ENOSYS for a request it never saw); raise OSError for the rest."""
        kind = request.kind
        if kind <= _WRITE:
            if result >= 0:
                self._finish_short(
                    request.buffers,
                    request.offset,
                    result,
                    write=kind == _WRITE,
                    dsync=request.dsync,
                )
            elif result in (-errno.ENOSYS, -errno.EINVAL, -errno.EAGAIN):
                # Not seen by io_uring, or a buffer O_DIRECT refuses: the synchronous path
                # (which bounces for O_DIRECT) does it, or reports the error.
                if kind == _READ:
                    self.readv(request.buffers, request.offset)
                else:
                    self.writev(request.buffers, request.offset, dsync=request.dsync)
            else:
                raise OSError(-result, os.strerror(-result))
            return
        if result >= 0:
            if kind == _ZEROES and request.dsync:
                os.fdatasync(self.fd)
            return
        if result == -errno.ENOSYS or -result in _UNSUPPORTED:
            # Never submitted, or the file system cannot: the synchronous call falls back (to
            # a no-op discard, or writing zeros) and remembers it.
            if kind == _FLUSH:
                self.flush()
            elif kind == _DISCARD:
                self.discard(request.offset, request.length)
            else:
                self.write_zeroes(
                    request.offset, request.length, unmap=request.unmap, dsync=request.dsync
                )
            return
        raise OSError(-result, os.strerror(-result))


def open_image(
    path: str, *, read_only: bool = False, direct: bool = False, engine: str = "auto"
) -> RawImage:
    """Open a raw image with an I/O engine: ``"io_uring"`` (raises :class:`ImageError` where
    it cannot be used), ``"sync"`` (preadv and pwritev on the queue's thread), or ``"auto"``:
    io_uring where it can be used, sync otherwise."""
    if engine not in ENGINES:
        raise ImageError(f"unknown I/O engine {engine!r} (one of {', '.join(ENGINES)})")
    if engine != "sync":
        try:
            return UringImage(path, read_only=read_only, direct=direct)
        except ImageError as exc:
            if engine == "io_uring" or not str(exc).startswith("io_uring"):
                raise
            log.info("%s: %s; synchronous I/O", path, exc)
    return RawImage(path, read_only=read_only, direct=direct)


#: The I/O engines :func:`open_image` knows.
ENGINES = ("auto", "io_uring", "sync")
