"""A virtio-rng driver, as Linux's virtio-rng.c asks for entropy: one device-writable buffer per
request, and the device says how many bytes it filled."""

from __future__ import annotations

import time
from collections.abc import Callable

from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.transport import DriverTransport
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId


class RngDriver:
    """virtio-rng on any driver transport (virtio-mmio, vhost-user)."""

    def __init__(
        self, transport: DriverTransport, *, wait: Callable[[float], bool] | None = None
    ) -> None:
        if transport.device_id != DeviceId.ENTROPY:
            raise DriverError(f"device id {transport.device_id} is not an entropy device")
        self.transport = transport
        self._wait = wait
        transport.negotiate(bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX))
        transport.setup_queues(1)
        transport.driver_ok()
        self.queue = transport.queues[0]

    def read(self, length: int, timeout: float = 10.0) -> bytes:
        """One request for ``length`` bytes; returns what the device filled (at least 1)."""
        memory, allocator = self.transport.memory, self.transport.allocator
        buf = allocator.alloc(length)
        try:
            self.queue.add([], [(buf, length)], "entropy", indirect=False)
            self.transport.kick(0)
            deadline = time.monotonic() + timeout
            while not (used := self.queue.get_used()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the entropy request did not complete")
                if self._wait is None:
                    raise DriverError("the request is outstanding and the device is synchronous")
                self._wait(min(left, 0.5))
            ((_, written),) = used
            if not 0 < written <= length:
                raise DriverError(f"the device filled {written} of {length} bytes")
            return memory.read(buf, written)
        finally:
            allocator.free(buf, length)
