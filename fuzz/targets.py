"""Fuzz targets: each takes bytes from the fuzzer and raises only on a bug in pyvirtio.

- ``ring_blk``, ``ring_rng``, ``ring_vsock``, ``ring_gpio``, ``ring_gpio_events``,
  ``ring_i2c``: guest memory (descriptor table, available ring, requests or packets) of a
  device's queue as the fuzzer writes it; the device drains the queue. Only the device's
  own error reporting (NEEDS_RESET, status bytes, resets) is allowed, never an exception,
  and nothing outside the used ring and the device-writable buffers the chains named may
  change.
- ``vhost_user``: a stream of vhost-user messages to a back-end session.
- ``vhost_user_conn``: a connection to the vhost-user server: messages carrying real fds of
  every kind (eventfds, a semaphore eventfd, a pipe, /dev/zero, memfds too small, sealable or
  not, a socket, a regular file), cut wherever the input ends. A bug is an exception the
  session had to catch, an fd or a thread left behind once the session is over.
- ``mmio``: register accesses to a virtio-mmio virtio-blk device.
- ``xen_config``: a xenstore directory for a virtio disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable

from pyvirtio.device import VirtioDevice
from pyvirtio.devices.blk import BlkDevice
from pyvirtio.devices.gpio import GpioDevice, SimulatedGpio
from pyvirtio.devices.i2c import DEFAULT_DEVICE_LIST, I2cBus, I2cDevice, parse_device_list
from pyvirtio.devices.rng import RngDevice
from pyvirtio.devices.vsock import VsockDevice
from pyvirtio.shims.inprocess import GUEST_RAM_BASE, InProcessMachine
from pyvirtio.shims.vhost_user.server import VhostUserServer
from pyvirtio.shims.vhost_user.session import VhostUserSession
from pyvirtio.shims.xen.config import ConfigError, parse_disk
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.gpio import EVENT_QUEUE as GPIO_EVENT_QUEUE
from pyvirtio.spec.gpio import GpioFeature, IrqType
from pyvirtio.spec.i2c import I2cFeature
from pyvirtio.spec.mmio import Reg
from pyvirtio.spec.vsock import TX_QUEUE
from pyvirtio.storage.raw import RawImage
from pyvirtio.vhost_user.channel import send_message
from pyvirtio.vhost_user.protocol import HEADER_SIZE, Message, ProtocolError, decode_header
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue

logging.disable(logging.CRITICAL)  # guest errors are expected here, by the thousand

MEMORY = 64 * 1024
QUEUE_SIZE = 16
_image_dir = tempfile.mkdtemp(prefix="pyvirtio-fuzz-")
_image_path = os.path.join(_image_dir, "disk.img")
with open(_image_path, "wb") as _f:
    _f.truncate(1 << 20)
#: Where a guest's vsock connections would go: nothing listens there.
_vsock_prefix = os.path.join(_image_dir, "vsock")


def _ring(data: bytes, device: VirtioDevice, queue_index: int, features: int = 0) -> None:
    """Guest memory as the fuzzer writes it, for queue ``queue_index`` of ``device``: the
    device drains the queue; only the device's own error reporting (NEEDS_RESET, statuses)
    is allowed, never an exception, and nothing outside the used ring and the
    device-writable buffers the chains named may change. ``features``: device-type features
    the driver takes."""
    writable_ranges: list[tuple[int, int]] = []
    handle = device.handle_chain

    def recording(queue: SplitQueue, chain: DescriptorChain) -> int:
        writable_ranges.extend((a, n) for a, n, f in chain.descriptors if f & 2)
        return handle(queue, chain)

    device.handle_chain = recording  # type: ignore[method-assign]
    machine = InProcessMachine(device, memory_size=MEMORY)
    memory = machine.memory
    region = next(iter(memory))
    drv = machine.driver()
    drv.negotiate(
        bit(Feature.VERSION_1)
        | bit(Feature.RING_INDIRECT_DESC)
        | bit(Feature.RING_EVENT_IDX)
        | features
    )
    q = drv.setup_queues(len(device.queues), [QUEUE_SIZE] * len(device.queues))[queue_index]
    drv.driver_ok()
    # The fuzzer's bytes become the descriptor table, the available ring and the rest of RAM.
    blob = data[: MEMORY - 8192]
    memory.write(GUEST_RAM_BASE + 8192, blob)
    table = data[:256].ljust(256, b"\0")
    for i in range(QUEUE_SIZE):
        addr, length, flags, nxt = struct.unpack_from("<QIHH", table, i * 16)
        q.write_desc(i, GUEST_RAM_BASE + (addr % MEMORY) if addr & 1 else addr, length, flags, nxt)
    count = data[272] % (QUEUE_SIZE + 1) if len(data) > 272 else 1
    heads = list(data[256 : 256 + count])
    q.publish_heads([h % (QUEUE_SIZE + 1) for h in heads])
    before = bytes(region.view)
    try:
        drv.notify(queue_index)
    finally:
        machine.close()
    after = bytes(region.view)
    if before == after:
        return
    allowed = [(q.used_addr - GUEST_RAM_BASE, 6 + 8 * QUEUE_SIZE)]
    allowed += [(a - GUEST_RAM_BASE, n) for a, n in writable_ranges]
    for block in range(0, MEMORY, 256):
        if before[block : block + 256] == after[block : block + 256]:
            continue
        for offset in range(block, block + 256):
            if before[offset] != after[offset] and not any(s <= offset < s + n for s, n in allowed):
                raise AssertionError(f"device wrote guest memory at {offset:#x} it was not given")


def ring_blk(data: bytes) -> None:
    image = RawImage(_image_path)
    try:
        _ring(data, BlkDevice(image, queue_size=QUEUE_SIZE), 0)
    finally:
        image.close()


def ring_rng(data: bytes) -> None:
    _ring(data, RngDevice(source=_image_path, queue_size=QUEUE_SIZE), 0)


def ring_vsock(data: bytes) -> None:
    """The transmit queue: packets from the guest (headers, payloads, ops, ports)."""
    _ring(data, VsockDevice(3, _vsock_prefix, queue_size=QUEUE_SIZE), TX_QUEUE)


def ring_gpio(data: bytes) -> None:
    """The request queue: messages of every type, for lines that exist and do not."""
    model = SimulatedGpio(8, ["MMC-CD", "", "Red LED Vdd"])
    device = GpioDevice(model, queue_size=QUEUE_SIZE)
    _ring(data, device, 0, bit(GpioFeature.IRQ))


class _ArmedGpio(GpioDevice):
    """Interrupts enabled on every line from the start (each type in turn), and every input
    toggled once after the first drain of the event queue: event buffers come back at once,
    stay with the device, and come back later."""

    IRQS = (IrqType.EDGE_RISING, IrqType.EDGE_FALLING, IrqType.EDGE_BOTH, IrqType.LEVEL_HIGH)

    def __init__(self) -> None:
        super().__init__(SimulatedGpio(8), queue_size=QUEUE_SIZE)
        self.toggled = False

    def on_features(self) -> None:
        for line in range(self.model.ngpio):
            self._set_irq(line, self.IRQS[line % len(self.IRQS)])

    def process_queue(self, index: int, stop: threading.Event | None = None) -> None:
        super().process_queue(index, stop)
        if index == GPIO_EVENT_QUEUE and not self.toggled:
            self.toggled = True
            for line in range(self.model.ngpio):
                self.model.set_input(line, 1 - self.model.input_level(line))


def ring_gpio_events(data: bytes) -> None:
    """The event queue: buffers for lines with interrupts enabled, malformed ones, repeats."""
    _ring(data, _ArmedGpio(), GPIO_EVENT_QUEUE, bit(GpioFeature.IRQ))


def ring_i2c(data: bytes) -> None:
    """Requests to the EEPROM at 0x50, the sensor at 0x48 and nobody, in groups."""
    device = I2cDevice(I2cBus(parse_device_list(DEFAULT_DEVICE_LIST)), queue_size=QUEUE_SIZE)
    _ring(data, device, 0, bit(I2cFeature.ZERO_LENGTH_REQUEST))


def vhost_user(data: bytes) -> None:
    image = RawImage(_image_path)
    device = BlkDevice(image, num_queues=2)
    backend = VhostUserSession(device)
    try:
        pos = 0
        while pos + HEADER_SIZE <= len(data):
            try:
                request, flags, size = decode_header(data[pos : pos + HEADER_SIZE])
            except ProtocolError:
                return
            payload = data[pos + HEADER_SIZE : pos + HEADER_SIZE + size]
            pos += HEADER_SIZE + size
            try:
                backend.handle(Message(request, flags, payload, []))
            except ProtocolError:
                return  # the server closes the connection: a correct outcome
    finally:
        backend.close()
        image.close()


#: The fds a ``vhost_user_conn`` message may carry, by the kind byte that precedes it.
FD_KINDS = (
    "none",
    "eventfd",
    "semaphore",
    "pipe",
    "zero",
    "memfd_small",
    "memfd",
    "memfd_unsealable",
    "socket",
    "file",
)
CONN_MEMORY = 64 * 1024
_listener = socket.socket(socket.AF_UNIX)  # never listens: sessions are served directly


def _conn_fd(kind: str) -> list[int]:
    if kind == "eventfd":
        return [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
    if kind == "semaphore":
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
        os.eventfd_write(fd, 1 << 40)
        return [fd]
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return [r]
    if kind == "zero":
        return [os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)]
    if kind.startswith("memfd"):
        flags = os.MFD_CLOEXEC | (0 if kind == "memfd_unsealable" else os.MFD_ALLOW_SEALING)
        fd = os.memfd_create("fuzz", flags)
        os.ftruncate(fd, 4096 if kind == "memfd_small" else CONN_MEMORY)
        return [fd]
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.close()
        return [b.detach()]
    if kind == "file":
        return [os.open(_image_path, os.O_RDWR | os.O_CLOEXEC)]
    return []


class _Bugs(logging.Handler):
    """Collects what the server logs with a traceback: exceptions it had to catch."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def vhost_user_conn(data: bytes) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    image = RawImage(_image_path)
    server = VhostUserServer(lambda: BlkDevice(image, num_queues=2), _listener, stall_timeout=0.05)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bugs = _Bugs()
    root = logging.getLogger()
    root.addHandler(bugs)  # the only handler: nothing is printed
    level = root.level
    root.setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    try:
        pos = 0
        while pos < len(data):
            kind = FD_KINDS[data[pos] % len(FD_KINDS)]
            size = struct.unpack_from("<I", data, pos + 9)[0] if pos + 13 <= len(data) else 0
            end = min(len(data), pos + 1 + HEADER_SIZE + min(size, 4096))
            fds = _conn_fd(kind)
            try:
                send_message(ours, data[pos + 1 : end], fds)
            except OSError:
                break
            finally:
                for fd in fds:
                    os.close(fd)
            pos = end
        ours.shutdown(socket.SHUT_WR)
        server.serve_connection(theirs)
        while True:
            try:
                reply, ancdata, _, _ = ours.recvmsg(65536, socket.CMSG_SPACE(4 * 8))
            except ConnectionResetError:  # it ended the session with our messages unread
                break
            for level, kind_, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind_ == socket.SCM_RIGHTS:
                    for i in range(0, len(cdata) - len(cdata) % 4, 4):
                        os.close(int.from_bytes(cdata[i : i + 4], "little"))
            if not reply:
                break
    finally:
        ours.close()
        root.removeHandler(bugs)
        root.setLevel(level)
        logging.disable(logging.CRITICAL)
        image.close()
    if bugs.records:
        record = bugs.records[0]
        raise AssertionError(f"the session caught: {record.getMessage()}") from (
            record.exc_info[1] if record.exc_info else None
        )
    fds_after = len(os.listdir("/proc/self/fd"))
    if fds_after != fds_before:
        raise AssertionError(f"{fds_after - fds_before} fds left behind by the session")
    if threading.active_count() != threads_before:
        raise AssertionError("threads left behind by the session")


def mmio(data: bytes) -> None:
    image = RawImage(_image_path)
    device = BlkDevice(image, num_queues=2)
    machine = InProcessMachine(device, memory_size=MEMORY)
    try:
        for i in range(0, len(data) - 7, 8):
            offset, size_code, value = struct.unpack_from("<HBI", data, i)
            size = (1, 2, 4, 8, 3)[size_code % 5]
            if data[i + 7] & 1:
                machine.write(offset % 0x200, size, value)
            else:
                machine.read(offset % 0x200, size)
        machine.read(Reg.STATUS, 4)
    finally:
        machine.close()
        image.close()


def xen_config(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    values = {}
    for line in text.split("\n"):
        key, _, value = line.partition("=")
        values[key] = value
    with contextlib.suppress(ConfigError):
        parse_disk(3, 51712, values)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "ring_blk": ring_blk,
    "ring_rng": ring_rng,
    "ring_vsock": ring_vsock,
    "ring_gpio": ring_gpio,
    "ring_gpio_events": ring_gpio_events,
    "ring_i2c": ring_i2c,
    "vhost_user": vhost_user,
    "vhost_user_conn": vhost_user_conn,
    "mmio": mmio,
    "xen_config": xen_config,
}
