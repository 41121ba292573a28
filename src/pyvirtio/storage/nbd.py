"""An NBD export as block storage, through libnbd (Debian's python3-libnbd binding).

``NbdStorage(uri)`` connects to ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``
(or any other URI libnbd takes) and serves the export as a :class:`~pyvirtio.storage.base.Storage`:
its size, read-only flag and block size constraints become the storage's, and FLUSH, TRIM and
WRITE_ZEROES (with or without NO_HOLE) are used when the export offers them (``can_flush``,
``can_trim``, ``can_zero``); writes that must be durable carry FUA when the export can, or are
followed by a flush.

Data moves without copies: each guest buffer is handed to ``aio_pread``/``aio_pwrite`` as it is
(the binding takes any buffer, which is what ``nbd.Buffer.from_buffer`` would wrap), and libnbd
reads the reply straight into guest memory. Only a buffer that an export with a minimum block
size above one byte could not take alone goes through a bounce buffer.

Concurrency. The storage is an :class:`~pyvirtio.storage.base.AsyncStorage`: reads and writes
are started (``start_readv``/``start_writev``) and waited for later, so one virtqueue's worker
keeps up to ``queue_depth`` requests in flight; a round trip to the server is paid once per
batch, not once per request.

Threads. One libnbd handle (one connection) serves every queue. Its calls are atomic (each takes
the handle's lock), but libnbd's synchronous calls hold that lock until the reply arrives, which
would serialise the queues; so the queues only *submit* asynchronous commands, and a thread of
this storage (``nbd``) runs the connection: it polls the socket, without the handle's lock, and
tells libnbd when it can read or write. What this relies on, from libnbd(3) and its Python
binding (1.14): every call may come from any thread and is atomic; the binding releases the GIL
around every call; completion callbacks run with the handle's lock held (so they never call
libnbd: they only count down the request they belong to), in the thread that advanced the state
machine; a command whose submission raised never calls its callback, one that was queued always
does, with ENOTCONN if the connection died; libnbd keeps the buffer it was given until then. The
poll uses a duplicate of the socket's descriptor that this storage owns, so it cannot poll a
descriptor libnbd has closed and the system has reused; only the ``nbd`` thread ends a
connection, and the handle is freed when the last thread using it lets go.

Failures. Every call is bounded by ``timeout``. A request whose connection dies (the server went
away, or answered ESHUTDOWN) is sent again on the next connection; a request that gets no reply
in time ends its connection (so that nothing arrives later into guest memory) and fails with
ETIMEDOUT; while there is no connection a request waits for one, but not longer than
``timeout`` after the connection was lost: after that, requests fail at once with EIO until the
server is back. The ``nbd`` thread reconnects with exponential backoff. An error the server
answers fails the request with that error.

No flushed write is lost: a write is reported done only once the server acknowledged it, and a
flush only once the server's flush did. A write the server acknowledged but did not flush may be
lost when the connection is: if a connection ends with such writes, the next flush (on the new
connection) fails with EIO, once, as Linux reports a lost write-back to the next fsync.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from types import ModuleType
from typing import Any

from pyvirtio.storage.base import Buffers, Completion, StorageError
from pyvirtio.system_bindings import load

log = logging.getLogger(__name__)

#: Default bound on one request, in seconds (in flight, or waiting for a connection).
DEFAULT_TIMEOUT = 30.0
#: Requests one queue keeps in flight (qemu-nbd serves 16 of a client's at once).
QUEUE_DEPTH = 32
#: The largest read or write sent in one command when the export states no maximum: what the
#: NBD protocol says every server accepts.
DEFAULT_MAX_REQUEST = 32 << 20
#: The largest trim or write-zeroes sent in one command.
MAX_ZERO_REQUEST = 1 << 30
#: Reconnection backoff, in seconds: the first retry is immediate.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
#: How long a request whose connection was ended for a timeout waits for libnbd to let go of
#: its buffers.
_ABORT_GRACE = 5.0
#: How often the connection thread looks at its connection even with nothing to do (ms).
_TICK_MS = 1000

# Operations of one NBD command.
_READ, _WRITE, _FLUSH, _TRIM, _ZERO = range(5)
# libnbd's AIO directions.
_DIR_READ, _DIR_WRITE = 1, 2
#: Errors that mean "the connection is gone": retry on the next one.
_CONNECTION_ERRORS = frozenset(
    {errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}
)


def import_nbd() -> ModuleType:
    """libnbd's Python binding (Debian's python3-libnbd: ``system_bindings``)."""
    try:
        return load(("libnbdmod", "nbd"), package="python3-libnbd", is_it=_is_libnbd)
    except ImportError as exc:
        raise StorageError(f"libnbd's Python binding: {exc}") from None


def _is_libnbd(module: ModuleType) -> bool:
    return hasattr(module, "NBD")  # not PyPI's unrelated "nbd" (a notebook diff tool)


class _Pending:
    """The NBD commands of one storage call: libnbd's completion callbacks count them down."""

    __slots__ = ("_count", "_done", "_lock", "error")

    def __init__(self, count: int) -> None:
        self._count = count
        self._lock = threading.Lock()
        self._done = threading.Lock()
        self._done.acquire()
        self.error = 0

    def completed(self, err: Any) -> int:
        """libnbd's completion callback (with the handle's lock held): never calls libnbd."""
        value = err.value
        if value and not self.error:
            self.error = value
        self._finish(1)
        return 1  # retire the command: nobody asks for it by cookie

    def not_submitted(self, count: int, error: int) -> None:
        """``count`` commands were never queued (their callbacks will not run)."""
        if not self.error:
            self.error = error
        self._finish(count)

    @property
    def outstanding(self) -> int:
        return self._count

    def _finish(self, count: int) -> None:
        with self._lock:
            self._count -= count
            last = self._count == 0
        if last:
            self._done.release()

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=max(0.0, timeout))


_Command = tuple[int, Any, int, int]  # operation, buffer or length, offset, flags


class _Connection:
    """One libnbd handle, connected, and what the export said about itself."""

    def __init__(self, nbd: ModuleType, handle: Any) -> None:
        self.handle = handle
        # Our own descriptor of the socket: polled by the connection thread, shut down to end
        # a connection whose server does not answer.
        self.sock = socket.socket(fileno=os.dup(handle.aio_get_fd()))
        self.size: int = handle.get_size()
        self.read_only: bool = handle.is_read_only()
        self.can_flush: bool = handle.can_flush()
        self.can_fua: bool = handle.can_fua()
        self.can_trim: bool = handle.can_trim()
        self.can_zero: bool = handle.can_zero()
        self.block_min: int = handle.get_block_size(nbd.SIZE_MINIMUM)
        self.block_preferred: int = handle.get_block_size(nbd.SIZE_PREFERRED)
        self.block_max: int = handle.get_block_size(nbd.SIZE_MAXIMUM)
        #: Why it is ending (set once): a request timed out, the server went away, closing.
        self.ending: str | None = None
        #: Writes acknowledged on this connection without FUA, and how many of them a flush
        #: has covered (both under NbdStorage._dirty_lock).
        self.acked_writes = 0
        self.flushed_writes = 0
        #: The connection ended and its unflushed writes were reckoned with: a write whose
        #: acknowledgement is counted later is reckoned with by whoever counts it.
        self.settled = False


class _Request:
    """One storage call in flight (a :class:`~pyvirtio.storage.base.Completion`): its commands
    are sent on construction and :meth:`wait` returns once all are done; on a lost connection
    they are sent again on the next one, all within the storage's ``timeout``."""

    __slots__ = (
        "_commands",
        "_conn",
        "_covered",
        "_deadline",
        "_flush",
        "_pending",
        "_storage",
        "_then",
        "_volatile",
    )

    def __init__(
        self,
        storage: NbdStorage,
        commands: Sequence[_Command],
        volatile_write: bool,
        then: Callable[[], None] | None = None,
    ) -> None:
        """``volatile_write``: the commands change data without FUA; ``then``: what to do once
        they are done (copy out of a bounce buffer, a flush)."""
        self._storage = storage
        self._commands = commands
        self._volatile = volatile_write
        self._flush = bool(commands) and commands[0][0] == _FLUSH
        #: For a flush: the connection's acknowledged writes when it was sent (it covers them).
        self._covered = 0
        self._then = then
        self._deadline = time.monotonic() + storage.timeout
        self._conn: _Connection | None = None
        self._pending = _Pending(0)
        if commands:
            self._send()

    def _send(self) -> None:
        storage = self._storage
        conn = self._conn = storage._connection(self._deadline)
        commands = self._commands
        pending = self._pending = _Pending(len(commands))
        if self._flush:
            with storage._dirty_lock:
                self._covered = conn.acked_writes
        handle = conn.handle
        if handle is None:  # ended between the check and now
            pending.not_submitted(len(commands), errno.ENOTCONN)
        else:
            storage._submit(handle, commands, pending)

    def ready(self) -> bool:
        """Whether the commands sent are all done (:meth:`wait` sends them again if their
        connection was lost, which only happens after they are done)."""
        return self._pending.outstanding == 0

    def wait(self) -> None:
        storage = self._storage
        while self._conn is not None:
            conn, pending = self._conn, self._pending
            if not pending.wait(self._deadline - time.monotonic()):
                storage._lose(conn, f"no reply within {storage.timeout:g} s")
                if not pending.wait(_ABORT_GRACE):
                    log.error("%s: commands in flight after their connection ended", storage.path)
                raise OSError(
                    errno.ETIMEDOUT, f"{storage.path}: no reply within {storage.timeout:g} s"
                )
            error = pending.error
            if not error:
                if self._volatile:
                    with storage._dirty_lock:
                        conn.acked_writes += 1
                        if conn.settled and not storage._closing:
                            storage._lost_writes = True  # acknowledged as the connection ended
                elif self._flush:
                    with storage._dirty_lock:
                        conn.flushed_writes = max(conn.flushed_writes, self._covered)
                break
            if error in _CONNECTION_ERRORS or conn.ending is not None or storage._dead(conn.handle):
                storage._lose(conn, f"connection lost ({os.strerror(error)})")
                if time.monotonic() < self._deadline:
                    self._send()
                    continue
                raise OSError(errno.EIO, f"{storage.path}: connection lost")
            raise OSError(error, f"{storage.path}: {os.strerror(error)}")
        if self._then is not None:
            self._then()


class NbdStorage:
    """An NBD export (a :class:`~pyvirtio.storage.base.AsyncStorage`), reconnecting when the
    server comes back. Offsets and lengths are in bytes."""

    queue_depth = QUEUE_DEPTH

    def __init__(
        self,
        uri: str,
        *,
        read_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
    ) -> None:
        """Connect to ``uri`` (raises :class:`StorageError` if that fails). ``timeout`` bounds
        every call; ``connect_timeout`` (default ``timeout``) bounds each connection attempt."""
        if not timeout > 0:
            raise StorageError("the NBD timeout must be positive")
        self.path = uri
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self._nbd = import_nbd()
        if not self._nbd.NBD().supports_uri():
            raise StorageError("this libnbd was built without URI support")
        self._state = threading.Condition()  # _conn, _closing, _lost_since
        self._closing = False
        conn = self._connect()
        try:
            self._configure(conn, read_only)
        except BaseException:
            self._drop(conn)
            raise
        self._conn: _Connection | None = conn
        self._last_size = conn.size
        self._lost_since: float | None = None
        self._last_failure = ""
        self._dirty_lock = threading.Lock()
        self._lost_writes = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closed with the object, not by close(): a request finishing late may still kick it.
        weakref.finalize(self, os.close, self._wake)
        self._thread = threading.Thread(target=self._run, args=(conn,), name="nbd", daemon=True)
        self._thread.start()

    def _configure(self, conn: _Connection, read_only: bool) -> None:
        self.read_only = read_only or conn.read_only
        if conn.read_only and not read_only:
            log.warning("%s: the export is read-only; so is the disk", self.path)
        self.size = conn.size
        minimum = conn.block_min or 1
        if minimum & (minimum - 1) or minimum > 65536:
            raise StorageError(f"{self.path}: export's minimum block size {minimum} is unusable")
        self._block_min = minimum
        self.logical_block_size = max(512, minimum)
        preferred = conn.block_preferred
        if preferred & (preferred - 1):
            preferred = 0  # not a power of two: ignore the hint
        self.physical_block_size = max(self.logical_block_size, min(preferred, 65536))
        largest = conn.block_max if conn.block_max else DEFAULT_MAX_REQUEST
        largest = min(largest, DEFAULT_MAX_REQUEST)
        self._max_request = largest - largest % minimum
        if self._max_request <= 0:
            raise StorageError(f"{self.path}: export's maximum block size {conn.block_max}")
        self.can_flush = conn.can_flush
        self.can_fua = conn.can_fua
        self.can_discard = conn.can_trim and not self.read_only
        self.can_write_zeroes = conn.can_zero and not self.read_only
        log.info(
            "%s: %d bytes%s; blocks min %d preferred %d max %d; flush %s, fua %s, trim %s, zero %s",
            self.path,
            conn.size,
            " read-only" if conn.read_only else "",
            conn.block_min,
            conn.block_preferred,
            conn.block_max,
            conn.can_flush,
            conn.can_fua,
            conn.can_trim,
            conn.can_zero,
        )

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> _Connection:
        """A new connection, ready for commands, within ``connect_timeout``."""
        nbd = self._nbd
        handle = nbd.NBD()
        try:
            handle.set_handle_name("pyvirtio")
            # Guest buffers are filled by the server's reply; no need to zero them first.
            handle.set_pread_initialize(False)
            handle.aio_connect_uri(self.path)
            deadline = time.monotonic() + self.connect_timeout
            while handle.aio_is_connecting():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StorageError(
                        f"{self.path}: no NBD handshake within {self.connect_timeout:g} s"
                    )
                if self._closing:
                    raise StorageError(f"{self.path}: closed")
                # Nobody else has this handle yet: its own poll is fine here.
                handle.poll(int(min(remaining, 0.2) * 1000) + 1)
            if not handle.aio_is_ready():
                raise StorageError(f"{self.path}: the connection ended during the handshake")
            return _Connection(nbd, handle)
        except nbd.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from None

    def _drop(self, conn: _Connection) -> None:
        """Close a connection nobody else uses yet."""
        conn.sock.close()
        conn.handle = None

    def _run(self, conn: _Connection | None) -> None:
        """The connection thread: run the connection; when it ends, reconnect with backoff."""
        backoff = 0.0
        failures = 0
        while True:
            if conn is not None:
                try:
                    self._serve(conn)
                except Exception:
                    log.exception("%s: connection thread failed", self.path)
                    conn.ending = conn.ending or "internal error"
                self._end(conn)
                conn = None
                backoff = 0.0
                failures = 0
            with self._state:
                if backoff:
                    self._state.wait_for(lambda: self._closing, backoff)
                if self._closing:
                    return
            try:
                conn = self._connect()
            except (StorageError, OSError) as exc:
                failures += 1
                self._last_failure = str(exc).removeprefix(f"{self.path}: ")
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "%s: reconnecting (attempt %d): %s", self.path, failures, self._last_failure
                    )
                backoff = min(max(2 * backoff, BACKOFF_MIN), BACKOFF_MAX)
                continue
            self._check_export(conn)
            with self._state:
                if self._closing:
                    self._drop(conn)
                    return
                self._conn = conn
                self._last_size = conn.size
                self._lost_since = None
                self._state.notify_all()
            log.warning("%s: reconnected (%d attempts failed)", self.path, failures)

    def _check_export(self, conn: _Connection) -> None:
        """Say what changed in the export across a reconnection (the requests will fail if it
        no longer does what the device offered)."""
        changes = []
        if conn.size != self._last_size:
            changes.append(f"size {self._last_size} -> {conn.size}")
        if conn.read_only and not self.read_only:
            changes.append("now read-only")
        for offered, now, name in (
            (self.can_flush, conn.can_flush, "flush"),
            (self.can_fua, conn.can_fua, "FUA"),
            (self.can_discard, conn.can_trim, "trim"),
            (self.can_write_zeroes, conn.can_zero, "zero"),
        ):
            if offered and not now:
                changes.append(f"no {name}")
        if changes:
            log.warning("%s: the export changed: %s", self.path, ", ".join(changes))

    def _serve(self, conn: _Connection) -> None:
        """Poll the connection's socket and tell libnbd what it can do, until the connection
        dies or is to end."""
        handle = conn.handle
        fd = conn.sock.fileno()
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while conn.ending is None and not self._closing:
            direction = handle.aio_get_direction()
            if not direction and (handle.aio_is_dead() or handle.aio_is_closed()):
                conn.ending = "the connection died"
                return
            events = (select.POLLIN if direction & _DIR_READ else 0) | (
                select.POLLOUT if direction & _DIR_WRITE else 0
            )
            poller.register(fd, events)
            for ready, revents in poller.poll(_TICK_MS):
                if ready == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                # The direction again: another thread may have moved the state machine.
                direction = handle.aio_get_direction()
                try:
                    if direction & _DIR_READ and revents & (
                        select.POLLIN | select.POLLHUP | select.POLLERR
                    ):
                        handle.aio_notify_read()
                    elif direction & _DIR_WRITE and revents & (
                        select.POLLOUT | select.POLLHUP | select.POLLERR
                    ):
                        handle.aio_notify_write()
                    elif revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        conn.ending = "the server hung up"
                        return
                except self._nbd.Error as exc:
                    conn.ending = f"connection lost: {exc}"
                    return

    def _end(self, conn: _Connection) -> None:
        """End a connection: every command still in flight completes (with ENOTCONN) before
        this returns, and the next flush fails if acknowledged writes may be lost with it."""
        reason = conn.ending or "closing"
        with self._state:
            if self._conn is conn:
                self._conn = None
            if self._lost_since is None:
                self._lost_since = time.monotonic()
            self._state.notify_all()
        if not self._closing:
            log.warning("%s: connection ended: %s", self.path, reason)
        handle = conn.handle
        if self._closing and handle.aio_is_ready():
            # A polite goodbye (NBD_CMD_DISC), sent now if the socket takes it.
            with contextlib.suppress(self._nbd.Error):
                handle.aio_disconnect(0)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        # With the socket shut down, libnbd's next read or write fails and it moves to DEAD,
        # completing every command in flight with an error.
        for _ in range(4):
            if handle.aio_is_dead() or handle.aio_is_closed():
                break
            with contextlib.suppress(self._nbd.Error):
                handle.aio_notify_read()
            with contextlib.suppress(self._nbd.Error):
                handle.aio_notify_write()
        else:
            log.error("%s: libnbd did not notice the end of its connection", self.path)
        conn.sock.close()
        with self._dirty_lock:
            conn.settled = True
            if conn.acked_writes > conn.flushed_writes and not self._closing:
                self._lost_writes = True
                log.error(
                    "%s: %d acknowledged writes were not flushed when the connection ended; "
                    "the next flush fails",
                    self.path,
                    conn.acked_writes - conn.flushed_writes,
                )
        conn.handle = None  # libnbd closes it when the last thread using it lets go

    def _connection(self, deadline: float) -> _Connection:
        """The connection to send on, waiting for one until ``deadline`` (and no longer than
        ``timeout`` after the last one was lost)."""
        conn = self._conn
        if conn is not None and conn.ending is None:
            return conn
        with self._state:
            while True:
                conn = self._conn
                if self._closing:
                    raise OSError(errno.EIO, f"{self.path}: closed")
                if conn is not None and conn.ending is None:
                    return conn
                limit = deadline
                if self._lost_since is not None:
                    limit = min(limit, self._lost_since + self.timeout)
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    why = f" ({self._last_failure})" if self._last_failure else ""
                    raise OSError(errno.EIO, f"{self.path}: not connected to the server{why}")
                self._state.wait(remaining)

    def _lose(self, conn: _Connection, reason: str) -> None:
        """Have the connection thread end ``conn`` (a request found it dead, or timed out)."""
        with self._state:
            if conn.ending is None:
                conn.ending = reason
            if self._conn is conn:
                self._conn = None
                if self._lost_since is None:
                    self._lost_since = time.monotonic()
        os.eventfd_write(self._wake, 1)

    # -- commands ------------------------------------------------------------------------------

    def _execute(self, commands: Sequence[_Command], *, volatile_write: bool = False) -> None:
        """Send ``commands`` and wait for all of them (see :class:`_Request`)."""
        _Request(self, commands, volatile_write).wait()

    def _dead(self, handle: Any) -> bool:
        return handle is None or bool(handle.aio_is_dead() or handle.aio_is_closed())

    def _submit(self, handle: Any, commands: Sequence[_Command], pending: _Pending) -> None:
        done = pending.completed
        for i, (op, arg, offset, flags) in enumerate(commands):
            try:
                if op == _READ:
                    handle.aio_pread(arg, offset, done, flags)
                elif op == _WRITE:
                    handle.aio_pwrite(arg, offset, done, flags)
                elif op == _FLUSH:
                    handle.aio_flush(done, flags)
                elif op == _TRIM:
                    handle.aio_trim(arg, offset, done, flags)
                else:
                    handle.aio_zero(arg, offset, done, flags)
            except self._nbd.Error as exc:
                pending.not_submitted(len(commands) - i, exc.errnum or errno.ENOTCONN)
                break
        # A command left half sent (a full socket) needs the connection thread to poll for
        # writing; otherwise it is already polling for the replies.
        if handle.aio_get_direction() & _DIR_WRITE:
            os.eventfd_write(self._wake, 1)

    def _data_commands(
        self, op: int, buffers: Buffers, offset: int, flags: int
    ) -> list[_Command] | None:
        """One command per buffer (split at the export's maximum); None if a buffer is not a
        whole number of the export's minimum blocks."""
        largest = self._max_request
        minimum = self._block_min
        commands: list[_Command] = []
        for view in buffers:
            length = len(view)
            if length % minimum:
                return None
            if length <= largest:
                if length:
                    commands.append((op, view, offset, flags))
            else:
                for start in range(0, length, largest):
                    piece = view[start : start + largest]
                    commands.append((op, piece, offset + start, flags))
            offset += length
        return commands

    # -- Storage -------------------------------------------------------------------------------

    def readv(self, buffers: Buffers, offset: int) -> None:
        self.start_readv(buffers, offset).wait()

    def writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> None:
        self.start_writev(buffers, offset, dsync=dsync).wait()

    def start_readv(self, buffers: Buffers, offset: int) -> _Request:
        commands = self._data_commands(_READ, buffers, offset, 0)
        if commands is not None:
            return _Request(self, commands, False)
        # A buffer the export cannot take alone: read into one, then copy out.
        bounce = bytearray(sum(len(b) for b in buffers))

        def copy_out() -> None:
            pos = 0
            for view in buffers:
                view[:] = bounce[pos : pos + len(view)]
                pos += len(view)

        whole = self._data_commands(_READ, [memoryview(bounce)], offset, 0) or []
        return _Request(self, whole, False, copy_out)

    def start_writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> _Request:
        fua = dsync and self.can_fua
        flags = self._nbd.CMD_FLAG_FUA if fua else 0
        commands = self._data_commands(_WRITE, buffers, offset, flags)
        if commands is None:  # gather what the export cannot take buffer by buffer
            whole = memoryview(b"".join(buffers))
            commands = self._data_commands(_WRITE, [whole], offset, flags) or []
        then = self.flush if dsync and not fua else None
        return _Request(self, commands, not fua and self.can_flush, then)

    def flush(self) -> None:
        self.start_flush().wait()

    def start_flush(self) -> _Request:
        commands: list[_Command] = [(_FLUSH, None, 0, 0)] if self.can_flush else []
        return _Request(self, commands, False, self._report_lost_writes)

    def _report_lost_writes(self) -> None:
        with self._dirty_lock:
            lost, self._lost_writes = self._lost_writes, False
        if lost:
            raise OSError(
                errno.EIO,
                f"{self.path}: writes acknowledged before a lost connection may not have "
                "reached stable storage",
            )

    def discard(self, offset: int, length: int) -> None:
        self.start_discard(offset, length).wait()

    def start_discard(self, offset: int, length: int) -> _Request:
        if not self.can_discard:
            return _Request(self, [], False)  # a hint: nothing to do
        return _Request(self, self._range_commands(_TRIM, offset, length, 0), self.can_flush)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool, dsync: bool = False) -> None:
        self.start_write_zeroes(offset, length, unmap=unmap, dsync=dsync).wait()

    def start_write_zeroes(
        self, offset: int, length: int, *, unmap: bool, dsync: bool = False
    ) -> _Request:
        if not self.can_write_zeroes:
            raise OSError(errno.EOPNOTSUPP, f"{self.path}: the export cannot write zeroes")
        nbd = self._nbd
        fua = dsync and self.can_fua
        flags = (0 if unmap else nbd.CMD_FLAG_NO_HOLE) | (nbd.CMD_FLAG_FUA if fua else 0)
        return _Request(
            self,
            self._range_commands(_ZERO, offset, length, flags),
            not fua and self.can_flush,
            self.flush if dsync and not fua else None,
        )

    def wait_any(self, started: Collection[Completion], *, block: bool) -> list[Completion]:
        done: list[Completion] = [c for c in started if isinstance(c, _Request) and c.ready()]
        if done or not block or not started:
            return done
        return [next(iter(started))]  # its wait() is bounded by the timeout

    def _range_commands(self, op: int, offset: int, length: int, flags: int) -> list[_Command]:
        step = MAX_ZERO_REQUEST
        return [
            (op, min(step, length - pos), offset + pos, flags) for pos in range(0, length, step)
        ]

    def query_size(self) -> int:
        """The export's size on the current connection (NBD fixes it for a connection: a
        resized export shows after a reconnection); the last known one while disconnected."""
        conn = self._conn
        return conn.size if conn is not None else self._last_size

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.ending is None

    def close(self) -> None:
        with self._state:
            if self._closing:
                return
            self._closing = True
            conn = self._conn
            if conn is not None and conn.ending is None:
                conn.ending = "closing"
            self._state.notify_all()
        os.eventfd_write(self._wake, 1)
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            log.error("%s: the connection thread did not end", self.path)

    def __repr__(self) -> str:
        return f"NbdStorage({self.path!r})"
