"""A virtio-gpio driver, as Linux's gpio-virtio.c talks to the device: one request at a time
on the request queue (an 8-byte request, a response of exactly the size it expects), and for
each line whose interrupt it wants one event buffer (the line's number, one status byte) that
unmasks it until the device returns it."""

from __future__ import annotations

import time
from collections.abc import Callable

from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.transport import DriverTransport
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.gpio import (
    CONFIG,
    EVENT_QUEUE,
    IRQ_REQUEST,
    IRQ_RESPONSE_SIZE,
    REQUEST,
    REQUEST_QUEUE,
    RESPONSE,
    Direction,
    GpioFeature,
    GpioMsg,
    GpioStatus,
    IrqType,
)
from pyvirtio.spec.ids import DeviceId


class GpioRequestError(DriverError):
    """The device answered VIRTIO_GPIO_STATUS_ERR (or a response of the wrong size)."""


class GpioDriver:
    """virtio-gpio on any driver transport (virtio-mmio, vhost-user)."""

    def __init__(
        self,
        transport: DriverTransport,
        *,
        irq: bool = True,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if transport.device_id != DeviceId.GPIO:
            raise DriverError(f"device id {transport.device_id} is not a GPIO device")
        self.transport = transport
        self._wait = wait
        wanted = bit(Feature.VERSION_1) | bit(Feature.RING_EVENT_IDX)
        self.features = transport.negotiate(wanted | (bit(GpioFeature.IRQ) if irq else 0))
        self.irq = transport.has(GpioFeature.IRQ)
        self.ngpio, self.names_size = CONFIG.unpack(transport.read_config_bytes(CONFIG.size))
        transport.setup_queues(2 if self.irq else 1)
        transport.driver_ok()
        self._events: dict[int, int] = {}  # line -> its event buffer's address

    # -- the request queue ---------------------------------------------------------------------

    def request(self, kind: int, gpio: int, value: int = 0, response: int = RESPONSE.size) -> bytes:
        """One message; returns the response (status first). GpioRequestError unless the
        device answers OK with exactly ``response`` bytes."""
        memory, allocator = self.transport.memory, self.transport.allocator
        req = allocator.alloc(REQUEST.size)
        res = allocator.alloc(response)
        try:
            memory.write(req, REQUEST.pack(kind, gpio, value))
            memory.write(res, b"\xee" * response)
            queue = self.transport.queues[REQUEST_QUEUE]
            queue.add([(req, REQUEST.size)], [(res, response)], "request", indirect=False)
            self.transport.kick(REQUEST_QUEUE)
            ((_, written),) = self._wait_used(REQUEST_QUEUE)
            data = memory.read(res, response)
            if data[0] != GpioStatus.OK:
                raise GpioRequestError(f"message {kind:#x} on line {gpio}: status {data[0]}")
            if written != response:
                raise GpioRequestError(f"message {kind:#x}: {written} bytes, not {response}")
            return data
        finally:
            allocator.free(req, REQUEST.size)
            allocator.free(res, response)

    def _wait_used(self, index: int, timeout: float = 10.0) -> list[tuple[object, int]]:
        deadline = time.monotonic() + timeout
        queue = self.transport.queues[index]
        while not (used := queue.get_used()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {index}: the device did not answer")
            if self._wait is None:
                raise DriverError("a request is outstanding and the device is synchronous")
            self._wait(min(left, 0.1))
        return used

    def line_names(self) -> list[str]:
        if not self.names_size:
            return []
        data = self.request(GpioMsg.GET_LINE_NAMES, 0, response=1 + self.names_size)
        return [n.decode("ascii") for n in data[1:].split(b"\0")[: self.ngpio]]

    def get_direction(self, gpio: int) -> Direction:
        return Direction(self.request(GpioMsg.GET_DIRECTION, gpio)[1])

    def set_direction(self, gpio: int, direction: Direction) -> None:
        self.request(GpioMsg.SET_DIRECTION, gpio, direction)

    def direction_output(self, gpio: int, value: int) -> None:
        """As Linux does it: the value first, then the direction (§5.18.6.3)."""
        self.set_value(gpio, value)
        self.set_direction(gpio, Direction.OUT)

    def get_value(self, gpio: int) -> int:
        return self.request(GpioMsg.GET_VALUE, gpio)[1]

    def set_value(self, gpio: int, value: int) -> None:
        self.request(GpioMsg.SET_VALUE, gpio, value)

    def set_irq_type(self, gpio: int, irq: IrqType) -> None:
        self.request(GpioMsg.SET_IRQ_TYPE, gpio, irq)

    # -- the event queue -----------------------------------------------------------------------

    def unmask(self, gpio: int) -> None:
        """Queue ``gpio``'s event buffer (the device returns it when the line fires)."""
        if gpio in self._events:
            raise DriverError(f"line {gpio} already has an event buffer")
        memory, allocator = self.transport.memory, self.transport.allocator
        addr = allocator.alloc(IRQ_REQUEST.size + IRQ_RESPONSE_SIZE)
        memory.write(addr, IRQ_REQUEST.pack(gpio) + b"\xee")
        queue = self.transport.queues[EVENT_QUEUE]
        queue.add(
            [(addr, IRQ_REQUEST.size)],
            [(addr + IRQ_REQUEST.size, IRQ_RESPONSE_SIZE)],
            gpio,
            indirect=False,
        )
        self._events[gpio] = addr
        self.transport.kick(EVENT_QUEUE)

    def events(self) -> list[tuple[int, int, int]]:
        """Event buffers the device returned: (line, status, bytes written), in used order."""
        out = []
        memory, allocator = self.transport.memory, self.transport.allocator
        for token, written in self.transport.queues[EVENT_QUEUE].get_used():
            assert isinstance(token, int)
            addr = self._events.pop(token)
            out.append((token, memory.read(addr + IRQ_REQUEST.size, 1)[0], written))
            allocator.free(addr, IRQ_REQUEST.size + IRQ_RESPONSE_SIZE)
        return out

    def wait_events(self, timeout: float = 10.0) -> list[tuple[int, int, int]]:
        """:meth:`events`, waiting up to ``timeout`` for at least one."""
        deadline = time.monotonic() + timeout
        while not (got := self.events()):
            left = deadline - time.monotonic()
            if left <= 0 or self._wait is None:
                return []
            self._wait(min(left, 0.1))
        return got
