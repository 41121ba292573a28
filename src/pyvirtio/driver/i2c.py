"""A virtio-i2c driver, as Linux's i2c-virtio.c sends a transfer: one request per message
(header, the message's buffer unless it is empty, a status byte), FAIL_NEXT on every one but
the last, all queued before one kick; a transfer succeeds as far as its first failed message."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.transport import DriverTransport
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.i2c import IN_HDR_SIZE, OUT_HDR, REQUEST_QUEUE, I2cFeature, I2cFlag, I2cStatus
from pyvirtio.spec.ids import DeviceId


@dataclass
class Message:
    """One I2C message: a write of ``data``, or a read of ``length`` bytes (``read=True``)."""

    address: int
    data: bytes = b""
    read: bool = False
    length: int = 0


class I2cDriver:
    """virtio-i2c on any driver transport (virtio-mmio, vhost-user)."""

    def __init__(
        self, transport: DriverTransport, *, wait: Callable[[float], bool] | None = None
    ) -> None:
        if transport.device_id != DeviceId.I2C_ADAPTER:
            raise DriverError(f"device id {transport.device_id} is not an I2C adapter")
        self.transport = transport
        self._wait = wait
        self.features = transport.negotiate(
            bit(Feature.VERSION_1)
            | bit(Feature.RING_EVENT_IDX)
            | bit(I2cFeature.ZERO_LENGTH_REQUEST)
        )
        if not transport.has(I2cFeature.ZERO_LENGTH_REQUEST):
            raise DriverError("the device does not offer VIRTIO_I2C_F_ZERO_LENGTH_REQUEST")
        transport.setup_queues(1)
        transport.driver_ok()

    def transfer(self, messages: Sequence[Message], timeout: float = 10.0) -> list[bytes | None]:
        """One transfer; for each message, what was read (b"" for a write), or None from the
        first failed one on."""
        memory, allocator = self.transport.memory, self.transport.allocator
        queue = self.transport.queues[REQUEST_QUEUE]
        requests = []
        for i, msg in enumerate(messages):
            length = msg.length if msg.read else len(msg.data)
            addr = allocator.alloc(OUT_HDR.size + length + IN_HDR_SIZE)
            flags = (I2cFlag.M_RD if msg.read else 0) | (
                I2cFlag.FAIL_NEXT if i < len(messages) - 1 else 0
            )
            memory.write(addr, OUT_HDR.pack(msg.address << 1, 0, flags) + msg.data + b"\xee")
            out = [(addr, OUT_HDR.size)]
            in_: list[tuple[int, int]] = []
            if length:
                (in_ if msg.read else out).append((addr + OUT_HDR.size, length))
            in_.append((addr + OUT_HDR.size + length, IN_HDR_SIZE))
            queue.add(out, in_, i, indirect=False)
            requests.append((addr, length))
        self.transport.kick(REQUEST_QUEUE)
        done: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(messages):
            for token, written in queue.get_used():
                assert isinstance(token, int)
                done[token] = written
            if len(done) == len(messages):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the I2C transfer did not complete")
            if self._wait is None:
                raise DriverError("requests are outstanding and the device is synchronous")
            self._wait(min(left, 0.1))
        results: list[bytes | None] = []
        failed = False
        for i, (msg, (addr, length)) in enumerate(zip(messages, requests, strict=True)):
            status = memory.read(addr + OUT_HDR.size + length, 1)[0]
            failed = failed or status != I2cStatus.OK
            if failed:
                results.append(None)
            elif msg.read:
                if done[i] != length + IN_HDR_SIZE:
                    raise DriverError(f"read of {length} bytes: the device wrote {done[i]}")
                results.append(memory.read(addr + OUT_HDR.size, length))
            else:
                results.append(b"")
            allocator.free(addr, OUT_HDR.size + length + IN_HDR_SIZE)
        return results

    # SMBus-style helpers (what i2cget, i2cset and i2cdetect send through Linux's emulation).

    def quick_write(self, address: int) -> bool:
        """SMBus Quick (a zero-length write): whether a target answers at ``address``."""
        return self.transfer([Message(address)])[0] is not None

    def write_byte_data(self, address: int, register: int, value: int) -> bool:
        return self.transfer([Message(address, bytes([register, value]))])[0] is not None

    def read_byte_data(self, address: int, register: int) -> int | None:
        got = self.read_register(address, register, 1)
        return None if got is None else got[0]

    def read_register(self, address: int, register: int, length: int) -> bytes | None:
        """A write of the register number, then a read of ``length`` bytes, in one transfer."""
        results = self.transfer(
            [Message(address, bytes([register])), Message(address, read=True, length=length)]
        )
        return results[1]
