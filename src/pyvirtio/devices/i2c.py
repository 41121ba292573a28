"""virtio-i2c (VIRTIO 1.2 §5.16): an I2C adapter whose bus holds targets written in Python.

The device is the adapter the guest sees; an :class:`I2cBus` holds the targets (I2C devices)
at their 7-bit addresses. Built in: :class:`Eeprom24c02` (a 24C02-like 256-byte EEPROM) and
:class:`Lm75` (an LM75-like temperature sensor whose temperature the host sets). A target of
one's own subclasses :class:`I2cTarget`.

Each request is one segment of a transaction: a write (data from the guest) or a read (data
for the guest) at one address. Requests are handled in order; a request flagged FAIL_NEXT is
followed by more of the same group (a write of a register number, then a read, with a repeated
start between them), and a failed request fails the rest of its group without running them
(§5.16.6.2). A target that does not answer at its address (no target there, or a target that
refuses the segment) is a NACK: the request's status is VIRTIO_I2C_MSG_ERR.

The bus outlives the devices the daemon makes (one per front-end): an EEPROM keeps what a
guest wrote across the guest's reboots.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable

from pyvirtio.device import DeviceError, VirtioDevice
from pyvirtio.devices.control import ControlError, parse_int
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.spec.features import bit, has
from pyvirtio.spec.i2c import IN_HDR_SIZE, OUT_HDR, I2cFeature, I2cFlag, I2cStatus, decode_address
from pyvirtio.spec.ids import DeviceId
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

#: Largest segment: Linux's ``struct i2c_msg`` has a 16-bit length.
MAX_SEGMENT = 0xFFFF
#: Addresses a target may have: 0x00-0x07 and 0x78-0x7F are reserved by the I2C specification.
FIRST_ADDRESS, LAST_ADDRESS = 0x08, 0x77
_KNOWN_FLAGS = int(I2cFlag.FAIL_NEXT | I2cFlag.M_RD)


class I2cTarget:
    """One device on the bus. Subclasses implement :meth:`write` and :meth:`read`; calls come
    one at a time (the bus serialises them with the control interface's)."""

    #: Its name in ``-l/--device-list`` and the control interface's ``list``.
    kind = "target"
    #: Where it sits unless told otherwise.
    default_address: int | None = None

    def __init__(self, address: int | None = None) -> None:
        address = self.default_address if address is None else address
        if address is None or not FIRST_ADDRESS <= address <= LAST_ADDRESS:
            raise ValueError(
                f"{self.kind}: address {address} is not a 7-bit address in "
                f"{FIRST_ADDRESS:#x}..{LAST_ADDRESS:#x}"
            )
        self.address = address

    def write(self, data: bytes) -> bool:
        """A write segment (empty for SMBus Quick); False is a NACK."""
        return False

    def read(self, length: int) -> bytes | None:
        """A read segment of ``length`` bytes (0 for a Quick read); None is a NACK."""
        return None

    def stop(self) -> None:
        """The transaction this target took part in ended (a STOP condition)."""

    def control(self, words: list[str]) -> str:
        """A control command for this target (``words`` after its address); see ControlServer."""
        raise ControlError(f"{self.kind} at {self.address:#04x} has no commands")


class Eeprom24c02(I2cTarget):
    """A 24C02-like EEPROM: 256 bytes, erased to 0xFF, 8-byte write pages.

    A write sets the address pointer with its first byte and writes the rest from there,
    wrapping within the 8-byte page as the chip does; a read goes on from the pointer,
    wrapping at the end of the memory. Writes take effect at once (the chip's 5 ms write cycle,
    during which it would NACK, is not modelled)."""

    kind = "24c02"
    default_address = 0x50
    SIZE = 256
    PAGE = 8

    def __init__(self, address: int | None = None, *, contents: bytes = b"") -> None:
        super().__init__(address)
        if len(contents) > self.SIZE:
            raise ValueError(f"{len(contents)} bytes do not fit a {self.SIZE}-byte EEPROM")
        self.memory = bytearray(contents.ljust(self.SIZE, b"\xff"))
        self.pointer = 0

    def write(self, data: bytes) -> bool:
        if data:
            self.pointer = data[0] % self.SIZE
            page = self.pointer - self.pointer % self.PAGE
            for byte in data[1:]:
                self.memory[self.pointer] = byte
                self.pointer = page + (self.pointer + 1) % self.PAGE
        return True

    def read(self, length: int) -> bytes:
        out = bytearray()
        for _ in range(length):
            out.append(self.memory[self.pointer])
            self.pointer = (self.pointer + 1) % self.SIZE
        return bytes(out)

    def control(self, words: list[str]) -> str:
        """``read OFFSET LENGTH`` (hex bytes) and ``write OFFSET BYTE...``."""
        command, args = words[0].lower(), words[1:]
        if command == "read" and len(args) == 2:
            start = parse_int(args[0], "offset", 0, self.SIZE - 1)
            length = parse_int(args[1], "length", 1, self.SIZE - start)
            return " ".join(f"{b:02x}" for b in self.memory[start : start + length])
        if command == "write" and len(args) >= 2:
            start = parse_int(args[0], "offset", 0, self.SIZE - 1)
            data = bytes(parse_int(a, "byte", 0, 255) for a in args[1:])
            if start + len(data) > self.SIZE:
                raise ControlError("the bytes run past the end of the EEPROM")
            self.memory[start : start + len(data)] = data
            return ""
        raise ControlError("24c02 commands: read OFFSET LENGTH, write OFFSET BYTE...")


class Lm75(I2cTarget):
    """An LM75-like temperature sensor: registers 0 (temperature, read-only), 1 (configuration,
    8 bits), 2 (T_HYST) and 3 (T_OS), 16-bit ones sent most significant byte first, in 0.5 °C
    steps (9 bits, two's complement, left-aligned). A write's first byte selects the register
    (the pointer); the bytes after it write the register. A read returns the selected register,
    repeating its bytes when more are asked for. The temperature is the host's to set."""

    kind = "lm75"
    default_address = 0x48
    REGISTERS = 4

    def __init__(self, address: int | None = None, *, temperature: float = 25.0) -> None:
        super().__init__(address)
        self.pointer = 0
        self.config = 0
        self.t_hyst = _lm75_word(75.0)
        self.t_os = _lm75_word(80.0)
        self.temperature = _lm75_word(temperature)

    def write(self, data: bytes) -> bool:
        if not data:
            return True
        if data[0] >= self.REGISTERS:
            return False  # no such register: the chip does not acknowledge it
        self.pointer = data[0]
        value = data[1:]
        if not value:
            return True
        if self.pointer == 0:
            return False  # the temperature is read-only
        if self.pointer == 1:
            self.config = value[0]
        elif len(value) >= 2:
            word = (value[0] << 8 | value[1]) & 0xFF80
            if self.pointer == 2:
                self.t_hyst = word
            else:
                self.t_os = word
        return True

    def read(self, length: int) -> bytes:
        if self.pointer == 1:
            register = bytes([self.config])
        else:
            word = (self.temperature, 0, self.t_hyst, self.t_os)[self.pointer]
            register = word.to_bytes(2, "big")
        return (register * (length // len(register) + 1))[:length]

    def control(self, words: list[str]) -> str:
        """``temp`` (the temperature in °C) and ``temp CELSIUS`` (set it)."""
        if words[0].lower() == "temp" and len(words) <= 2:
            if len(words) == 1:
                return _lm75_celsius(self.temperature)
            try:
                self.temperature = _lm75_word(float(words[1]))
            except ValueError as exc:
                raise ControlError(str(exc)) from None
            return ""
        raise ControlError("lm75 commands: temp, temp CELSIUS")


def _lm75_word(celsius: float) -> int:
    """A temperature as the LM75's 16-bit register (0.5 °C steps, -55..125 °C)."""
    if not math.isfinite(celsius) or not -55.0 <= celsius <= 125.0:
        raise ValueError(f"{celsius} °C is outside the LM75's -55..125 °C")
    half_degrees = round(celsius * 2)
    return (half_degrees & 0x1FF) << 7


def _lm75_celsius(word: int) -> str:
    half_degrees = word >> 7
    if half_degrees & 0x100:
        half_degrees -= 0x200
    return f"{half_degrees / 2:.1f}"


#: Targets ``-l/--device-list`` knows by name.
BUILTIN_TARGETS: dict[str, type[I2cTarget]] = {"24c02": Eeprom24c02, "lm75": Lm75}
DEFAULT_DEVICE_LIST = "24c02:80,lm75:72"


def parse_device_list(text: str) -> list[I2cTarget]:
    """Targets from ``NAME:ADDR[:ADDR...][,NAME:ADDR...]`` (vhost-device-i2c's list, with a
    built-in model's name where it has a host adapter's number; addresses decimal, as there,
    or 0x-prefixed hex). ValueError for anything else."""
    targets: list[I2cTarget] = []
    for entry in text.split(","):
        name, *addresses = entry.strip().split(":")
        cls = BUILTIN_TARGETS.get(name.lower())
        if cls is None:
            raise ValueError(
                f"{name!r} is not a built-in I2C model ({', '.join(BUILTIN_TARGETS)}); "
                "host adapters are not served"
            )
        if not addresses:
            raise ValueError(f"{entry!r}: no address (e.g. {name}:{cls.default_address})")
        for address in addresses:
            try:
                number = int(address, 0)
            except ValueError:
                raise ValueError(f"{entry!r}: {address!r} is not an address") from None
            targets.append(cls(number))
    return targets


class I2cBus:
    """The targets behind the adapter, by 7-bit address; one transfer at a time."""

    def __init__(self, targets: Iterable[I2cTarget] = ()) -> None:
        self.lock = threading.Lock()
        self.targets: dict[int, I2cTarget] = {}
        for target in targets:
            self.add(target)

    def add(self, target: I2cTarget) -> None:
        if target.address in self.targets:
            other = self.targets[target.address]
            raise ValueError(f"{target.kind} and {other.kind} both at {target.address:#04x}")
        self.targets[target.address] = target

    def control(self, words: list[str]) -> str:
        """``list``, or ``ADDRESS COMMAND...`` for the target there."""
        if words[0].lower() == "list" and len(words) == 1:
            return " ".join(f"{a:#04x}={t.kind}" for a, t in sorted(self.targets.items()))
        address = parse_int(words[0], "address", 0, 0x7F)
        target = self.targets.get(address)
        if target is None:
            raise ControlError(f"no target at {address:#04x} (list shows them)")
        if len(words) < 2:
            raise ControlError(f"a command for the {target.kind} at {address:#04x} is missing")
        with self.lock:
            return target.control(words[1:])


class I2cDevice(VirtioDevice):
    device_id = DeviceId.I2C_ADAPTER

    def __init__(self, bus: I2cBus, *, queue_size: int = 1024) -> None:
        super().__init__(1, queue_size)
        self.bus = bus
        self._failing = False  # the group in progress had a failed request (FAIL_NEXT)
        self._touched: list[I2cTarget] = []  # targets the group in progress addressed
        self._errors = GuestErrorLog(log)

    def device_features(self) -> int:
        return bit(I2cFeature.ZERO_LENGTH_REQUEST)

    def validate_features(self, features: int) -> str | None:
        # §5.16.6.4: the device MUST reject a driver that does not accept the feature.
        if not has(features, I2cFeature.ZERO_LENGTH_REQUEST):
            return "VIRTIO_I2C_F_ZERO_LENGTH_REQUEST is mandatory"
        return None

    def on_reset(self) -> None:
        self._end_group()

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        if chain.fault is not None or not chain.writable or not chain.write_len:
            raise DeviceError(f"i2c request {chain.head}: no device-writable status byte")
        status_view = chain.writable[-1]
        taken = chain.take_readable(OUT_HDR.size)
        if taken is None:
            self._errors.warning("i2c: request of %d readable bytes, no header", chain.read_len)
            return self._finish(status_view, I2cStatus.ERR, 0, more=False)
        addr, _, flags = OUT_HDR.unpack(taken[0])
        payload = taken[1]
        more = bool(flags & I2cFlag.FAIL_NEXT)
        if self._failing:
            return self._finish(status_view, I2cStatus.ERR, 0, more=more)
        read = bool(flags & I2cFlag.M_RD)
        length = chain.write_len - IN_HDR_SIZE if read else chain.read_len - OUT_HDR.size
        problem = None
        if flags & ~_KNOWN_FLAGS:
            problem = f"reserved flags {flags & ~_KNOWN_FLAGS:#x}"
        elif read and payload:
            problem = "a read request with device-readable data"
        elif not read and chain.write_len != IN_HDR_SIZE:
            problem = "a write request with device-writable data"
        elif length > MAX_SEGMENT:
            problem = f"a segment of {length} bytes"
        if problem is not None:
            self._errors.warning("i2c: request %d: %s", chain.head, problem)
            return self._finish(status_view, I2cStatus.ERR, 0, more=more)
        address = decode_address(addr)
        target = self.bus.targets.get(address) if address is not None else None
        if target is None:
            return self._finish(status_view, I2cStatus.ERR, 0, more=more)  # nobody answers
        if target not in self._touched:
            self._touched.append(target)
        data: bytes | None = None
        try:
            with self.bus.lock:
                if read:
                    data = target.read(length)
                    ok = data is not None and len(data) == length
                else:
                    ok = target.write(b"".join(payload))
        except Exception:  # a model's bug: a NACK for the guest, the device goes on
            log.exception("i2c: the %s at %#04x failed", target.kind, target.address)
            ok = False
        written = _write(chain.writable, data) if read and ok and data is not None else 0
        return self._finish(status_view, I2cStatus.OK if ok else I2cStatus.ERR, written, more=more)

    def _finish(
        self, status_view: memoryview, status: I2cStatus, written: int, *, more: bool
    ) -> int:
        """Write the status byte (the last writable byte) and track the group."""
        status_view[len(status_view) - 1] = status
        if status != I2cStatus.OK and more:
            self._failing = True  # §5.16.6.1: the rest of the group fails without running
        if not more:
            self._end_group()
        return written + IN_HDR_SIZE

    def _end_group(self) -> None:
        touched, self._touched = self._touched, []
        self._failing = False
        if touched:
            with self.bus.lock:
                for target in touched:
                    try:
                        target.stop()
                    except Exception:
                        log.exception("i2c: the %s at %#04x failed", target.kind, target.address)


def _write(views: list[memoryview], data: bytes) -> int:
    pos = 0
    for view in views:
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        if pos == len(data):
            break
    return pos
