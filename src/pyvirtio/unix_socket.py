"""The UNIX sockets the daemons listen on: created private (mode 0600), appearing only once
they accept connections, replacing a stale socket of an earlier run and refusing a live one.
Used for vhost-user, vsock's host side and the control socket; and the clients' connection to
one (the vhost-user front-end, ``pyvirtio ctl``)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator


class SocketError(Exception):
    """The socket path cannot be used."""


def connected_socket(path: str, timeout: float) -> socket.socket:
    """A stream socket connected to ``path``, with ``timeout`` on each of its operations."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock


@contextlib.contextmanager
def listening_socket(path: str) -> Iterator[socket.socket]:
    """A listening UNIX socket at ``path``, mode 0600, that appears only once it accepts."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket from a previous run
        else:
            raise SocketError(f"{path} is in use by another process")
        finally:
            probe.close()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(tmp)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot create socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        sock.listen(socket.SOMAXCONN)
        os.rename(tmp, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise SocketError(f"cannot create socket {path}: {exc.strerror}") from None
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
