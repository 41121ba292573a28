"""What a block device needs from its storage: the interface every back-end store implements.

:class:`~pyvirtio.devices.blk.BlkDevice` knows storage only through :class:`Storage`, a typed
:class:`~typing.Protocol`: a raw image (:mod:`pyvirtio.storage.raw`), an NBD export
(:mod:`pyvirtio.storage.nbd`), and whatever comes next (a Ceph RBD image through python3-rbd
would be a class with these attributes and methods; nothing needs to inherit from anything).

Contract, for every implementation:

- Offsets and lengths are bytes. The device only asks for ranges inside the size it was last
  told (:attr:`Storage.size`, then :meth:`Storage.query_size`) and aligned to its logical block
  size, which is a multiple of :attr:`Storage.logical_block_size`.
- Data moves between the storage and the buffers given, which are memoryviews straight into
  guest memory: read-only views for writes, writable views for reads. An implementation should
  not copy them where it can avoid it, and must not keep them after the call returns.
- The methods are called from several threads at once (one per virtqueue, and the device's
  executor); an implementation is safe for that, and a call returns only once the operation has
  completed: a write has been acknowledged by whatever stores it, a flush has made every write
  completed before it durable.
- Failures raise :class:`OSError` (the guest sees ``VIRTIO_BLK_S_IOERR``); a call never blocks
  without bound (a storage behind a network bounds each call with a timeout).
- The ``can_*`` flags say which operations the storage supports; the device offers the
  matching virtio-blk features only when they are true. They do not change while the storage
  is open.

Storage that can overlap requests (a network server's round trips, a raw image through
io_uring) also implements :class:`AsyncStorage`: requests are *started* from one thread and
completed later, in whatever order they finish, so that one virtqueue's worker keeps many in
flight instead of one (the device does this when the storage has it).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, runtime_checkable

#: What data moves through: views into guest memory.
Buffers = Sequence[memoryview]


class StorageError(Exception):
    """The storage cannot be opened or used as asked (a usage error, not an I/O error)."""


class Storage(Protocol):
    """A block store a virtio-blk device serves. Offsets and lengths are in bytes."""

    #: Where the data is, for messages: a file name, an NBD URI.
    path: str
    #: Writes are refused (the device offers VIRTIO_BLK_F_RO).
    read_only: bool
    #: Size in bytes when opened (see :meth:`query_size` for changes since).
    size: int
    #: The smallest unit the storage can read or write (the device's logical block size is at
    #: least this).
    logical_block_size: int
    #: The unit the storage prefers (reported to the driver as the physical block size).
    physical_block_size: int
    #: :meth:`flush` makes writes durable; false for storage whose writes are durable once
    #: acknowledged, or that cannot make them so (VIRTIO_BLK_F_FLUSH is not offered).
    can_flush: bool
    #: :meth:`discard` deallocates (VIRTIO_BLK_F_DISCARD is offered).
    can_discard: bool
    #: :meth:`write_zeroes` is supported (VIRTIO_BLK_F_WRITE_ZEROES is offered).
    can_write_zeroes: bool

    def readv(self, buffers: Buffers, offset: int) -> None:
        """Fill ``buffers``, in order, from ``offset``."""

    def writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> None:
        """Write ``buffers``, in order, at ``offset``; with ``dsync`` the data is durable on
        return."""

    def flush(self) -> None:
        """Make every write completed before this call durable."""

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; its contents become unspecified."""

    def write_zeroes(self, offset: int, length: int, *, unmap: bool, dsync: bool = False) -> None:
        """Make a range read back as zeros, deallocating it if ``unmap`` allows."""

    def query_size(self) -> int:
        """The current size in bytes (the storage may have been resized since it was opened)."""

    def close(self) -> None:
        """Release the storage; no other method is called afterwards."""


class Completion(Protocol):
    """A request started by :class:`AsyncStorage`."""

    def wait(self) -> None:
        """Return once the operation is complete, or raise :class:`OSError` as the
        synchronous call would have (within the storage's own bound). Called exactly once;
        the buffers may be in use until it returns."""


@runtime_checkable
class AsyncStorage(Storage, Protocol):
    """Storage that can have many requests in flight from one thread.

    The requests one thread starts are that thread's: it alone waits for them (with
    :meth:`wait_any` and then :meth:`Completion.wait`)."""

    #: How many requests one queue should have in flight at most.
    queue_depth: int

    def start_readv(self, buffers: Buffers, offset: int) -> Completion:
        """Start :meth:`Storage.readv`; an :class:`OSError` here fails the request at once."""

    def start_writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> Completion:
        """Start :meth:`Storage.writev`."""

    def start_flush(self) -> Completion:
        """Start :meth:`Storage.flush`: it covers the writes completed before this call, not
        those still in flight."""

    def start_discard(self, offset: int, length: int) -> Completion:
        """Start :meth:`Storage.discard`."""

    def start_write_zeroes(
        self, offset: int, length: int, *, unmap: bool, dsync: bool = False
    ) -> Completion:
        """Start :meth:`Storage.write_zeroes`."""

    def wait_any(self, started: Collection[Completion], *, block: bool) -> list[Completion]:
        """Those of ``started`` (requests this thread started and has not waited for) that
        are complete now, in any order; with ``block`` and ``started`` not empty, at least one
        (the storage may return one whose :meth:`Completion.wait` still takes up to the bound
        it puts on a request)."""
