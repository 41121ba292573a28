"""virtio-blk (VIRTIO 1.2 §5.2) on a storage: a raw image, an NBD export
(:class:`pyvirtio.storage.base.Storage`).

A request is a header (type, ioprio, sector) in the device-readable part, data, and a status byte
at the very end of the device-writable part (§5.2.6). With VERSION_1 the layout across descriptors
is free (ANY_LAYOUT), so the header and the status are located by byte position, not by
descriptor. Every request ends with a status; chains whose status byte cannot be reached make the
device need a reset, since the spec gives no other way to fail them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection

from pyvirtio.device import DeviceError, InFlight, VirtioDevice
from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.memory.guest import GuestMemoryError
from pyvirtio.spec.blk import (
    BARRIER_FLAG,
    DISCARD_SEGMENT,
    ID_BYTES,
    REQ_HEADER,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    WRITEBACK_OFFSET,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)
from pyvirtio.spec.features import bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.ring import MAX_QUEUE_SIZE, DescFlag
from pyvirtio.stats import QueueStats
from pyvirtio.storage.base import AsyncStorage, Completion, Storage
from pyvirtio.virtqueue.split import DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

_T_IN = BlkRequestType.IN.value
_T_OUT = BlkRequestType.OUT.value
_T_FLUSH = BlkRequestType.FLUSH.value
_T_FLUSH_OUT = BlkRequestType.FLUSH_OUT.value
_T_GET_ID = BlkRequestType.GET_ID.value
_T_DISCARD = BlkRequestType.DISCARD.value
_T_WRITE_ZEROES = BlkRequestType.WRITE_ZEROES.value
_S_OK = BlkStatus.OK.value
_S_IOERR = BlkStatus.IOERR.value
_S_UNSUPP = BlkStatus.UNSUPP.value
_HEADER_SIZE = REQ_HEADER.size
_WRITE_TYPES = frozenset({_T_OUT, _T_DISCARD, _T_WRITE_ZEROES, BlkRequestType.SECURE_ERASE.value})
#: A request started on an AsyncStorage: its status byte, type, sector and completion.
_Started = tuple[memoryview, int, int, Completion]


class _Request(InFlight):
    """A request in flight on an AsyncStorage."""

    __slots__ = ("completion", "req_type", "sector", "status", "table")

    def __init__(
        self,
        chain: DescriptorChain,
        taken: int,
        started: _Started,
        table: dict[Completion, _Request],
    ) -> None:
        super().__init__(chain, taken)
        self.status, self.req_type, self.sector, self.completion = started
        self.table = table
        table[self.completion] = self

    def wait(self) -> None:
        with contextlib.suppress(OSError):
            self.completion.wait()
        self.table.pop(self.completion, None)


#: Limits advertised for discard and write-zeroes: sectors per segment, and (by default)
#: segments per request.
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32
#: Largest single data segment the driver may use (SIZE_MAX).
SIZE_MAX = 1 << 20
#: Rings of up to this many descriptors are accepted whatever the configured queue size.
RING_SIZE_ACCEPTED = 1024


class BlkDevice(VirtioDevice):
    """A virtio-blk device serving one storage (a raw image, an NBD export)."""

    device_id = DeviceId.BLOCK

    def __init__(
        self,
        image: Storage,
        *,
        num_queues: int = 1,
        queue_size: int = 128,
        logical_block_size: int | None = None,
        serial: str = "",
        writethrough: bool = False,
        discard_segments: int = MAX_DISCARD_SEG,
        owns_image: bool = False,
    ) -> None:
        """``discard_segments``: segments one DISCARD or WRITE_ZEROES may carry (advertised
        as max_discard_seg and max_write_zeroes_seg; more are answered UNSUPP).
        ``owns_image``: :meth:`close` flushes and closes the image (otherwise whoever opened
        it does, as when one image serves a device per vhost-user session)."""
        lbs = logical_block_size or image.logical_block_size
        if lbs < SECTOR_SIZE or lbs & (lbs - 1) or lbs > 65536:
            raise ValueError(f"logical block size {lbs} is not a power of two in 512..65536")
        if lbs < image.logical_block_size:
            raise ValueError(
                f"logical block size {lbs} is below the image's {image.logical_block_size}"
            )
        if queue_size < 4:
            raise ValueError("virtio-blk needs queues of at least 4 descriptors")
        if queue_size & (queue_size - 1) or queue_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {queue_size} is not a power of two up to 32768")
        if not 1 <= discard_segments <= MAX_DISCARD_SEG:
            raise ValueError(f"discard segments must be 1..{MAX_DISCARD_SEG}")
        serial_bytes = serial.encode()
        if len(serial_bytes) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self.image = image
        self.read_only = image.read_only
        self.logical_block_size = lbs
        self.serial = serial_bytes
        self.num_queues = num_queues
        self.discard_segments = discard_segments
        self.owns_image = owns_image
        self.queue_size = queue_size
        self._default_writeback = 0 if writethrough else 1
        self._writeback = self._default_writeback
        self._dsync = writethrough
        self._errors = GuestErrorLog(log)
        self.capacity_bytes = self._usable_size(image.size)
        # Storage that overlaps requests (NBD, io_uring): a queue keeps many in flight.
        self._async: AsyncStorage | None = None
        if isinstance(image, AsyncStorage) and image.queue_depth > 1:
            self._async = image
        #: Each queue's requests in flight on the AsyncStorage, by completion.
        self._started: list[dict[Completion, _Request]] = [{} for _ in range(num_queues)]
        # seg_max derives from the ring size the VMM is configured with; rings up to
        # RING_SIZE_ACCEPTED are accepted anyway (QEMU's virtio-mmio devices always use 1024).
        super().__init__(num_queues, max(queue_size, RING_SIZE_ACCEPTED))
        self._config = self._build_config()

    def _usable_size(self, size: int) -> int:
        return size - size % self.logical_block_size

    # -- features and config -------------------------------------------------------------------

    def device_features(self) -> int:
        features = (
            bit(BlkFeature.SIZE_MAX)
            | bit(BlkFeature.SEG_MAX)
            | bit(BlkFeature.BLK_SIZE)
            | bit(BlkFeature.TOPOLOGY)
        )
        if self.image.can_flush:  # otherwise writes are durable once done: no write cache
            features |= bit(BlkFeature.FLUSH) | bit(BlkFeature.CONFIG_WCE)
        if self.num_queues > 1:
            features |= bit(BlkFeature.MQ)
        if self.read_only:
            features |= bit(BlkFeature.RO)
        else:
            features |= self._write_features()
        return features

    def _write_features(self) -> int:
        """DISCARD and WRITE_ZEROES, where the storage supports them."""
        features = 0
        if self.image.can_discard:
            features |= bit(BlkFeature.DISCARD)
        if self.image.can_write_zeroes:
            features |= bit(BlkFeature.WRITE_ZEROES)
        return features

    def _build_config(self) -> bytes:
        lbs_sectors = self.logical_block_size >> SECTOR_SHIFT
        phys = max(self.image.physical_block_size, self.logical_block_size)
        return BlkConfig(
            capacity=self.capacity_bytes >> SECTOR_SHIFT,
            size_max=SIZE_MAX,
            seg_max=self.queue_size - 2,
            blk_size=self.logical_block_size,
            physical_block_exp=(phys // self.logical_block_size).bit_length() - 1,
            min_io_size=1,
            opt_io_size=0,
            writeback=self._writeback,
            num_queues=self.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=self.discard_segments,
            discard_sector_alignment=lbs_sectors,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=self.discard_segments,
            write_zeroes_may_unmap=1,
        ).pack()

    def config_bytes(self) -> bytes:
        return self._config

    def write_config_bytes(self, offset: int, data: bytes) -> None:
        if offset != WRITEBACK_OFFSET or len(data) != 1:
            log.warning(
                "driver wrote %d config bytes at %#x; only writeback is writable", len(data), offset
            )
            return
        self._writeback = 1 if data[0] else 0
        self._config = self._build_config()
        self._update_cache_mode()
        log.info(
            "%s: cache mode is now %s",
            self.image.path,
            "writethrough" if self._dsync else "writeback",
        )

    def _update_cache_mode(self) -> None:
        """Writethrough when the driver cannot flush, or chose it (§5.2.6.5 "stable" writes)."""
        if self.negotiated(BlkFeature.CONFIG_WCE):
            self._dsync = self._writeback == 0
        else:
            self._dsync = not self.negotiated(BlkFeature.FLUSH)

    def on_features(self) -> None:
        self._update_cache_mode()

    def on_reset(self) -> None:
        self._writeback = self._default_writeback
        self._config = self._build_config()

    def housekeeping(self) -> None:
        self.refresh_capacity()

    def set_read_only(self, read_only: bool) -> None:
        """Refuse writes from now on (IOERR), or take them again if the storage is writable.
        A driver that negotiated its features keeps them (writes simply fail); a driver that
        comes later is offered RO (and no DISCARD or WRITE_ZEROES) accordingly."""
        if not read_only and self.image.read_only:
            raise ValueError(f"{self.image.path} was opened read-only")
        self.read_only = read_only
        writes = self._write_features()
        if not self.status:
            if read_only:
                self.change_offer(add=bit(BlkFeature.RO), remove=writes)
            else:
                self.change_offer(add=writes, remove=bit(BlkFeature.RO))

    def close(self) -> None:
        if not self.owns_image:
            return
        if not self.image.read_only:
            try:
                self.image.flush()
            except OSError as exc:
                log.error("%s: final flush failed: %s", self.image.path, exc)
        self.image.close()

    def refresh_capacity(self) -> bool:
        """Re-read the image size; on a change update capacity and notify (§5.2.6.5)."""
        size = self._usable_size(self.image.query_size())
        if size == self.capacity_bytes:
            return False
        log.info(
            "%s: capacity changed from %d to %d bytes", self.image.path, self.capacity_bytes, size
        )
        self.capacity_bytes = size
        self._config = self._build_config()
        self.config_changed()
        return True

    # -- requests ------------------------------------------------------------------------------

    def handle_chain(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        self._handle(queue, chain, None)
        return chain.write_len

    def start_chain(
        self, queue: SplitQueue, chain: DescriptorChain, taken: int, in_flight: int
    ) -> InFlight | int | None:
        """On an AsyncStorage, start the request and go on: any order is fine, since the
        driver orders nothing between requests in flight (a flush covers the writes completed
        before it, §5.2.6.4)."""
        storage = self._async
        if storage is None:
            return super().start_chain(queue, chain, taken, in_flight)
        started = self._handle(queue, chain, storage)
        if started is None:
            return chain.write_len
        return _Request(chain, taken, started, self._started[queue.index])

    def reap(
        self, queue: SplitQueue, in_flight: Collection[InFlight], *, block: bool
    ) -> list[tuple[InFlight, int]]:
        storage = self._async
        if storage is None:
            return super().reap(queue, in_flight, block=block)
        table = self._started[queue.index]
        done: list[tuple[InFlight, int]] = []
        for completion in storage.wait_any(table.keys(), block=block):
            request = table.pop(completion)
            try:
                completion.wait()
            except OSError as exc:
                self._storage_failed(self.stats[queue.index], request.req_type, request.sector, exc)
                request.status[0] = _S_IOERR
            else:
                request.status[0] = _S_OK
            done.append((request, request.chain.write_len))
        return done

    def in_flight_limit(self, queue: SplitQueue) -> int:
        storage = self._async
        return storage.queue_depth if storage is not None else super().in_flight_limit(queue)

    def _storage_failed(self, stats: QueueStats, req_type: int, sector: int, exc: OSError) -> None:
        self._errors.warning(
            "%s: request type %d at sector %d failed: %s", self.image.path, req_type, sector, exc
        )
        stats.error("storage")

    def _handle(
        self, queue: SplitQueue, chain: DescriptorChain, storage: AsyncStorage | None
    ) -> _Started | None:
        """Handle a request; with ``storage``, a read, write, flush, or a discard or
        write-zeroes of one segment, is only started and returned (its status is written
        once it completes)."""
        writable = chain.writable
        stats = self.stats[queue.index]
        if chain.fault is not None:
            self._errors.warning("queue %d head %d: %s", queue.index, chain.head, chain.fault)
            self._status_of_faulty(chain)[0] = _S_IOERR
            stats.error("bad_buffer")
            return None
        if not writable:
            raise DeviceError(f"queue {queue.index} head {chain.head}: request has no status byte")
        last = writable[-1]
        if len(last) == 1:
            status = last
            data_in = writable[:-1]
        else:
            status = last[-1:]
            data_in = [*writable[:-1], last[:-1]]
        header = chain.take_readable(_HEADER_SIZE)
        if header is None:
            self._errors.warning(
                "queue %d head %d: request header is %d bytes, not 16",
                queue.index,
                chain.head,
                chain.read_len,
            )
            status[0] = _S_IOERR
            stats.error("bad_header")
            return None
        req_type, _, sector = REQ_HEADER.unpack(header[0])
        data_out = header[1]
        try:
            result = self._execute(
                req_type & ~BARRIER_FLAG, sector, data_out, data_in, chain.write_len - 1, storage
            )
        except OSError as exc:
            self._storage_failed(stats, req_type, sector, exc)
            result = _S_IOERR
        else:
            if not isinstance(result, int):
                return status, req_type, sector, result
            if result == _S_IOERR:
                stats.error("ioerr")
            elif result == _S_UNSUPP:
                stats.error("unsupp")
        status[0] = result
        return None

    def _status_of_faulty(self, chain: DescriptorChain) -> memoryview:
        """The status byte of a chain whose buffers did not all map."""
        assert self.memory is not None
        for addr, length, flags in reversed(chain.descriptors):
            if flags & DescFlag.WRITE and length:
                try:
                    return self.memory.buffers(addr + length - 1, 1, True, chain.held)[0]
                except GuestMemoryError:
                    break
        raise DeviceError(f"request at head {chain.head} has no reachable status byte")

    def _execute(
        self,
        req_type: int,
        sector: int,
        data_out: list[memoryview],
        data_in: list[memoryview],
        in_len: int,
        storage: AsyncStorage | None = None,
    ) -> int | Completion:
        """The request's status, or (reads and writes, with ``storage``) its completion."""
        if req_type == _T_IN:
            if self._range_bad(sector, in_len):
                return _S_IOERR
            if storage is not None:
                return storage.start_readv(data_in, sector << SECTOR_SHIFT)
            self.image.readv(data_in, sector << SECTOR_SHIFT)
            return _S_OK
        if req_type in _WRITE_TYPES and self.read_only:
            # §5.2.6.5: IOERR for a write when RO was offered, and no data written.
            return _S_IOERR
        if req_type == _T_OUT:
            length = sum(len(b) for b in data_out)
            if self._range_bad(sector, length):
                return _S_IOERR
            if storage is not None:
                return storage.start_writev(data_out, sector << SECTOR_SHIFT, dsync=self._dsync)
            self.image.writev(data_out, sector << SECTOR_SHIFT, dsync=self._dsync)
            return _S_OK
        if req_type in (_T_FLUSH, _T_FLUSH_OUT):
            if storage is not None:
                return storage.start_flush()
            self.image.flush()
            return _S_OK
        if req_type == _T_GET_ID:
            return self._get_id(data_in)
        if req_type in (_T_DISCARD, _T_WRITE_ZEROES):
            return self._discard_or_zero(req_type, data_out, storage)
        return _S_UNSUPP

    def _range_bad(self, sector: int, length: int) -> bool:
        offset = sector << SECTOR_SHIFT
        return bool(
            (offset | length) & (self.logical_block_size - 1)
            or offset + length > self.capacity_bytes
        )

    def _get_id(self, data_in: list[memoryview]) -> int:
        answer = self.serial.ljust(ID_BYTES, b"\0")
        pos = 0
        for view in data_in:
            n = min(len(view), ID_BYTES - pos)
            view[:n] = answer[pos : pos + n]
            pos += n
            if pos == ID_BYTES:
                break
        return _S_OK

    def _discard_or_zero(
        self, req_type: int, data_out: list[memoryview], storage: AsyncStorage | None = None
    ) -> int | Completion:
        feature = BlkFeature.DISCARD if req_type == _T_DISCARD else BlkFeature.WRITE_ZEROES
        if not self.negotiated(feature):
            return _S_UNSUPP
        # Count before copying: the payload is at most discard_segments * 16 bytes to copy.
        count, rest = divmod(sum(len(v) for v in data_out), DISCARD_SEGMENT.size)
        if rest or count == 0:
            return _S_IOERR
        if count > self.discard_segments:
            return _S_UNSUPP  # beyond the advertised max_*_seg, as QEMU answers
        payload = b"".join(data_out)
        segments = [
            DISCARD_SEGMENT.unpack_from(payload, i * DISCARD_SEGMENT.size) for i in range(count)
        ]
        allowed_flags = 0 if req_type == _T_DISCARD else WRITE_ZEROES_FLAG_UNMAP
        for sector, num_sectors, flags in segments:
            # §5.2.6.5: UNSUPP for unknown flags, and for unmap on a discard.
            if flags & ~allowed_flags:
                return _S_UNSUPP
            if num_sectors > MAX_DISCARD_SECTORS or self._range_bad(sector, num_sectors << 9):
                return _S_IOERR
        if storage is not None and len(segments) == 1 and segments[0][1]:
            sector, num_sectors, flags = segments[0]
            offset, length = sector << SECTOR_SHIFT, num_sectors << SECTOR_SHIFT
            if req_type == _T_DISCARD:
                return storage.start_discard(offset, length)
            return storage.start_write_zeroes(
                offset, length, unmap=bool(flags & WRITE_ZEROES_FLAG_UNMAP), dsync=self._dsync
            )
        for sector, num_sectors, flags in segments:
            if num_sectors == 0:
                continue  # nothing to do, and fallocate() refuses empty ranges
            offset, length = sector << SECTOR_SHIFT, num_sectors << SECTOR_SHIFT
            if req_type == _T_DISCARD:
                self.image.discard(offset, length)
            else:
                self.image.write_zeroes(
                    offset, length, unmap=bool(flags & WRITE_ZEROES_FLAG_UNMAP), dsync=self._dsync
                )
        return _S_OK
