"""virtio-gpio (VIRTIO 1.2 §5.18): GPIO lines whose other end is a Python model.

The device is the GPIO controller the guest sees; a :class:`GpioModel` is what its lines are
wired to on the host. The built-in model (:class:`SimulatedGpio`) holds every input at the
level the host sets through the control interface, and shows the host what the guest drives
on its outputs; a model of one's own subclasses :class:`GpioModel` (a button that bounces, an
LED wired back to an input, a sensor raising an interrupt line).

The model outlives the devices the daemon makes (one per front-end): the levels on its inputs
are the outside world's, not the guest's. The device keeps what a driver configures: each
line's direction, output value and interrupt type, and for each line the event buffer that
unmasks its interrupt.

Interrupts (VIRTIO_GPIO_F_IRQ, §5.18.6.6 and §5.18.7): an edge on an input whose interrupt is
enabled is latched until the line's event buffer is there; a level interrupt is reported while
the level is active and a buffer is there. Event buffers are returned for their own line, in
whatever order lines fire: the device keeps each one's head and the address of its status byte
(never a view into guest memory) until then, and returns it from the event queue's own worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirtio.device import DeviceError, VirtioDevice
from pyvirtio.devices.control import ControlError, parse_int
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.memory.guest import GuestMemoryError, Transient
from pyvirtio.spec.features import bit
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
    IrqStatus,
    IrqType,
)
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.ring import DescFlag
from pyvirtio.virtqueue.split import DescriptorChain, QueueLayout, SplitQueue

log = logging.getLogger(__name__)

#: ``ngpio`` is a le16 (§5.18.4).
MAX_LINES = 0xFFFF
#: What :meth:`GpioDevice.handle_chain` returns for an event buffer the device keeps.
KEPT = -1
#: How long a SET_IRQ_TYPE NONE waits for the event queue to give the line's buffer back.
RETURN_WAIT = 1.0

_EDGES = {
    IrqType.EDGE_RISING: ((0, 1),),
    IrqType.EDGE_FALLING: ((1, 0),),
    IrqType.EDGE_BOTH: ((0, 1), (1, 0)),
}
_LEVELS = {IrqType.LEVEL_HIGH: 1, IrqType.LEVEL_LOW: 0}
_DIRECTION_NAMES = {Direction.NONE: "none", Direction.OUT: "out", Direction.IN: "in"}
_DIRECTIONS = frozenset(int(d) for d in Direction)
_IRQ_TYPES = frozenset(int(t) for t in IrqType)


class GpioListener:
    """What a model tells the device it is attached to."""

    def input_changed(self, line: int, level: int) -> None:
        """The level on input ``line`` is now ``level``."""


class GpioModel:
    """The host side of ``ngpio`` GPIO lines.

    Subclasses override :meth:`on_output` to react to what the guest drives, call
    :meth:`set_input` to drive inputs, and may add control commands in :meth:`control`.
    Thread-safe: the device's queue workers and the control socket call in concurrently.
    """

    #: The name of the model for the control interface's ``info``.
    kind = "gpio"

    def __init__(self, ngpio: int = 8, names: Sequence[str] = ()) -> None:
        if not 1 <= ngpio <= MAX_LINES:
            raise ValueError(f"{ngpio} lines: a GPIO device has 1..{MAX_LINES}")
        if len(names) > ngpio:
            raise ValueError(f"{len(names)} line names for {ngpio} lines")
        given = [n for n in names if n]
        for name in given:
            # §5.18.6.1: names are zero-terminated 7-bit ASCII, unique within the device.
            if not name.isascii() or not name.isprintable():
                raise ValueError(f"line name {name!r} is not printable 7-bit ASCII")
        if len(set(given)) != len(given):
            raise ValueError("line names must be unique")
        self.ngpio = ngpio
        self.names = [*names, *[""] * (ngpio - len(names))]
        self._lock = threading.Lock()
        self._inputs = [0] * ngpio
        self._directions = [Direction.NONE] * ngpio
        self._outputs: list[int | None] = [None] * ngpio
        self._listener: GpioListener | None = None

    # -- what the outside world does -----------------------------------------------------------

    def set_input(self, line: int, level: int) -> None:
        """Drive input ``line`` to ``level`` (0 or 1): what the guest reads on it when it is an
        input, and edges that raise its interrupt."""
        self._check_line(line)
        if level not in (0, 1):
            raise ValueError(f"level {level} is not 0 or 1")
        with self._lock:
            changed = self._inputs[line] != level
            self._inputs[line] = level
            listener = self._listener
        if changed and listener is not None:
            listener.input_changed(line, level)

    def input_level(self, line: int) -> int:
        """The level the outside world drives on ``line``."""
        with self._lock:
            return self._inputs[line]

    def output(self, line: int) -> int | None:
        """What the guest drives on ``line``; None unless it is an output."""
        with self._lock:
            return self._outputs[line]

    def direction(self, line: int) -> Direction:
        """How the guest configured ``line``."""
        with self._lock:
            return self._directions[line]

    def level(self, line: int) -> int:
        """The level on the wire: the guest's when it drives the line, the input's otherwise."""
        with self._lock:
            out = self._outputs[line]
            return self._inputs[line] if out is None else out

    # -- hooks ---------------------------------------------------------------------------------

    def on_output(self, line: int, value: int | None) -> None:
        """The guest now drives ``value`` on ``line`` (None: it stopped driving it)."""

    def control(self, words: list[str]) -> str:
        """A control command (``words`` split from its line); returns the reply's text, raises
        ControlError. ``lines``, ``get N``, ``set N V`` and ``info N``; subclasses may add
        their own and hand the rest to this one."""
        command, args = words[0].lower(), words[1:]
        if command == "lines" and not args:
            return str(self.ngpio)
        if command in ("get", "info") and len(args) == 1:
            line = parse_int(args[0], "line", 0, self.ngpio - 1)
            if command == "get":
                return str(self.level(line))
            name = self.names[line]
            text = f"{_DIRECTION_NAMES[self.direction(line)]} {self.level(line)}"
            return f"{text} {name}" if name else text
        if command == "set" and len(args) == 2:
            line = parse_int(args[0], "line", 0, self.ngpio - 1)
            level = parse_int(args[1], "level", 0, 1)
            if self.output(line) is not None:
                raise ControlError(f"line {line} is an output of the guest")
            self.set_input(line, level)
            return ""
        raise ControlError(f"unknown command {' '.join(words)!r} (lines, get N, set N V, info N)")

    # -- the device's side ---------------------------------------------------------------------

    def attach(self, listener: GpioListener) -> None:
        """The device the guest uses now (one at a time)."""
        with self._lock:
            self._listener = listener

    def detach(self, listener: GpioListener) -> None:
        with self._lock:
            if self._listener is listener:
                self._listener = None

    def guest_configured(self, line: int, direction: Direction, value: int) -> None:
        """The guest set ``line``'s direction, or its value while it is an output."""
        driven = value if direction == Direction.OUT else None
        with self._lock:
            self._directions[line] = direction
            changed = self._outputs[line] != driven
            self._outputs[line] = driven
        if changed:
            try:
                self.on_output(line, driven)
            except Exception:  # a model's bug: the guest's request still completes
                log.exception("gpio model: on_output(%d, %s) failed", line, driven)

    def names_block(self) -> bytes:
        """The gpio-names block (§5.18.6.1), or b"" when no line has a name."""
        if not any(self.names):
            return b""
        return b"".join(name.encode("ascii") + b"\0" for name in self.names)

    def _check_line(self, line: int) -> None:
        if not 0 <= line < self.ngpio:
            raise ValueError(f"line {line} is not in 0..{self.ngpio - 1}")


class SimulatedGpio(GpioModel):
    """The built-in model: inputs at the levels the host sets, outputs the host can read back
    (vhost-device-gpio's simulated device, ``-l s<N>``)."""

    kind = "simulated"


@dataclass
class _Held:
    """An event buffer the device keeps until its line's interrupt fires."""

    head: int
    status_addr: int  # the guest address of its status byte (its first writable byte)


@dataclass
class _Line:
    direction: Direction = Direction.NONE
    value: int = 0
    irq: IrqType = IrqType.NONE
    seen: int = 0  # the input level last seen, to tell edges
    latched: bool = False
    held: _Held | None = None
    give_back: bool = False  # return ``held`` with IrqStatus.INVALID


class GpioDevice(VirtioDevice, GpioListener):
    device_id = DeviceId.GPIO

    def __init__(self, model: GpioModel, *, irq: bool = True, queue_size: int = 1024) -> None:
        self.model = model
        self.irq = irq  # offer VIRTIO_GPIO_F_IRQ (device_features, called below)
        super().__init__(2, queue_size)  # requestq, eventq (used with VIRTIO_GPIO_F_IRQ)
        self._names = model.names_block()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._event_lock = threading.RLock()  # one drain of the event queue at a time
        self._lines = [_Line() for _ in range(model.ngpio)]
        self._stopped: dict[int, tuple[QueueLayout, int, int]] = {}
        self._errors = GuestErrorLog(log)
        self._closed = False
        model.attach(self)

    # -- device hooks --------------------------------------------------------------------------

    def device_features(self) -> int:
        return bit(GpioFeature.IRQ) if self.irq else 0

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.model.ngpio, len(self._names))

    def on_reset(self) -> None:
        self._forget_driver()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._forget_driver()
            self.model.detach(self)

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        """A request, or an event buffer: then :data:`KEPT` when the device keeps it until its
        line fires (:meth:`handle_chains` does not complete it)."""
        if queue.index == REQUEST_QUEUE:
            return self._request(chain)
        status = self._event_buffer(chain)
        if status is None:
            return KEPT
        return _write(chain.writable, bytes([status]))

    def handle_chains(
        self, queue: SplitQueue, chain: DescriptorChain
    ) -> list[tuple[DescriptorChain, int]]:
        if queue.index == REQUEST_QUEUE:
            return [(chain, self.handle_chain(queue, chain))]
        # Every event buffer the driver made available: those whose line fires (or that cannot
        # wait) go back at once, the others stay with the device.
        done: list[tuple[DescriptorChain, int]] = []
        taken: DescriptorChain | None = chain
        while taken is not None:
            written = self.handle_chain(queue, taken)
            if written != KEPT:
                done.append((taken, written))
            elif not taken.release():
                log.error("gpio: a mapping of event buffer %d is still in use", taken.head)
            taken = queue.pop()
        return done

    def process_queue(
        self, index: int, stop: threading.Event | None = None, poll_ns: int = 0
    ) -> None:
        if index != EVENT_QUEUE:
            super().process_queue(index, stop, poll_ns)
            return
        with self._event_lock:  # never polled: the lock is not held waiting for the guest
            queue = self.queues[index]
            if queue.active and self.broken is None:
                self._complete_ready(queue)  # published by the drain below
            super().process_queue(index, stop)

    # A vhost-user front-end restarts rings without a reset when its guest reboots (QEMU
    # stops and starts them around the guest's reset): a ring that comes back other than it
    # stopped belongs to a new driver, and the old one's configuration goes.

    def stop_queue(self, index: int) -> int:
        last = super().stop_queue(index)
        queue = self.queues[index]
        layout = QueueLayout(queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr)
        with self._lock:
            self._stopped[index] = (layout, last, queue.used_idx)
        return last

    def start_queue(
        self, index: int, layout: QueueLayout, *, last_avail_idx: int, used_idx: int | None
    ) -> None:
        with self._lock:
            stopped = self._stopped.pop(index, None)
        if stopped is not None:
            resumed = (layout, last_avail_idx & 0xFFFF, self._used_idx_in_memory(layout))
            if resumed != stopped:
                self._forget_driver()
        super().start_queue(index, layout, last_avail_idx=last_avail_idx, used_idx=used_idx)

    def disable_queue(self, index: int) -> None:
        super().disable_queue(index)
        if index == EVENT_QUEUE:
            with self._lock:
                for line in self._lines:
                    line.held = None
                    line.give_back = False

    def _used_idx_in_memory(self, layout: QueueLayout) -> int | None:
        memory = self.memory
        if memory is None:
            return None
        try:
            return int.from_bytes(memory.read(layout.used + 2, 2), "little")
        except GuestMemoryError:
            return None

    def _forget_driver(self) -> None:
        """Back to the state before a driver configured anything (§5.18.6: directions none)."""
        with self._lock:
            outputs = [i for i, line in enumerate(self._lines) if line.direction != Direction.NONE]
            self._lines = [_Line() for _ in range(self.model.ngpio)]
            self._stopped.clear()
            self._returned.notify_all()
        for i in outputs:
            self.model.guest_configured(i, Direction.NONE, 0)

    # -- the request queue (§5.18.6) -----------------------------------------------------------

    def _request(self, chain: DescriptorChain) -> int:
        if chain.fault is not None or not chain.writable:
            # No status byte the device could write: the request cannot be completed.
            raise DeviceError(f"gpio request {chain.head}: no device-writable response")
        taken = chain.take_readable(REQUEST.size)
        if taken is None or chain.read_len != REQUEST.size:
            self._errors.warning("gpio: request of %d bytes, not %d", chain.read_len, REQUEST.size)
            return _respond(chain, GpioStatus.ERR)
        kind, gpio, value = REQUEST.unpack(taken[0])
        if kind == GpioMsg.GET_LINE_NAMES:
            if not self._names or chain.write_len < 1 + len(self._names):
                return _respond(chain, GpioStatus.ERR)
            return _write(chain.writable, bytes([GpioStatus.OK]) + self._names)
        if gpio >= self.model.ngpio:
            self._errors.warning(
                "gpio: message %#x for line %d of %d", kind, gpio, self.model.ngpio
            )
            return _respond(chain, GpioStatus.ERR)
        try:
            answer = self._message(kind, gpio, value)
        except _Refused as why:
            self._errors.warning("gpio: message %#x on line %d refused: %s", kind, gpio, why)
            return _respond(chain, GpioStatus.ERR)
        return _respond(chain, GpioStatus.OK, answer)

    def _message(self, kind: int, gpio: int, value: int) -> int:
        if kind == GpioMsg.GET_DIRECTION:
            with self._lock:
                return int(self._lines[gpio].direction)
        if kind == GpioMsg.SET_DIRECTION:
            if value not in _DIRECTIONS:
                raise _Refused(f"direction {value}")
            return self._set_direction(gpio, Direction(value))
        if kind == GpioMsg.GET_VALUE:
            with self._lock:
                line = self._lines[gpio]
                if line.direction == Direction.OUT:
                    return line.value
            return self.model.input_level(gpio)
        if kind == GpioMsg.SET_VALUE:
            if value not in (0, 1):
                raise _Refused(f"value {value}")
            with self._lock:
                line = self._lines[gpio]
                line.value = value
                direction = line.direction
            if direction == Direction.OUT:
                self.model.guest_configured(gpio, direction, value)
            return 0
        if kind == GpioMsg.SET_IRQ_TYPE:
            if not self.negotiated(GpioFeature.IRQ):
                raise _Refused("VIRTIO_GPIO_F_IRQ was not negotiated")
            if value not in _IRQ_TYPES:
                raise _Refused(f"interrupt type {value}")
            return self._set_irq(gpio, IrqType(value))
        raise _Refused("unknown message type")

    def _set_direction(self, gpio: int, direction: Direction) -> int:
        with self._lock:
            line = self._lines[gpio]
            if direction == Direction.NONE:
                # §5.18.6: the device discards all state of a line set to direction none.
                give_back = line.held is not None
                line.direction, line.value, line.irq, line.latched = (
                    direction,
                    0,
                    IrqType.NONE,
                    False,
                )
                line.give_back = give_back
            else:
                line.direction = direction
                give_back = False
            value = line.value
        self.model.guest_configured(gpio, direction, value)
        if give_back:
            self._wait_given_back(gpio)
        return 0

    def _set_irq(self, gpio: int, irq: IrqType) -> int:
        level = self.model.input_level(gpio)
        fire = False
        with self._lock:
            line = self._lines[gpio]
            if irq == IrqType.NONE:
                # §5.18.6.6: disabling discards a latched edge and returns the line's buffer.
                line.irq, line.latched = irq, False
                line.give_back = line.held is not None
                give_back = line.give_back
            else:
                if line.direction == Direction.OUT:
                    raise _Refused("interrupts on an output line")
                if line.irq not in (IrqType.NONE, irq):
                    raise _Refused("interrupt type changed without disabling it first")
                if line.irq == IrqType.NONE:
                    line.irq, line.seen, line.latched = irq, level, False
                give_back = False
                fire = self._ready(line, level)
        if give_back:
            self._wait_given_back(gpio)
        elif irq != IrqType.NONE and fire:
            self.notify_queue(EVENT_QUEUE)
        return 0

    def _wait_given_back(self, gpio: int) -> None:
        """Have the event queue return ``gpio``'s buffer (INVALID) before the reply goes."""
        self.notify_queue(EVENT_QUEUE)
        with self._returned:
            self._returned.wait_for(
                lambda: self._lines[gpio].held is None or not self.queues[EVENT_QUEUE].active,
                RETURN_WAIT,
            )

    # -- interrupts ----------------------------------------------------------------------------

    def input_changed(self, line: int, level: int) -> None:
        """From the model: an input changed (edge detection, §5.18.6.6)."""
        with self._lock:
            state = self._lines[line]
            old, state.seen = state.seen, level
            if state.irq == IrqType.NONE or state.direction == Direction.OUT:
                return
            if (old, level) in _EDGES.get(state.irq, ()):
                state.latched = True  # §5.18.6: an edge is latched while the line is masked
            fire = self._ready(state, level)
        if fire:
            self.notify_queue(EVENT_QUEUE)

    @staticmethod
    def _ready(line: _Line, level: int) -> bool:
        """Whether the line's interrupt is to be reported now (it may not have a buffer)."""
        if line.irq == IrqType.NONE:
            return False
        if line.irq in _LEVELS:
            return level == _LEVELS[line.irq]  # §5.18.6: a level interrupt is never latched
        return line.latched

    def _event_buffer(self, chain: DescriptorChain) -> int | None:
        """The status to return ``chain`` with now, or None when the device keeps it."""
        if chain.fault is not None or chain.write_len < IRQ_RESPONSE_SIZE or not chain.writable:
            raise DeviceError(f"gpio event buffer {chain.head}: no device-writable status")
        if not self.negotiated(GpioFeature.IRQ):
            raise DeviceError("gpio: the event queue is used without VIRTIO_GPIO_F_IRQ")
        taken = chain.take_readable(IRQ_REQUEST.size)
        if taken is None or chain.read_len != IRQ_REQUEST.size:
            self._errors.warning("gpio: event buffer with %d readable bytes", chain.read_len)
            return IrqStatus.INVALID
        (gpio,) = IRQ_REQUEST.unpack(taken[0])
        if gpio >= self.model.ngpio:
            self._errors.warning("gpio: event buffer for line %d of %d", gpio, self.model.ngpio)
            return IrqStatus.INVALID
        level = self.model.input_level(gpio)
        with self._lock:
            line = self._lines[gpio]
            if line.held is not None or line.irq == IrqType.NONE:
                # §5.18.7: one buffer per line, and only for an enabled interrupt; give it back.
                return IrqStatus.INVALID
            if self._ready(line, level):
                line.latched = False
                return IrqStatus.VALID
            status_addr = next(a for a, n, f in chain.descriptors if f & DescFlag.WRITE and n)
            line.held = _Held(chain.head, status_addr)
            return None

    def _complete_ready(self, queue: SplitQueue) -> None:
        """Return the kept buffers whose line fired (VALID) or must go back (INVALID)."""
        due: list[tuple[_Held, int]] = []
        with self._lock:
            for gpio, line in enumerate(self._lines):
                if line.held is None:
                    continue
                if line.give_back:
                    status = IrqStatus.INVALID
                elif self._ready(line, self.model.input_level(gpio)):
                    status = IrqStatus.VALID
                    line.latched = False
                else:
                    continue
                due.append((line.held, status))
                line.held, line.give_back = None, False
        memory = self.memory
        for held, state in due:
            written = 0
            hold: list[Transient] = []
            try:
                if memory is not None:
                    memory.buffers(held.status_addr, 1, True, hold)[0][0] = state
                    written = IRQ_RESPONSE_SIZE
                    queue.log_write(held.status_addr, 1)
            except GuestMemoryError as exc:
                self._errors.warning("gpio: event buffer %d: %s", held.head, exc)
            finally:
                for mapping in hold:
                    mapping.close()
            queue.push(held.head, written)
        if due:
            with self._returned:
                self._returned.notify_all()


class _Refused(Exception):
    """A message the device answers with VIRTIO_GPIO_STATUS_ERR."""


def _respond(chain: DescriptorChain, status: GpioStatus, value: int = 0) -> int:
    """Write a ``virtio_gpio_response`` (as much of it as fits) and return its length."""
    return _write(chain.writable, RESPONSE.pack(status, value)[: chain.write_len])


def _write(views: list[memoryview], data: bytes) -> int:
    """Write ``data`` across the device-writable views; return how many bytes went in."""
    pos = 0
    for view in views:
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        if pos == len(data):
            break
    return pos
