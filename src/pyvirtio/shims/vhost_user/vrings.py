"""The vrings of a vhost-user session: what the front-end set for each, and its call and err
eventfds.

A vring runs (its queue started on the device, its kick fd with the queue runner) once it has
its addresses, a kick fd and guest memory, and is enabled. The call and err fds are written
from queue workers: each vring has its own lock, held only around one write, so that the fd
number is never written after it was closed and reused. The write does not wait for the
front-end: the fds were checked to be eventfds, a counter at its maximum already means
"signalled" (poll() says so without writing), and the fd is set non-blocking again before each
write. A front-end that races to make the write block anyway (clearing O_NONBLOCK and filling
the counter in between) only delays its own session's end: :meth:`Vring.unblock` drains the
counter, which lets the write finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from dataclasses import dataclass, field

from pyvirtio.runner import drain_eventfd
from pyvirtio.vhost_user.protocol import VringAddr

log = logging.getLogger(__name__)


def _signal(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        return  # the counter is full: already signalled
    with contextlib.suppress(BlockingIOError):
        os.set_blocking(fd, False)
        os.eventfd_write(fd, 1)


@dataclass
class Vring:
    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    has_kick: bool = False
    enabled: bool = False
    running: bool = False
    _call: int | None = None
    _err: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_call(self, fd: int | None) -> None:
        """A new call fd (owned from now on); the old one is closed. The new one is signalled
        once, as libvhost-user does: an interrupt lost while the front-end reconnected is then
        not lost (a spurious one is harmless)."""
        with self._lock:
            old, self._call = self._call, fd
            if fd is not None:
                _signal(fd)
        if old is not None:
            os.close(old)

    def set_err(self, fd: int | None) -> None:
        with self._lock:
            old, self._err = self._err, fd
        if old is not None:
            os.close(old)

    def signal_call(self) -> None:
        with self._lock:
            if self._call is not None:
                _signal(self._call)

    def signal_err(self) -> None:
        with self._lock:
            if self._err is not None:
                _signal(self._err)

    def unblock(self) -> None:
        """Free a worker stuck writing a call or err fd (see the module's docstring)."""
        for fd in (self._call, self._err):  # no lock: the stuck worker holds it
            if fd is not None:
                with contextlib.suppress(OSError):
                    drain_eventfd(fd)

    def close(self) -> None:
        self.set_call(None)
        self.set_err(None)
