"""A virtio-blk driver, as Linux's virtio_blk.c lays out requests.

Each request is a header buffer, data buffers split into segments (like a scatter-gather list of
pages) and a one-byte status buffer, allocated in guest memory for the life of the request.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvirtio.driver.mmio import DriverError
from pyvirtio.driver.transport import DriverTransport
from pyvirtio.spec.blk import (
    CONFIG_SIZE_BASIC,
    DISCARD_SEGMENT,
    ID_BYTES,
    REQ_HEADER,
    WRITEBACK_OFFSET,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId

#: The features this driver knows (Linux's feature table, minus zoned and secure erase).
DRIVER_FEATURES = (
    bit(BlkFeature.SIZE_MAX)
    | bit(BlkFeature.SEG_MAX)
    | bit(BlkFeature.RO)
    | bit(BlkFeature.BLK_SIZE)
    | bit(BlkFeature.FLUSH)
    | bit(BlkFeature.TOPOLOGY)
    | bit(BlkFeature.CONFIG_WCE)
    | bit(BlkFeature.MQ)
    | bit(BlkFeature.DISCARD)
    | bit(BlkFeature.WRITE_ZEROES)
    | bit(Feature.RING_INDIRECT_DESC)
    | bit(Feature.RING_EVENT_IDX)
    | bit(Feature.VERSION_1)
)


@dataclass
class BlkRequest:
    """One request in flight; ``status`` and ``data`` are filled in on completion."""

    req_type: int
    sector: int
    queue: int
    buffers: list[tuple[int, int]] = field(default_factory=list)  # everything to free
    data_in: list[tuple[int, int]] = field(default_factory=list)
    status_addr: int = 0
    done: bool = False
    status: int | None = None
    written: int = 0
    data: bytes = b""


class BlkDriver:
    """virtio-blk on any driver transport (virtio-mmio, vhost-user)."""

    def __init__(
        self,
        transport: DriverTransport,
        *,
        features: int = DRIVER_FEATURES,
        num_queues: int | None = None,
        queue_size: int | None = None,
        segment_size: int = 4096,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if transport.device_id != DeviceId.BLOCK:
            raise DriverError(f"device id {transport.device_id} is not a block device")
        self.transport = transport
        self.segment_size = segment_size
        self._wait = wait
        transport.negotiate(features)
        self.config = BlkConfig.unpack(transport.read_config_bytes(CONFIG_SIZE_BASIC))
        available = self.config.num_queues if transport.has(BlkFeature.MQ) else 1
        count = min(num_queues or available, available)
        transport.setup_queues(count, [queue_size] * count if queue_size else None)
        transport.driver_ok()
        self.queues = transport.queues

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors, re-read from the config space."""
        value: int = struct.unpack("<Q", self.transport.read_config_bytes(8))[0]
        return value

    # -- building requests ---------------------------------------------------------------------

    def _alloc(self, req: BlkRequest, size: int, data: bytes | None = None) -> int:
        addr = self.transport.allocator.alloc(size, 8)
        req.buffers.append((addr, size))
        if data is not None:
            self.transport.memory.write(addr, data)
        return addr

    def _segments(self, req: BlkRequest, length: int, data: bytes | None) -> list[tuple[int, int]]:
        segs = []
        for pos in range(0, length, self.segment_size):
            n = min(self.segment_size, length - pos)
            chunk = data[pos : pos + n] if data is not None else None
            segs.append((self._alloc(req, n, chunk), n))
        return segs

    def submit(
        self,
        req_type: int,
        sector: int = 0,
        *,
        data_out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        indirect: bool | None = None,
        kick: bool = True,
    ) -> BlkRequest:
        """Queue a request: ``data_out`` goes to the device, ``in_len`` bytes come back."""
        req = BlkRequest(req_type, sector, queue)
        header = self._alloc(req, REQ_HEADER.size, REQ_HEADER.pack(req_type, 0, sector))
        out = [(header, REQ_HEADER.size), *self._segments(req, len(data_out), data_out)]
        req.data_in = self._segments(req, in_len, None)
        req.status_addr = self._alloc(req, 1, b"\xff")
        self.queues[queue].add(out, [*req.data_in, (req.status_addr, 1)], req, indirect)
        if kick:
            self.transport.kick(queue)
        return req

    def _complete(self, req: BlkRequest, written: int) -> None:
        memory = self.transport.memory
        req.status = memory.read(req.status_addr, 1)[0]
        req.written = written
        req.data = b"".join(memory.read(a, n) for a, n in req.data_in)
        for addr, size in req.buffers:
            self.transport.allocator.free(addr, size)
        req.done = True

    def poll(self, queue: int = 0) -> list[BlkRequest]:
        """Complete whatever the device has used on ``queue``."""
        done = []
        for req, written in self.queues[queue].get_used():
            self._complete(req, written)
            done.append(req)
        return done

    def wait(self, reqs: Sequence[BlkRequest], timeout: float = 10.0) -> None:
        """Wait until all ``reqs`` are complete (interrupt-driven when the device is threaded)."""
        deadline = time.monotonic() + timeout
        queues = {r.queue for r in reqs}
        while not all(r.done for r in reqs):
            for q in queues:
                self.poll(q)
            if all(r.done for r in reqs):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{sum(not r.done for r in reqs)} requests did not complete")
            if self._wait is None:
                raise DriverError("requests are outstanding and the device is synchronous")
            self._wait(min(left, 0.5))

    def request(self, req_type: int, sector: int = 0, **kw: object) -> BlkRequest:
        req = self.submit(req_type, sector, **kw)  # type: ignore[arg-type]
        self.wait([req])
        return req

    # -- convenience ---------------------------------------------------------------------------

    @property
    def max_request_bytes(self) -> int:
        """Largest data transfer in one request, as the block layer splits at seg_max."""
        segs = self.config.seg_max if self.transport.has(BlkFeature.SEG_MAX) else 1
        return max(1, segs) * self.segment_size

    def read(self, sector: int, length: int, queue: int = 0) -> bytes:
        step = self.max_request_bytes
        reqs = [
            self.submit(
                BlkRequestType.IN, sector + pos // 512, in_len=min(step, length - pos), queue=queue
            )
            for pos in range(0, length, step)
        ]
        self.wait(reqs)
        for req in reqs:
            _check(req)
        return b"".join(r.data for r in reqs)

    def write(self, sector: int, data: bytes, queue: int = 0) -> None:
        step = self.max_request_bytes
        reqs = [
            self.submit(
                BlkRequestType.OUT,
                sector + pos // 512,
                data_out=data[pos : pos + step],
                queue=queue,
            )
            for pos in range(0, len(data), step)
        ]
        self.wait(reqs)
        for req in reqs:
            _check(req)

    def flush(self) -> None:
        _check(self.request(BlkRequestType.FLUSH))

    def get_id(self) -> bytes:
        req = self.request(BlkRequestType.GET_ID, in_len=ID_BYTES)
        _check(req)
        return req.data.rstrip(b"\0")

    def discard(self, segments: Sequence[tuple[int, int, int]], zeroes: bool = False) -> int:
        """DISCARD (or WRITE_ZEROES) of (sector, num_sectors, flags) segments; returns status."""
        payload = b"".join(DISCARD_SEGMENT.pack(*s) for s in segments)
        kind = BlkRequestType.WRITE_ZEROES if zeroes else BlkRequestType.DISCARD
        req = self.request(kind, data_out=payload)
        assert req.status is not None
        return req.status

    def set_writeback(self, on: bool) -> None:
        self.transport.write_config(WRITEBACK_OFFSET, 1, int(on))


class BlkRequestError(Exception):
    def __init__(self, req: BlkRequest) -> None:
        super().__init__(f"request type {req.req_type} sector {req.sector}: status {req.status}")
        self.req = req


def _check(req: BlkRequest) -> None:
    if req.status != BlkStatus.OK:
        raise BlkRequestError(req)
