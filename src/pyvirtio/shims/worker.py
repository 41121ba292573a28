"""A thread per virtqueue: the data path of the vhost-user, Xen and threaded in-process shims."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading

from pyvirtio.device import VirtioDevice

log = logging.getLogger(__name__)


class QueueWorker(threading.Thread):
    """Serves one queue: wait for a kick, drain the queue, repeat.

    ``kick_fd`` is an eventfd written on every driver notification (the vhost-user front-end's,
    or one the shim writes when the guest writes QueueNotify). Front-ends create kick eventfds
    non-blocking (QEMU does) and file status flags are shared with them, so the worker waits
    with poll() instead of a blocking read. A private eventfd wakes it up to stop.
    """

    def __init__(self, device: VirtioDevice, index: int, kick_fd: int) -> None:
        super().__init__(name=f"queue-{index}", daemon=True)
        self.device = device
        self.index = index
        self.kick_fd = kick_fd
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False

    def run(self) -> None:
        process = self.device.process_queue
        index = self.index
        kick = self.kick_fd
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            process(index)  # buffers made available before the ring started
            while True:
                poller.poll()
                if self._stopping:
                    return
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(kick)
                process(index)
        except OSError as exc:
            log.error("queue %d: kick eventfd failed: %s", index, exc)
        except Exception:  # a bug: keep the daemon alive, stop this ring, and say so loudly
            log.exception("queue %d: worker failed", index)
            self.device.fail(f"queue {index} worker failed")

    def stop(self) -> None:
        """Stop after the batch in progress; buffers it popped are completed first."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        self.join()
        os.close(self._stop_fd)
