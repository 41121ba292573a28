"""Queue threads: one worker per running queue, owned by one :class:`QueueRunner` per device.

The runner is the :class:`~pyvirtio.device.QueueHost` of the vhost-user, Xen and threaded
in-process shims. It owns the kick file descriptors and the worker threads, and nothing else
starts or stops them: the device asks it to start a queue once the rings are mapped and to
stop it before they are unmapped (reset, QueueReady=0, GET_VRING_BASE, a memory table or Xen
map cache change), and :meth:`QueueRunner.stop` returns only once the worker has finished the
chains it took and is gone. A worker never dies of a guest's doing (rule violations set
NEEDS_RESET inside ``process_queue``); an exception escaping it is a bug of ours, which marks
the device NEEDS_RESET, and the driver's reset brings the queue back with a new worker.

Kick eventfds are read with ``RWF_NOWAIT``: a peer that shares the file (vhost-user) cannot
make the read block by clearing O_NONBLOCK or by reading the counter first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from pyvirtio.device import VirtioDevice

log = logging.getLogger(__name__)

_COUNTER = 8  # an eventfd is read and written 8 bytes at a time
_BAD_POLL = select.POLLERR | select.POLLNVAL
#: After this long, stop() says that it is waiting for a request (stuck storage).
_SLOW_STOP = 2.0
#: Where adaptive polling starts again after it was shrunk to nothing (QEMU's default).
_POLL_START = 4000


def drain_eventfd(fd: int) -> int:
    """Read an eventfd's counter without ever blocking (0 if it was 0)."""
    buf = bytearray(_COUNTER)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    return int.from_bytes(buf, "little")


def _nothing(index: int) -> None:
    pass


class _Worker(threading.Thread):
    """Serves one queue: drain it, wait for a kick, repeat, until told to stop."""

    def __init__(
        self, device: VirtioDevice, index: int, kick_fd: int, unblock: Callable[[int], None]
    ) -> None:
        super().__init__(name=f"queue-{index}", daemon=True)
        self.device = device
        self.unblock = unblock
        self.index = index
        self.kick_fd = kick_fd
        self.stopping = threading.Event()
        #: Draining the queue (requests may be in progress), as opposed to waiting for a kick.
        self.busy = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def run(self) -> None:
        device, index, kick, stopping = self.device, self.index, self.kick_fd, self.stopping
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        clock = time.monotonic_ns
        # Adaptive polling, as QEMU's event loop does it (util/aio-posix.c): a kick that came
        # soon after the polling ended doubles the time polled, a long sleep halves it.
        poll_max = device.poll_ns
        poll_ns = poll_max
        try:
            while not stopping.is_set():
                self.busy = True
                device.process_queue(index, stopping, poll_ns)  # also what came before a kick
                self.busy = False
                if stopping.is_set():
                    return
                slept = clock()
                for fd, events in poller.poll():
                    if fd == kick and events & _BAD_POLL:
                        device.fail(f"queue {index}: the kick file descriptor failed")
                        return
                if poll_max:
                    slept = clock() - slept
                    if slept <= poll_max:
                        poll_ns = min(poll_max, max(poll_ns * 2, _POLL_START))
                    elif poll_ns:
                        poll_ns = poll_ns // 2 if poll_ns > _POLL_START else 0
                drain_eventfd(kick)
        except Exception:  # a bug of ours: the queue stops until the driver resets the device
            log.exception("queue %d: worker failed", index)
            device.fail(f"queue {index}: worker failed")

    def stop(self) -> None:
        """Stop after the chain in hand (the chains taken are completed first) and join."""
        if self.busy:
            log.info("queue %d: stopping while it serves requests; they complete first", self.index)
        self.stopping.set()
        os.eventfd_write(self._wake, 1)
        self.join(_SLOW_STOP)
        if self.is_alive():
            log.warning("queue %d: waiting for the request in progress to finish", self.index)
            while self.is_alive():
                self.unblock(self.index)
                self.join(_SLOW_STOP)
        os.close(self._wake)


class QueueRunner:
    """The worker threads and kick fds of one device's queues."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        own_kick_eventfds: bool = False,
        unblock: Callable[[int], None] | None = None,
    ) -> None:
        """``own_kick_eventfds``: create an eventfd per queue, written by :meth:`notify` (the
        shims that trap the driver's QueueNotify); otherwise kick fds come from the peer
        through :meth:`set_kick_fd` (vhost-user). ``unblock(index)`` is called while a worker
        takes long to stop: the shim frees it from anything of the peer's it may wait on."""
        self._device = device
        self._unblock = unblock if unblock is not None else _nothing
        count = len(device.queues)
        self._kick: list[int | None] = [None] * count
        self._workers: list[_Worker | None] = [None] * count
        self._wanted = [False] * count
        self._lock = threading.Lock()
        if own_kick_eventfds:
            self._kick = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]

    # -- kicks ---------------------------------------------------------------------------------

    def set_kick_fd(self, index: int, fd: int | None) -> None:
        """Use ``fd`` (an eventfd, now owned by the runner) for queue ``index``'s kicks, or
        none. A running worker is stopped and restarted on the new fd."""
        with self._lock:
            worker = self._workers[index]
            if worker is not None:
                worker.stop()
                self._workers[index] = None
            old, self._kick[index] = self._kick[index], fd
            self._spawn(index)
        if old is not None and old != fd:
            os.close(old)

    def notify(self, index: int) -> None:
        """The driver notified queue ``index`` (the shim trapped its QueueNotify)."""
        fd = self._kick[index]
        if fd is not None:
            with contextlib.suppress(BlockingIOError):  # the counter is full: already kicked
                os.eventfd_write(fd, 1)

    # -- QueueHost -----------------------------------------------------------------------------

    def start(self, index: int) -> None:
        with self._lock:
            self._wanted[index] = True
            self._spawn(index)

    def stop(self, index: int) -> None:
        with self._lock:
            self._wanted[index] = False
            worker, self._workers[index] = self._workers[index], None
            if worker is not None:
                worker.stop()

    def _spawn(self, index: int) -> None:
        kick = self._kick[index]
        if self._wanted[index] and kick is not None and self._workers[index] is None:
            worker = _Worker(self._device, index, kick, self._unblock)
            self._workers[index] = worker
            worker.start()
            log.info("queue %d: started", index)

    def running(self, index: int) -> bool:
        worker = self._workers[index]
        return worker is not None and worker.is_alive()

    def close(self) -> None:
        """Stop every worker and close the kick fds."""
        for index in range(len(self._workers)):
            self.stop(index)
        with self._lock:
            for fd in self._kick:
                if fd is not None:
                    os.close(fd)
            self._kick = [None] * len(self._kick)
