"""io_uring (Linux 5.6 and later) through its three system calls, for asynchronous storage I/O.

The project's own small binding, in ctypes: ``io_uring_setup`` makes a ring, its submission and
completion queues are ``mmap``-ed, submission queue entries (SQEs) are written with
``struct.pack_into`` and completion queue entries (CQEs) read with ``struct.unpack_from``, and
``io_uring_enter`` submits and waits, with the GIL released. Only what the storage engine needs:
READ, WRITE, READV, WRITEV, FSYNC and FALLOCATE (docs/dependencies.md says why not a binding
from PyPI).

A :class:`Ring` belongs to one thread. Buffers are memoryviews into guest memory, handed to the
kernel by address: the ring holds a reference to each request's buffers until its completion is
reaped (so a buffer's memory cannot be freed under the kernel while a request is in flight;
unmapping it is the caller's to avoid, as guest memory does not unmap exported buffers).

Memory ordering (io_uring(7), "Submission queue polling" and liburing's barriers): the SQE must
be visible before the new SQ tail (a release fence before the store), the CQ tail is read before
the CQEs it covers (an acquire fence after the load), and the CQEs are read before the CQ head
that gives their slots back is stored (a release fence). Indices are 32-bit aligned words read
and written through ``memoryview.cast('I')``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Sequence

from pyvirtio.memory.barrier import acquire_fence, release_fence

# System call numbers: io_uring's are the same on every architecture (asm-generic's unified
# table, from Linux 5.1).
_NR_SETUP = 425
_NR_ENTER = 426
_NR_REGISTER = 427

# <linux/io_uring.h>
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_ENTER_GETEVENTS = 1 << 0
IORING_REGISTER_PROBE = 8
IO_URING_OP_SUPPORTED = 1 << 0
IORING_FSYNC_DATASYNC = 1 << 0

IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_FALLOCATE = 17
IORING_OP_READ = 22
IORING_OP_WRITE = 23
#: What the storage engine uses; a ring whose kernel lacks one of them is not used.
OPS_USED = (
    IORING_OP_READV,
    IORING_OP_WRITEV,
    IORING_OP_FSYNC,
    IORING_OP_FALLOCATE,
    IORING_OP_READ,
    IORING_OP_WRITE,
)

_SQE_SIZE = 64
_CQE_SIZE = 16
#: The first 40 bytes of a struct io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len,
#: rw_flags (or fsync_flags), user_data. The rest (buf_index, personality, splice_fd_in, addr3)
#: stays zero: the SQE array is zeroed when mapped and nothing writes there.
_SQE = struct.Struct("<BBHiQQIIQ")
_CQE = struct.Struct("<QiI")
_IOVEC = struct.Struct("<QQ")
#: iovecs kept per in-flight slot in the ring's own array; requests with more get their own.
IOV_PER_SLOT = 16


class _SqringOffsets(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array")
    ] + [("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _CqringOffsets(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags")
    ] + [("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqringOffsets),
        ("cq_off", _CqringOffsets),
    ]


class _ProbeOp(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("resv", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32),
    ]


class _Probe(ctypes.Structure):
    _fields_ = [
        ("last_op", ctypes.c_uint8),
        ("ops_len", ctypes.c_uint8),
        ("resv", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32 * 3),
        ("ops", _ProbeOp * 256),
    ]


class _PyBuffer(ctypes.Structure):
    """Py_buffer (part of the stable ABI since Python 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long] * 7

_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_c_char_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"io_uring: {os.strerror(err)}")
    return result


def buffer_address(view: memoryview, scratch: _PyBuffer | None = None) -> int:
    """The address of a contiguous buffer's first byte (the kernel reads or writes there).

    A writable view's address comes from ctypes; a read-only view (a guest buffer the device
    may only read) is asked through the buffer protocol, ``PyObject_GetBuffer``."""
    if not view.readonly:
        return _addressof(_c_char_from_buffer(view))
    info = scratch if scratch is not None else _PyBuffer()
    ref = ctypes.byref(info)
    _check(_get_buffer(view, ref, 0))
    address: int = info.buf or 0
    _release_buffer(ref)
    return address


class Ring:
    """One io_uring instance with ``entries`` submission slots, used by one thread.

    Requests are prepared with :meth:`read`, :meth:`write`, :meth:`fsync` and
    :meth:`fallocate` (each takes a ``user_data`` below ``entries``, which identifies its
    completion), submitted together by :meth:`reap`, which returns the completions that
    arrived as ``(user_data, result)`` pairs: ``result`` is what the system call would have
    returned, or ``-errno``."""

    def __init__(self, entries: int) -> None:
        params = _Params()
        self.fd = _check(_syscall(_NR_SETUP, entries, ctypes.addressof(params), 0, 0, 0, 0))
        self._maps: list[mmap.mmap] = []
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise

    def _map(self, params: _Params) -> None:
        sq_off, cq_off = params.sq_off, params.cq_off
        self.entries = params.sq_entries
        self.cq_entries = params.cq_entries
        if not params.features & IORING_FEAT_NODROP:
            # Before 5.5 an overflowing CQ ring drops completions; this engine never has more
            # in flight than the CQ holds, but a kernel that old also lacks READ and WRITE.
            raise OSError(errno.ENOSYS, "io_uring: kernel older than 5.5")
        sq_size = sq_off.array + self.entries * 4
        cq_size = cq_off.cqes + self.cq_entries * _CQE_SIZE
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if params.features & IORING_FEAT_SINGLE_MMAP:
            sq = cq = mmap.mmap(self.fd, max(sq_size, cq_size), flags, prot)
            self._maps.append(sq)
        else:
            sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=IORING_OFF_SQ_RING)
            self._maps.append(sq)
            cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=IORING_OFF_CQ_RING)
            self._maps.append(cq)
        self._sqes = mmap.mmap(
            self.fd, self.entries * _SQE_SIZE, flags, prot, offset=IORING_OFF_SQES
        )
        self._maps.append(self._sqes)
        self._sq32 = memoryview(sq).cast("I")
        self._cq32 = memoryview(cq).cast("I")
        self._cq = cq
        self._sq_tail_word = sq_off.tail // 4
        self._sq_mask = self._sq32[sq_off.ring_mask // 4]
        self._cq_head_word = cq_off.head // 4
        self._cq_tail_word = cq_off.tail // 4
        self._cq_mask = self._cq32[cq_off.ring_mask // 4]
        self._cqes = cq_off.cqes
        array = sq_off.array // 4
        for i in range(self.entries):  # SQE i goes in SQ slot i, for good
            self._sq32[array + i] = i
        self._sq_tail = self._sq32[self._sq_tail_word]
        self._cq_head = self._cq32[self._cq_head_word]
        self._unsubmitted = 0
        #: Requests prepared and not yet reaped (submitted or not).
        self._outstanding = 0
        #: Each slot's iovec array, for READV and WRITEV with up to IOV_PER_SLOT buffers.
        self._iovs = (ctypes.c_char * (self.entries * IOV_PER_SLOT * _IOVEC.size))()
        self._iov_base = ctypes.addressof(self._iovs)
        #: iovec arrays of requests with more buffers, kept until their completion.
        self._big_iovs: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self._scratch = _PyBuffer()
        #: Each slot's buffers, referenced from submission until the completion is reaped.
        self._held: list[Sequence[memoryview] | None] = [None] * self.entries

    def supports(self, ops: Sequence[int] = OPS_USED) -> bool:
        """Whether the kernel knows every opcode of ``ops`` (IORING_REGISTER_PROBE, 5.6)."""
        probe = _Probe()
        try:
            _check(
                _syscall(
                    _NR_REGISTER, self.fd, IORING_REGISTER_PROBE, ctypes.addressof(probe), 256, 0, 0
                )
            )
        except OSError:
            return False
        return all(
            op <= probe.last_op and probe.ops[op].flags & IO_URING_OP_SUPPORTED for op in ops
        )

    def close(self) -> None:
        """Close the ring, once the kernel has finished every request it was given (closing
        does not wait for them, and their buffers must stay mapped until they are done);
        requests prepared and never submitted are dropped."""
        outstanding: int = getattr(self, "_outstanding", 0)  # 0 if mapping the rings failed
        if self.fd >= 0 and outstanding:
            self._outstanding -= self._unsubmitted
            self._unsubmitted = 0  # never submitted: without SQPOLL the kernel takes no SQE
            # that io_uring_enter was not told to submit
            try:
                while self._outstanding > 0:
                    self.reap(1)
            except OSError:
                pass  # the ring itself fails: nothing more can be learnt from it
        for view in ("_sq32", "_cq32"):
            if hasattr(self, view):
                getattr(self, view).release()
        for m in self._maps:
            m.close()
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()

    # -- submission ----------------------------------------------------------------------------

    def _prepare(
        self, op: int, fd: int, offset: int, addr: int, length: int, op_flags: int, user_data: int
    ) -> None:
        if not 0 <= user_data < self.entries:
            raise ValueError(f"io_uring: user_data {user_data} is not a slot of this ring")
        if self._unsubmitted == self.entries:
            self._enter(0)
            if self._unsubmitted == self.entries:
                raise OSError(errno.EAGAIN, "io_uring: submission queue full")
        _SQE.pack_into(
            self._sqes,
            (self._sq_tail & self._sq_mask) * _SQE_SIZE,
            op,
            0,
            0,
            fd,
            offset,
            addr,
            length,
            op_flags,
            user_data,
        )
        self._sq_tail = (self._sq_tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1
        self._outstanding += 1

    def _vector(self, buffers: Sequence[memoryview], user_data: int) -> int:
        """Lay out ``buffers`` as iovecs for slot ``user_data``; return their address."""
        if not 0 <= user_data < self.entries:
            raise ValueError(f"io_uring: user_data {user_data} is not a slot of this ring")
        count = len(buffers)
        if count <= IOV_PER_SLOT:
            array: ctypes.Array[ctypes.c_char] = self._iovs
            base = user_data * IOV_PER_SLOT * _IOVEC.size
            address = self._iov_base + base
        else:
            array = (ctypes.c_char * (count * _IOVEC.size))()
            self._big_iovs[user_data] = array
            base = 0
            address = ctypes.addressof(array)
        pack, scratch = _IOVEC.pack_into, self._scratch
        for i, view in enumerate(buffers):
            pack(array, base + i * _IOVEC.size, buffer_address(view, scratch), len(view))
        return address

    def read(self, fd: int, buffers: Sequence[memoryview], offset: int, user_data: int) -> None:
        """``preadv(fd, buffers, offset)``."""
        if len(buffers) == 1:
            view = buffers[0]
            self._prepare(
                IORING_OP_READ,
                fd,
                offset,
                buffer_address(view, self._scratch),
                len(view),
                0,
                user_data,
            )
        else:
            address = self._vector(buffers, user_data)
            self._prepare(IORING_OP_READV, fd, offset, address, len(buffers), 0, user_data)
        self._held[user_data] = buffers

    def write(
        self, fd: int, buffers: Sequence[memoryview], offset: int, user_data: int, rwf: int = 0
    ) -> None:
        """``pwritev2(fd, buffers, offset, rwf)``."""
        if len(buffers) == 1:
            view = buffers[0]
            self._prepare(
                IORING_OP_WRITE,
                fd,
                offset,
                buffer_address(view, self._scratch),
                len(view),
                rwf,
                user_data,
            )
        else:
            address = self._vector(buffers, user_data)
            self._prepare(IORING_OP_WRITEV, fd, offset, address, len(buffers), rwf, user_data)
        self._held[user_data] = buffers

    def fsync(self, fd: int, user_data: int, *, datasync: bool = True) -> None:
        """``fdatasync(fd)`` (or ``fsync``)."""
        flags = IORING_FSYNC_DATASYNC if datasync else 0
        self._prepare(IORING_OP_FSYNC, fd, 0, 0, 0, flags, user_data)

    def fallocate(self, fd: int, mode: int, offset: int, length: int, user_data: int) -> None:
        """``fallocate(fd, mode, offset, length)`` (the SQE carries the length in ``addr``)."""
        self._prepare(IORING_OP_FALLOCATE, fd, offset, length, mode, 0, user_data)

    # -- completion ----------------------------------------------------------------------------

    @property
    def unsubmitted(self) -> int:
        return self._unsubmitted

    def _enter(self, wait: int) -> None:
        count = self._unsubmitted
        if count:
            release_fence()
            self._sq32[self._sq_tail_word] = self._sq_tail
        flags = IORING_ENTER_GETEVENTS if wait else 0
        while True:
            done = _syscall(_NR_ENTER, self.fd, count, wait, flags, 0, 0, 0)
            if done >= 0:
                break
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EBUSY) and count:
                # No memory for the requests, or completions to reap first: the caller reaps
                # what is there and comes back.
                return
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        self._unsubmitted = count - done

    def reap(self, wait: int = 0) -> list[tuple[int, int]]:
        """Submit what was prepared, wait for at least ``wait`` completions (0: none), and
        return every completion that arrived."""
        need = wait - ((self._cq32[self._cq_tail_word] - self._cq_head) & 0xFFFFFFFF)
        if self._unsubmitted or need > 0:
            self._enter(max(0, need))
        head = self._cq_head
        tail = self._cq32[self._cq_tail_word]
        if head == tail:
            return []
        acquire_fence()
        cq, mask, base, unpack = self._cq, self._cq_mask, self._cqes, _CQE.unpack_from
        done = []
        big, held = self._big_iovs, self._held
        while head != tail:
            user_data, result, _ = unpack(cq, base + (head & mask) * _CQE_SIZE)
            done.append((user_data, result))
            held[user_data] = None
            if big:
                big.pop(user_data, None)
            head = (head + 1) & 0xFFFFFFFF
        release_fence()
        self._cq32[self._cq_head_word] = head
        self._cq_head = head
        self._outstanding -= len(done)
        return done


def available() -> str | None:
    """None if this process can use io_uring for storage, or why not (a kernel without it or
    without the operations used, ``kernel.io_uring_disabled``, a seccomp filter)."""
    try:
        ring = Ring(2)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if not ring.supports():
            return "the kernel lacks io_uring operations this engine uses (Linux 5.6 or later)"
    finally:
        ring.close()
    return None
