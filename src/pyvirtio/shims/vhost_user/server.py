"""The vhost-user socket: listen, accept one front-end at a time, move messages and fds.

This is the I/O edge of the vhost-user shim. Messages are decoded with ``protocol`` and handled
by a fresh :class:`VhostUserBackend` per connection, so a front-end that reconnects (or a new
one) always finds a device in its initial state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator

from pyvirtio.device import VirtioDevice
from pyvirtio.shims.vhost_user.backend import VhostUserBackend
from pyvirtio.shims.vhost_user.channel import close_fds, recv_message, send_message
from pyvirtio.shims.vhost_user.protocol import ProtocolError

log = logging.getLogger(__name__)

#: How often the daemon looks for host-side changes (an image that was resized).
HOUSEKEEPING_INTERVAL = 1.0


class SocketError(Exception):
    """The socket path cannot be used."""


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
        sock.listen(1)
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


class VhostUserServer:
    """Serve one device to one front-end at a time on a listening socket."""

    def __init__(self, device: VirtioDevice, listener: socket.socket) -> None:
        self.device = device
        self.listener = listener
        self.backend: VhostUserBackend | None = None
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, daemon=True, name="housekeeping"
        )

    def serve_forever(self) -> None:
        """Accept and serve connections until :meth:`stop` (or an exception from a signal)."""
        self._housekeeper.start()
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    if self._stop.is_set():
                        return
                    raise
                with conn:
                    self.serve_connection(conn)
        finally:
            self._stop.set()

    def serve_connection(self, conn: socket.socket) -> None:
        log.info("front-end connected")
        backend = VhostUserBackend(self.device)
        self.backend = backend
        try:
            while True:
                try:
                    msg = recv_message(conn)
                except ProtocolError as exc:
                    log.error("closing the connection: %s", exc)
                    return
                except ConnectionResetError:
                    msg = None
                if msg is None:
                    log.info("front-end disconnected")
                    return
                log.debug(
                    "<- %s flags=%#x size=%d fds=%d",
                    msg.name(),
                    msg.flags,
                    len(msg.payload),
                    len(msg.fds),
                )
                try:
                    answer = backend.handle(msg)
                except ProtocolError as exc:
                    log.error("closing the connection: %s", exc)
                    return
                finally:
                    close_fds(msg.fds)
                if answer is not None:
                    data, fds = answer
                    try:
                        send_message(conn, data, fds)
                    finally:
                        close_fds(fds)
        finally:
            self.backend = None
            backend.close()

    def _housekeeping(self) -> None:
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            if self.backend is not None:
                try:
                    self.device.housekeeping()
                except Exception:
                    log.exception("housekeeping failed")

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
