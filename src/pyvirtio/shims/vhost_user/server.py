"""The vhost-user socket: listen, accept one front-end at a time, move messages and fds.

This is the I/O edge of the vhost-user shim. Messages are decoded with ``vhost_user.protocol``
and handled by a :class:`~pyvirtio.shims.vhost_user.session.VhostUserSession` on a fresh
device per connection, so a front-end that reconnects (or a new one) always finds a device in
its initial state, and nothing one front-end did outlives its session.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable

from pyvirtio.device import VirtioDevice
from pyvirtio.shims.vhost_user.session import VhostUserSession
from pyvirtio.vhost_user.channel import close_fds, recv_message, send_message
from pyvirtio.vhost_user.protocol import ProtocolError

log = logging.getLogger(__name__)

#: How often the daemon looks for host-side changes (an image that was resized).
HOUSEKEEPING_INTERVAL = 1.0
#: How long the rest of a message that has begun may take, and a reply to be taken.
STALL_TIMEOUT = 5.0
#: How long a new connection waits for the session in progress to end.
TAKEOVER_WAIT = 5.0


class VhostUserServer:
    """Serve one device to one front-end at a time on a listening socket.

    Each connection gets a session on a fresh device from ``device_factory``, in a thread of
    its own; the main thread only accepts. Whatever a front-end does (closes at any byte,
    stalls in the middle of a message for ``stall_timeout`` seconds, stops reading its
    replies, sends what the session refuses) ends its own session only. A connection that
    arrives while a session is still up waits up to ``takeover_wait`` seconds for it to end (a
    VMM restarting reconnects before its old connection is torn down) and is closed otherwise:
    one front-end per device.
    """

    def __init__(
        self,
        device_factory: Callable[[], VirtioDevice],
        listener: socket.socket,
        *,
        stall_timeout: float = STALL_TIMEOUT,
        takeover_wait: float = TAKEOVER_WAIT,
    ) -> None:
        self.device_factory = device_factory
        self.listener = listener
        self.stall_timeout = stall_timeout
        self.takeover_wait = takeover_wait
        self.session: VhostUserSession | None = None
        self.sessions_served = 0
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(
            target=self._housekeeping, daemon=True, name="housekeeping"
        )

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop` (or an exception from a signal)."""
        self._housekeeper.start()
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except OSError as exc:
                    if self._stop.is_set():
                        return
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("cannot accept a front-end: %s", exc.strerror)
                        time.sleep(0.1)
                        continue
                    raise
                self._start_session(conn)
        finally:
            self._stop.set()

    def _start_session(self, conn: socket.socket) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(self.takeover_wait)
            if thread.is_alive():
                log.warning("a front-end is already connected; refusing another one")
                conn.close()
                return
        self._conn = conn
        self._thread = threading.Thread(
            target=self.serve_connection, args=(conn,), name="session", daemon=True
        )
        self._thread.start()

    def serve_connection(self, conn: socket.socket) -> None:
        """One session, from the first message to the end of its teardown."""
        log.info("front-end connected")
        try:
            session = VhostUserSession(self.device_factory())
        except Exception:
            log.exception("cannot start a session")
            conn.close()
            return
        self.session = session
        try:
            self._run(conn, session)
        except Exception:  # a bug of ours: this session ends, the daemon goes on
            log.exception("session failed")
        finally:
            self.session = None
            self.sessions_served += 1
            try:
                session.close()
            except Exception:
                log.exception("session teardown failed")
            conn.close()

    def _run(self, conn: socket.socket, session: VhostUserSession) -> None:
        while not self._stop.is_set():
            try:
                msg = recv_message(conn, self.stall_timeout)
            except ProtocolError as exc:
                log.error("closing the connection: %s", exc)
                return
            except OSError as exc:  # reset, timed out in the middle of a message, shut down
                log.warning("front-end connection lost: %s", exc)
                return
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
                answer = session.handle(msg)
            except ProtocolError as exc:
                log.error("closing the connection: %s", exc)
                return
            finally:
                close_fds(msg.fds)
            if answer is not None:
                data, fds = answer
                try:
                    send_message(conn, data, fds, self.stall_timeout)
                except OSError as exc:
                    log.warning("front-end does not take its reply: %s", exc)
                    return
                finally:
                    close_fds(fds)

    def _housekeeping(self) -> None:
        while not self._stop.wait(HOUSEKEEPING_INTERVAL):
            session = self.session
            if session is not None:
                try:
                    session.device.housekeeping()
                except Exception:
                    log.exception("housekeeping failed")

    def stop(self) -> None:
        """Stop accepting, end the session in progress and wait for its teardown."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        conn, thread = self._conn, self._thread
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
