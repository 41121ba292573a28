"""File descriptors from a vhost-user front-end are checked for what they must be.

A front-end may pass any fd where the protocol expects a particular kind: a pipe or /dev/zero
for an eventfd, a pipe for the back-end channel, a file shorter than the region it is said to
hold, a memfd it truncates once the back-end has mapped it (the next access would kill the
daemon with SIGBUS). These checks run before an fd is used; each raises :class:`PeerFdError`
and leaves closing the fd to the caller.

- kick, call and err fds must be eventfds, not in semaphore mode (a semaphore eventfd with a
  large count would wake a queue worker forever); they are made non-blocking, so that a full
  counter means "already signalled" rather than a worker that waits;
- the back-end channel must be a UNIX stream socket;
- memory (regions, the in-flight area) must be a regular file at least ``offset + size``
  long. A memfd must be sealed against shrinking: if the front-end left that to us
  (MFD_ALLOW_SEALING without the seal) the back-end adds F_SEAL_SHRINK itself, and a memfd
  that can shrink but cannot be sealed is refused. Other files (tmpfs or hugetlbfs files that
  a VMM creates for ``memory-backend-file``) cannot be sealed; their size is checked when
  they are mapped, and docs/security.md says what that leaves open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat

from pyvirtio.runner import drain_eventfd

_EVENTFD_LINK = "anon_inode:[eventfd]"
_MEMFD_PREFIX = "/memfd:"


class PeerFdError(Exception):
    """A file descriptor from the peer is not what it must be."""


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise PeerFdError(f"fd {fd}: {exc.strerror}") from None


def check_eventfd(fd: int, what: str) -> None:
    """An eventfd in counter mode, made non-blocking."""
    if _link(fd) != _EVENTFD_LINK:
        raise PeerFdError(f"{what} is not an eventfd")
    try:
        os.set_blocking(fd, False)
    except OSError as exc:
        raise PeerFdError(f"{what}: {exc.strerror}") from None


def check_kick_eventfd(fd: int) -> None:
    """An eventfd in counter mode (checked by what a read returns, which works on every
    kernel): a pending kick is consumed, and the worker drains the ring when it starts."""
    check_eventfd(fd, "kick fd")
    drain_eventfd(fd)
    try:
        os.eventfd_write(fd, 2)
    except BlockingIOError:
        raise PeerFdError("kick fd: the eventfd counter stays at its maximum") from None
    if drain_eventfd(fd) == 1:
        raise PeerFdError("kick fd is a semaphore eventfd")


def check_unix_socket(fd: int, what: str) -> socket.socket:
    """A UNIX stream socket, returned as a socket object that owns a duplicate of ``fd``."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError as exc:
        os.close(dup)
        raise PeerFdError(f"{what} is not a socket ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise PeerFdError(f"{what} is not a UNIX stream socket")
    return sock


def check_memory_fd(fd: int, offset: int, size: int, what: str) -> None:
    """A regular file that holds ``[offset, offset + size)`` and cannot shrink under us if
    it is a memfd."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise PeerFdError(f"{what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PeerFdError(f"{what} is not a regular file or memfd")
    if offset < 0 or size <= 0:
        raise PeerFdError(f"{what}: offset {offset} and size {size}")
    if _link(fd).startswith(_MEMFD_PREFIX):
        _seal_against_shrinking(fd, what)
        st = os.fstat(fd)  # the size that holds from now on
    if st.st_size < offset + size:
        raise PeerFdError(
            f"{what}: the file has {st.st_size} bytes, the region needs {offset + size}"
        )


def _seal_against_shrinking(fd: int, what: str) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise PeerFdError(f"{what} is a memfd that can shrink and cannot be sealed") from None
        raise PeerFdError(f"{what}: cannot seal the memfd: {exc.strerror}") from None
