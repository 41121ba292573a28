"""Moving vhost-user messages and their file descriptors over a UNIX stream socket.

Both sides use it: the back-end's session (``shims.vhost_user.server``) and the front-end
(``driver.vhost_user_frontend``). A peer may stop in the middle of a message, or stop reading:
``stall_timeout`` bounds how long the rest of a message that has begun may take to arrive, and
how long a message may take to leave. File descriptors received with a message that then
fails are closed here; everything else belongs to the caller.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterator

from pyvirtio.vhost_user.protocol import (
    HEADER_SIZE,
    MAX_FDS,
    Message,
    ProtocolError,
    decode_header,
)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def _timeout(conn: socket.socket, timeout: float | None) -> Iterator[None]:
    if timeout is None:
        yield
        return
    old = conn.gettimeout()
    conn.settimeout(timeout if old is None else min(old, timeout))
    try:
        yield
    finally:
        conn.settimeout(old)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(size)
        if not chunk:
            raise ProtocolError("connection closed in the middle of a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_message(conn: socket.socket, stall_timeout: float | None = None) -> Message | None:
    """One message with its fds, or None at end of stream.

    The wait for a message's first bytes follows the socket's own timeout; the rest of it must
    come within ``stall_timeout`` (TimeoutError otherwise).
    """
    fds = array.array("i")
    data, ancdata, flags, _ = conn.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    fd_list = list(fds)
    if not data:
        close_fds(fd_list)
        return None
    try:
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"message carried more than {MAX_FDS} file descriptors")
        with _timeout(conn, stall_timeout):
            if len(data) < HEADER_SIZE:
                data += _recv_exact(conn, HEADER_SIZE - len(data))
            request, msg_flags, size = decode_header(data)
            payload = _recv_exact(conn, size) if size else b""
    except BaseException:
        close_fds(fd_list)
        raise
    return Message(request, msg_flags, payload, fd_list)


def send_message(
    conn: socket.socket, data: bytes, fds: list[int], stall_timeout: float | None = None
) -> None:
    """Send one message; its fds go with its first byte. Raises OSError (TimeoutError when the
    peer does not read within ``stall_timeout``)."""
    with _timeout(conn, stall_timeout):
        if not fds:
            conn.sendall(data)
            return
        sent = conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            conn.sendall(data[sent:])
