"""The control socket: :class:`~pyvirtio.management.commands.Commands` served on a UNIX
socket, one command per line, any number per connection. Each connection has a thread of its
own and a timeout, so a client that stalls holds only itself."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from pyvirtio.management.commands import MAX_LINE, Commands

log = logging.getLogger(__name__)

#: How long a client may take to send the rest of a line.
CLIENT_TIMEOUT = 10.0
#: Clients served at once.
MAX_CLIENTS = 8


class ControlServer:
    def __init__(self, commands: Commands, listener: socket.socket) -> None:
        self.commands = commands
        self.listener = listener
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            if not self._clients.acquire(blocking=False):
                conn.close()  # too many at once
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(CLIENT_TIMEOUT)
                buffered = b""
                while True:
                    while b"\n" not in buffered:
                        if len(buffered) > MAX_LINE:
                            return
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffered += data
                    line, buffered = buffered.split(b"\n", 1)
                    if line.strip():
                        conn.sendall(self.commands.handle(line))
        except OSError as exc:
            log.info("control client: %s", exc)
        except Exception:
            log.exception("control command failed")
        finally:
            self._clients.release()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
