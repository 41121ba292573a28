"""The device side of a split virtqueue (VIRTIO 1.2 §2.7).

A :class:`SplitQueue` is configured by a transport (size and the three area addresses), activated
on guest memory, and then :meth:`SplitQueue.pop` hands out :class:`DescriptorChain` objects and
:meth:`SplitQueue.push` / :meth:`SplitQueue.publish` return them through the used ring.

Everything read from the rings is untrusted. Chains are walked from a snapshot of each descriptor,
bounded by the queue size, and checked against §2.7.5.3 and §2.7.4. Breaking those rules makes
:meth:`pop` raise :class:`VirtqueueError`, after which the device must be reset. Buffers that are
well formed but point outside guest memory do not raise: the chain carries a ``fault`` and the
device completes it with an error of its own kind.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass, field

from pyvirtio.memory.barrier import acquire_fence, full_fence, release_fence
from pyvirtio.memory.dirty_log import DirtyLog
from pyvirtio.memory.guest import GuestMemory, GuestMemoryError, Transient
from pyvirtio.spec import ring
from pyvirtio.spec.ring import DESC, DESC_SIZE, DescFlag
from pyvirtio.virtqueue.inflight import InflightRegion

log = logging.getLogger(__name__)

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_U32_MAX = 0xFFFFFFFF
_EMPTY = memoryview(b"")


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the device needs a reset (§2.1.2)."""


@dataclass(slots=True)
class DescriptorChain:
    """One available buffer: the descriptors of a chain, mapped into host views.

    ``readable`` and ``writable`` are the device-readable and device-writable parts in chain
    order; ``read_len`` and ``write_len`` their sizes in bytes. ``descriptors`` keeps the raw
    (addr, len, flags) triples, indirect tables flattened. If mapping a buffer failed, ``fault``
    says why and the views are incomplete (the lengths still count every descriptor).
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0
    descriptors: list[tuple[int, int, int]] = field(default_factory=list)
    fault: str | None = None
    #: Mappings made for this chain alone (Xen grants), closed when it completes.
    held: list[Transient] = field(default_factory=list)

    def take_readable(self, size: int) -> tuple[bytes, list[memoryview]] | None:
        """The first ``size`` bytes of the readable part (a header), copied, and views of the
        rest; None if the readable part is shorter. Only ``size`` bytes are copied, however
        the driver split them across descriptors."""
        readable = self.readable
        if not readable or sum(len(v) for v in readable) < size:
            return None
        first = readable[0]
        if len(first) >= size:
            rest = readable[1:]
            if len(first) > size:
                rest.insert(0, first[size:])
            return bytes(first[:size]), rest
        head = bytearray()
        for i, view in enumerate(readable):
            need = size - len(head)
            if len(view) >= need:
                head += view[:need]
                rest = readable[i + 1 :]
                if len(view) > need:
                    rest.insert(0, view[need:])
                return bytes(head), rest
            head += view
        return None

    def release(self) -> bool:
        """Drop the views and close the chain's own mappings; False if one could not close
        (a view into it is still referenced somewhere)."""
        for view in self.readable:
            view.release()
        for view in self.writable:
            view.release()
        ok = True
        for mapping in self.held:
            ok = mapping.close() and ok
        self.held.clear()
        return ok


@dataclass(frozen=True, slots=True)
class QueueLayout:
    """Where the driver put a queue: its size and the guest addresses of its three areas."""

    size: int
    desc: int
    avail: int
    used: int


class SplitQueue:
    """One virtqueue, device side."""

    def __init__(self, index: int, max_size: int) -> None:
        if not 0 < max_size <= ring.MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.index = index
        self.max_size = max_size
        #: In-flight tracking (vhost-user INFLIGHT_SHMFD); attached by the shim, kept on reset.
        self.inflight: InflightRegion | None = None
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset (§2.7: all fields zero, size = max)."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        #: The driver made the queue ready (QueueReady, or a started vhost-user ring).
        self.ready = False
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self._signalled_used = 0
        self._shadow_avail_idx = 0
        self._memory: GuestMemory | None = None
        self._flat: list[tuple[int, int, memoryview]] = []
        self._flat_starts: list[int] = []  # the regions' first addresses, for bisection
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None  # le16 view: flags, idx, ring[size], used_event
        self._used16: memoryview | None = None  # le16 view: flags, idx, ..., avail_event
        self._used32: memoryview | None = None  # le32 view: flags|idx, (id, len) * size, ...
        self._resubmit: list[int] = []
        self._dirty_log: DirtyLog | None = None

    def configure(self, layout: QueueLayout) -> None:
        """Size and ring addresses, from the driver; raises VirtqueueError for a size the
        queue cannot take. Alignment is checked when the rings are mapped."""
        if self.active:
            raise VirtqueueError(f"queue {self.index}: reconfigured while running")
        size = layout.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise VirtqueueError(
                f"queue {self.index}: size {size} is not a power of two up to {self.max_size}"
            )
        self.size = size
        self.desc_addr = layout.desc
        self.avail_addr = layout.avail
        self.used_addr = layout.used

    def attach_inflight(self, region: InflightRegion | None) -> None:
        """In-flight tracking (vhost-user INFLIGHT_SHMFD) for a queue that is not running;
        the previous region, if any, is released."""
        if self.active:
            raise VirtqueueError(f"queue {self.index}: in-flight area changed while running")
        if self.inflight is not None:
            self.inflight.release()
        self.inflight = region

    @property
    def active(self) -> bool:
        return self._memory is not None

    def activate(
        self,
        memory: GuestMemory,
        *,
        event_idx: bool,
        indirect: bool,
        last_avail_idx: int = 0,
        used_idx: int | None = 0,
        dirty_log: DirtyLog | None = None,
    ) -> None:
        """Map the rings and start using them; raises VirtqueueError for a bad layout.

        ``last_avail_idx`` lets vhost-user's SET_VRING_BASE resume a ring; ``used_idx=None``
        resumes the used ring where guest memory says it is (a ring that ran before). With a
        ``dirty_log`` (live migration), every write to the used ring is logged, and
        :meth:`log_write` logs the device's writes to buffers.
        """
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue {self.index}: bad size {size}")
        if self.inflight is not None and self.inflight.queue_size < size:
            raise VirtqueueError(
                f"queue {self.index}: size {size}, in-flight area for {self.inflight.queue_size}"
            )
        for name, addr, align in (
            ("descriptor table", self.desc_addr, ring.DESC_ALIGN),
            ("available ring", self.avail_addr, ring.AVAIL_ALIGN),
            ("used ring", self.used_addr, ring.USED_ALIGN),
        ):
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x} is misaligned")
        try:
            self._desc = memory.ring(self.desc_addr, ring.desc_table_size(size))
            avail = memory.ring(self.avail_addr, ring.avail_ring_size(size))
            used = memory.ring(self.used_addr, ring.used_ring_size(size))
        except GuestMemoryError as exc:
            raise VirtqueueError(f"queue {self.index}: {exc}") from None
        self._avail = avail.cast("H")
        self._used16 = used.cast("H")
        self._used32 = used[: 4 + ring.USED_ELEM_SIZE * size].cast("I")
        self._memory = memory
        self._flat = sorted(memory.direct_regions(), key=lambda region: region[0])
        self._flat_starts = [start for start, _, _ in self._flat]
        self._dirty_log = dirty_log
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self._shadow_avail_idx = self.last_avail_idx
        self.used_idx = self._used16[1] if used_idx is None else used_idx & 0xFFFF
        self._signalled_used = self.used_idx
        if self.inflight is not None:
            # Resubmit what a previous back-end took but never returned; everything between
            # the used index and those heads was completed (vhost-user "When reconnecting").
            self._resubmit = self.inflight.recover(self.used_idx)
            self.last_avail_idx = (self.used_idx + len(self._resubmit)) & 0xFFFF
            self._shadow_avail_idx = self.last_avail_idx
            if self._resubmit:
                log.warning(
                    "queue %d: resubmitting %d requests left in flight by a previous back-end",
                    self.index,
                    len(self._resubmit),
                )

    def deactivate(self) -> None:
        """Stop using the rings (vhost-user GET_VRING_BASE); the configuration is kept."""
        for view in (self._avail, self._used16, self._used32, self._desc):
            if view is not None:
                view.release()
        self._avail = self._used16 = self._used32 = self._desc = None
        self._memory = None
        self._flat = []
        self._flat_starts = []
        self._dirty_log = None

    # -- available ring ------------------------------------------------------------------------

    def avail_idx(self) -> int:
        """The driver's avail->idx, read with acquire ordering (§2.7.13.3), and checked: a
        driver never has more than the queue size buffers outstanding."""
        assert self._avail is not None
        idx: int = self._avail[1]
        acquire_fence()
        if (idx - self.last_avail_idx) & 0xFFFF > self.size:
            raise VirtqueueError(
                f"queue {self.index}: avail idx {idx} is more than {self.size} ahead of "
                f"{self.last_avail_idx}"
            )
        return idx

    def ring_indices(self) -> dict[str, int | None]:
        """The indices both sides last wrote, for the report on a stalled queue: the driver's
        avail->idx and used_event, the device's used->idx as published and as last signalled,
        and last_avail_idx. Only reads; the driver's are None while the rings are not mapped."""
        avail, used16 = self._avail, self._used16
        driver: list[int | None] = [None, None]
        published = None
        try:
            if avail is not None and used16 is not None:
                driver = [avail[1], avail[2 + self.size]]
                published = used16[1]
        except (ValueError, IndexError):  # unmapped meanwhile by the queue's worker
            driver, published = [None, None], None
        return {
            "avail_idx": driver[0],
            "used_event": driver[1],
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
            "published_used_idx": published,
            "signalled_used_idx": self._signalled_used,
        }

    def has_available(self) -> bool:
        if self._resubmit or self._shadow_avail_idx != self.last_avail_idx:
            return True
        self._shadow_avail_idx = self.avail_idx()
        return self._shadow_avail_idx != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; raises VirtqueueError on a rule violation."""
        avail = self._avail
        if avail is None:
            return None
        if self._resubmit:
            return self._walk(self._resubmit.pop(0))
        last = self.last_avail_idx
        if self._shadow_avail_idx == last:
            self._shadow_avail_idx = self.avail_idx()
            if self._shadow_avail_idx == last:
                return None
        head = avail[2 + (last & (self.size - 1))]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if self.inflight is not None and head < self.size:
            self.inflight.begin(head)
        return self._walk(head)

    def unpop(self, chains: list[DescriptorChain]) -> None:
        """Give back the chains just popped (the last ones, in pop order): the device cannot use
        them yet (a packet needs more buffers than the driver has given). They are popped again
        later; their views are released now."""
        if self.inflight is not None:
            raise VirtqueueError(f"queue {self.index}: chains given back under in-flight tracking")
        for chain in reversed(chains):
            chain.release()
            self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: head index {head} >= queue size {size}")
        table = self._desc
        memory = self._memory
        assert table is not None and memory is not None
        flat = self._flat
        starts = self._flat_starts
        chain = DescriptorChain(head)
        descriptors = chain.descriptors
        readable = chain.readable
        writable = chain.writable
        read_len = write_len = 0
        mapped = 0  # bytes mapped on demand (outside ``flat``), bounded by the memory
        budget = memory.max_mapped_per_request
        i = head
        limit = size  # §2.7.5.3.1: a chain is no longer than the queue (or its indirect table)
        in_indirect = False
        seen_write = False
        unpack = DESC.unpack_from
        while True:
            if limit == 0:
                raise VirtqueueError(
                    f"queue {self.index}: chain from head {head} loops or is too long"
                )
            limit -= 1
            addr, length, flags, nxt = unpack(table, i * DESC_SIZE)
            if flags & _INDIRECT:
                table = self._indirect_table(addr, length, flags, in_indirect, chain)
                size = limit = len(table) // DESC_SIZE
                in_indirect = True
                i = 0
                continue
            descriptors.append((addr, length, flags))
            if flags & _WRITE:
                seen_write = True
                write_len += length
            elif seen_write:
                raise VirtqueueError(
                    f"queue {self.index}: readable descriptor after a writable one"
                )
            else:
                read_len += length
            if read_len + write_len > _U32_MAX:
                raise VirtqueueError(f"queue {self.index}: chain from head {head} exceeds 4 GiB")
            if length:
                # Fast path: the buffer lies in a directly mapped region (the usual case; a
                # Xen guest's RAM mapped statically is a hundred regions or more).
                j = bisect_right(starts, addr) - 1
                start, end, view = flat[j] if j >= 0 else (0, 0, _EMPTY)
                if addr + length <= end:
                    buf = view[addr - start : addr - start + length]
                    if flags & _WRITE:
                        writable.append(buf)
                    else:
                        readable.append(buf.toreadonly())
                else:
                    mapped += length
                    if chain.fault is not None:
                        pass  # map nothing more for a request that fails anyway
                    elif mapped > budget:
                        chain.fault = (
                            f"request maps more than {budget} bytes (the guest memory's bound)"
                        )
                    else:
                        try:
                            views = memory.buffers(addr, length, bool(flags & _WRITE), chain.held)
                        except GuestMemoryError as exc:
                            chain.fault = str(exc)
                        else:
                            (writable if flags & _WRITE else readable).extend(views)
            if not flags & _NEXT:
                break
            if nxt >= size:
                raise VirtqueueError(f"queue {self.index}: next index {nxt} out of range {size}")
            i = nxt
        if chain.fault is None:
            try:
                memory.settle(chain.held)
            except GuestMemoryError as exc:
                chain.fault = str(exc)
        chain.read_len = read_len
        chain.write_len = write_len
        return chain

    def _indirect_table(
        self, addr: int, length: int, flags: int, nested: bool, chain: DescriptorChain
    ) -> memoryview:
        """The indirect table a descriptor points to, after §2.7.5.3's checks."""
        if nested:
            raise VirtqueueError(
                f"queue {self.index}: indirect descriptor inside an indirect table"
            )
        if not self.indirect:
            raise VirtqueueError(f"queue {self.index}: INDIRECT_DESC was not negotiated")
        if flags & _NEXT:
            raise VirtqueueError(f"queue {self.index}: descriptor has both INDIRECT and NEXT")
        if length == 0 or length % DESC_SIZE:
            raise VirtqueueError(
                f"queue {self.index}: indirect table length {length} is not k * 16"
            )
        # Tables may hold seg_max + 2 entries, and seg_max derives from the largest queue.
        if length // DESC_SIZE > self.max_size:
            raise VirtqueueError(
                f"queue {self.index}: indirect table of {length // DESC_SIZE} entries"
            )
        assert self._memory is not None
        try:
            views = self._memory.buffers(addr, length, False, chain.held)
            self._memory.settle(chain.held)  # the walk reads the table now
        except GuestMemoryError as exc:
            raise VirtqueueError(f"queue {self.index}: indirect table: {exc}") from None
        # Each entry is read once (unpack_from copies it), so a racing guest cannot make the
        # walk see two versions of one descriptor.
        return views[0] if len(views) == 1 else memoryview(b"".join(views))

    # -- used ring -----------------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Put a used element in the ring; the driver sees it after :meth:`publish`."""
        used32 = self._used32
        assert used32 is not None
        slot = 1 + 2 * (self.used_idx & (self.size - 1))
        used32[slot] = head
        used32[slot + 1] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.inflight is not None:
            self.inflight.used(head)

    def publish(self) -> bool:
        """Make pushed elements visible and say whether the driver wants an interrupt.

        §2.7.13.3: the used elements must be visible before used->idx; §2.7.7.2: with EVENT_IDX
        the device reads used_event after publishing used->idx (a store-load order: full fence).
        """
        used16 = self._used16
        avail = self._avail
        assert used16 is not None and avail is not None
        new = self.used_idx
        old = self._signalled_used
        if new == old:
            return False
        release_fence()
        used16[1] = new
        if self.inflight is not None:
            self.inflight.published(new)
        full_fence()
        self._signalled_used = new
        if self._dirty_log is not None:
            self._log_used_ring()
        if self.event_idx:
            return ring.need_event(avail[2 + self.size], new, old)
        return not avail[0] & ring.AvailFlag.NO_INTERRUPT

    # -- live migration ------------------------------------------------------------------------

    @property
    def logging(self) -> bool:
        """Whether the device's writes to guest memory are logged (live migration)."""
        return self._dirty_log is not None

    def log_write(self, addr: int, length: int) -> None:
        """The device wrote guest-physical ``[addr, addr + length)`` for this queue: log it if
        the queue logs (call after the write, before the buffer is pushed)."""
        if self._dirty_log is not None:
            self._dirty_log.mark(addr, length)

    def _log_used_ring(self) -> None:
        assert self._dirty_log is not None
        self._dirty_log.mark(self.used_addr, ring.used_ring_size(self.size))

    # -- driver notifications (kicks) ----------------------------------------------------------

    def disable_notifications(self) -> None:
        """Tell the driver it need not kick while the device is draining the ring (§2.7.10)."""
        if not self.event_idx:
            used16 = self._used16
            assert used16 is not None
            used16[0] = ring.UsedFlag.NO_NOTIFY
            if self._dirty_log is not None:
                self._log_used_ring()

    def enable_notifications(self, *, new_only: bool = False) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (drain again).

        ``new_only``: the device leaves buffers it has seen in the ring (too few for what it
        has to put in them); it wants a kick, and True, only for buffers added after them.
        """
        used16 = self._used16
        assert used16 is not None
        seen = self._shadow_avail_idx
        if self.event_idx:
            used16[2 + 4 * self.size] = seen if new_only else self.last_avail_idx
        else:
            used16[0] = 0
        if self._dirty_log is not None:
            self._log_used_ring()
        full_fence()
        if new_only:
            return self.avail_idx() != seen
        return self.has_available()
