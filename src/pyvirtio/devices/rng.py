"""virtio-rng, the entropy device (VIRTIO 1.2 §5.4).

One queue (requestq): the driver gives device-writable buffers and the device fills them with
random bytes, read straight into guest memory from ``source``: /dev/urandom by default, or any
file or character device (a file is read in a loop, which makes a test's bytes predictable).

An optional rate limit gives at most ``max_bytes`` bytes per ``period`` seconds: a request
that finds the budget spent waits for the next period (its queue's worker waits; a reset does
not).
"""

from __future__ import annotations

import errno
import os
import threading
import time

from pyvirtio.device import DeviceError, VirtioDevice
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue

#: Largest buffer filled in one request; a driver asking for more gets this much (§5.4.6.1
#: lets the device use less than the whole buffer).
MAX_REQUEST = 64 * 1024


class RngDevice(VirtioDevice):
    device_id = DeviceId.ENTROPY

    def __init__(
        self,
        *,
        source: str = "/dev/urandom",
        period: float | None = None,
        max_bytes: int | None = None,
        queue_size: int = 1024,
    ) -> None:
        if (period is None) != (max_bytes is None):
            raise ValueError("a rate limit needs both a period and a number of bytes")
        if period is not None and not 0 < period <= 60:
            raise ValueError("the period must be more than 0 and at most 60 seconds")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max bytes must be at least 1")
        super().__init__(1, queue_size)
        self.source = source
        self.period = period
        self.max_bytes = max_bytes
        self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        self._budget = max_bytes or 0
        self._period_start = time.monotonic()
        self._lock = threading.Lock()
        self.bytes_served = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- rate limit ----------------------------------------------------------------------------

    def _grant(self, wanted: int, queue: SplitQueue) -> int:
        """How many bytes this request may have now; waits for the next period when the budget
        is spent (or until the queue is being stopped: then one byte, the least §5.4.6.1
        allows)."""
        if self.max_bytes is None or self.period is None:
            return wanted
        while True:
            with self._lock:
                now = time.monotonic()
                if now - self._period_start >= self.period:
                    self._period_start = now
                    self._budget = self.max_bytes
                if self._budget > 0:
                    granted = min(wanted, self._budget)
                    self._budget -= granted
                    return granted
                left = self.period - (now - self._period_start)
            if self.wait_unless_stopping(queue.index, left):
                return 1

    # -- requests ------------------------------------------------------------------------------

    def _fill(self, view: memoryview) -> None:
        """Fill ``view`` from the source, straight into guest memory."""
        pos, rewound = 0, False
        while pos < len(view):
            n = os.readv(self._fd, [view[pos:]])
            if n:
                pos, rewound = pos + n, False
                continue
            if rewound:
                raise OSError(errno.ENODATA, "the entropy source is empty")
            os.lseek(self._fd, 0, os.SEEK_SET)  # the end of a file: read it again
            rewound = True

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        if chain.fault is not None or chain.read_len or not chain.write_len:
            raise DeviceError(
                f"queue {queue.index} head {chain.head}: an entropy request is one or more "
                "device-writable buffers"
            )
        wanted = self._grant(min(chain.write_len, MAX_REQUEST), queue)
        done = 0
        for view in chain.writable:
            if done == wanted:
                break
            part = view[: wanted - done]
            try:
                self._fill(part)
            except OSError as exc:
                raise DeviceError(f"entropy source failed: {exc}") from None
            done += len(part)
        self.bytes_served += done
        return done
