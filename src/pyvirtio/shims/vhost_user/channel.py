"""Moving vhost-user messages and their file descriptors over a UNIX stream socket."""

from __future__ import annotations

import array
import contextlib
import os
import socket

from pyvirtio.shims.vhost_user.protocol import (
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


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(size)
        if not chunk:
            raise ProtocolError("connection closed in the middle of a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_message(conn: socket.socket) -> Message | None:
    """One message with its fds, or None at end of stream."""
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
        if len(data) < HEADER_SIZE:
            data += _recv_exact(conn, HEADER_SIZE - len(data))
        request, msg_flags, size = decode_header(data)
        payload = _recv_exact(conn, size) if size else b""
    except BaseException:
        close_fds(fd_list)
        raise
    return Message(request, msg_flags, payload, fd_list)


def send_message(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        conn.sendall(data)
