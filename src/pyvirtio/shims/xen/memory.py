"""Guest memory on Xen: foreign mappings of a guest's RAM, cached in buckets.

The backend reaches the guest's memory by asking Xen to map the guest's frames into its own
address space (privileged foreign mapping). Two strategies, as the talk describes:

- **dynamic** (default): guest-physical memory is mapped on demand in buckets of
  ``BUCKET_PAGES`` pages and kept in a bounded LRU cache, so the hot path does no map/unmap per
  descriptor and dom0 spends at most ``max_pages`` pages of its own address space and memory on
  foreign mappings (cf. XSA-300). A bucket still referenced by a request is never evicted: its
  ``mmap`` refuses to close while views exist. When requests in flight hold every bucket, a
  request maps exactly the pages of its buffers for itself, unmapped when it completes; and one
  request may map at most half the cache's worth of bytes (``max_mapped_per_request``), so that
  no chain, however its descriptors alias or scatter, can make dom0 map more than that.
- **static**: every RAM bank of the guest is mapped once at start. Banks are found by asking
  Xen, not guessed: the guest's RAM windows (``GUEST_RAM0``/``GUEST_RAM1`` on Arm) are mapped
  bucket by bucket and the frames Xen refuses mark where RAM ends.

Either way a page that Xen refused to map is never touched (it would raise SIGBUS): ranges that
include one are outside guest memory as far as devices are concerned.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable

from pyvirtio.guest_log import GuestErrorLog
from pyvirtio.memory.guest import GuestMemory, GuestMemoryError, Transient
from pyvirtio.shims.xen.gntdev import (
    GRANT_DMA_ADDR_OFF,
    CopySegment,
    Gntdev,
    GrantMapping,
    split_grant_address,
)
from pyvirtio.shims.xen.privcmd import PAGE_SHIFT, PAGE_SIZE, ForeignMapping, Privcmd

log = logging.getLogger(__name__)
_guest_errors = GuestErrorLog(log)

BUCKET_SHIFT = 21  # 2 MiB
BUCKET_SIZE = 1 << BUCKET_SHIFT
BUCKET_PAGES = BUCKET_SIZE >> PAGE_SHIFT

#: Arm guest RAM windows (xen/include/public/arch-arm.h: GUEST_RAM0, GUEST_RAM1).
#: Most pages one buffer may span when it is made of grants (a 2 MiB buffer).
MAX_GRANT_PAGES = 512

ARM_GUEST_RAM_WINDOWS = ((0x4000_0000, 0xC000_0000), (0x2_0000_0000, 0xFE_0000_0000))


class ForeignGuestMemory(GuestMemory):
    """A guest's RAM reached through foreign mappings."""

    def __init__(
        self,
        privcmd: Privcmd,
        domid: int,
        *,
        max_pages: int = 32768,
        static: bool = False,
        ram_windows: Iterable[tuple[int, int]] = (),
        gntdev: Gntdev | None = None,
    ) -> None:
        super().__init__()
        self.privcmd = privcmd
        self.gntdev = gntdev
        self.grants_seen = False
        self.grant_maps = 0  # rings
        self.grant_copies = 0  # calls that copied a request's buffers in
        self.domid = domid
        self.static = static
        self.max_buckets = max(4, max_pages // BUCKET_PAGES)
        self.max_mapped_per_request = self.max_buckets // 2 * BUCKET_SIZE
        self._buckets: OrderedDict[int, ForeignMapping] = OrderedDict()
        self._retired: list[ForeignMapping | GrantMapping] = []
        self._lock = threading.Lock()
        self.maps = 0  # map operations, for statistics and tests
        self.evictions = 0
        self.peak_buckets = 0
        self.page_maps = 0  # page-exact mappings for requests that found the cache full
        self._warned_full = False
        if static:
            self._map_all(ram_windows or ARM_GUEST_RAM_WINDOWS)

    # -- mapping -------------------------------------------------------------------------------

    def _map_bucket(self, index: int) -> ForeignMapping:
        mapping = self.privcmd.map(self.domid, index * BUCKET_PAGES, BUCKET_PAGES)
        self.maps += 1
        return mapping

    def _map_all(self, windows: Iterable[tuple[int, int]]) -> None:
        """Map every populated bucket of the RAM windows, up to the first empty bucket of each
        (a bucket with holes, e.g. pages the guest gave back, is kept: its holes are refused
        per page)."""
        total = 0
        for base, size in windows:
            for index in range(base >> BUCKET_SHIFT, (base + size) >> BUCKET_SHIFT):
                mapping = self._map_bucket(index)
                if len(mapping.bad) == BUCKET_PAGES:
                    mapping.close()
                    break
                self._buckets[index] = mapping
                total += BUCKET_PAGES - len(mapping.bad)
        if not total:
            raise GuestMemoryError(0, 0, f"dom{self.domid} has no RAM that can be mapped")
        log.info(
            "dom%d: statically mapped %d MiB of guest RAM in %d buckets",
            self.domid,
            total >> (20 - PAGE_SHIFT),
            len(self._buckets),
        )

    def _bucket(self, index: int) -> ForeignMapping | None:
        """The cached mapping of bucket ``index``; None when requests in flight hold every
        bucket of a full cache (the caller maps what it needs for itself)."""
        with self._lock:
            mapping = self._buckets.get(index)
            if mapping is not None:
                if not self.static:
                    self._buckets.move_to_end(index)
                return mapping
            if self.static:
                raise KeyError(index)
            if len(self._buckets) >= self.max_buckets and not self._evict():
                return None
            mapping = self._map_bucket(index)
            self._buckets[index] = mapping
            self.peak_buckets = max(self.peak_buckets, len(self._buckets))
            return mapping

    def _evict(self) -> bool:
        """Unmap least recently used buckets that no request holds, down below the bound;
        False if requests in flight hold all of them."""
        self._sweep_retired()
        for index in list(self._buckets):
            if len(self._buckets) < self.max_buckets:
                break
            if self._buckets[index].close():
                del self._buckets[index]
                self.evictions += 1
        if len(self._buckets) < self.max_buckets:
            return True
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "dom%d: requests in flight hold all %d map cache buckets; requests map their "
                "own pages meanwhile (raise --map-cache-pages)",
                self.domid,
                len(self._buckets),
            )
        return False

    def _sweep_retired(self) -> None:
        self._retired = [m for m in self._retired if not m.close()]

    def invalidate(self) -> None:
        """IOREQ_TYPE_INVALIDATE: the guest's memory map changed; drop every cached mapping.
        A static mapping is not made again: the daemon falls back to dynamic mapping. (A
        version that mapped all the RAM again while the guest waited for the INVALIDATE was
        followed by a lockup of the rig's one-vCPU dom0 in tests/xen/test_mapping.py; it is not
        used until that is understood.)"""
        with self._lock:
            if self.static:
                log.warning("dom%d: memory map changed under a static mapping", self.domid)
            for mapping in self._buckets.values():
                if not mapping.close():
                    self._retired.append(mapping)
            self._buckets.clear()
            self._sweep_retired()
            static, self.static = self.static, False
        if static:
            log.warning("dom%d: falling back to dynamic mapping", self.domid)

    def close(self) -> None:
        log.info(
            "dom%d: map cache: %d maps, %d evictions, at most %d pages mapped (bound %d); "
            "%d page maps for requests that found it full; %d grant maps (rings), "
            "%d grant copy calls (requests)",
            self.domid,
            self.maps,
            self.evictions,
            self.peak_buckets * BUCKET_PAGES,
            self.max_buckets * BUCKET_PAGES,
            self.page_maps,
            self.grant_maps,
            self.gntdev.copies if self.gntdev else 0,
        )
        with self._lock:
            for mapping in self._buckets.values():
                if not mapping.close():
                    self._retired.append(mapping)
            self._buckets.clear()
            self._sweep_retired()
            if self._retired:
                log.warning(
                    "dom%d: %d mappings still referenced at close", self.domid, len(self._retired)
                )

    @property
    def mapped_pages(self) -> int:
        return len(self._buckets) * BUCKET_PAGES

    # -- GuestMemory ---------------------------------------------------------------------------

    def _view(self, addr: int, length: int, hold: list[Transient] | None) -> memoryview:
        """A view of [addr, addr+length), which lies inside one bucket."""
        index = addr >> BUCKET_SHIFT
        try:
            mapping = self._bucket(index)
        except (KeyError, OSError):
            raise GuestMemoryError(addr, length) from None
        if mapping is None:
            view, pages = self._pages(addr, length)
            self.page_maps += 1
            if hold is not None:
                hold.append(pages)
            else:
                with self._lock:
                    self._retired.append(pages)
            return view
        offset = addr & (BUCKET_SIZE - 1)
        if mapping.bad:
            first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
            refused = [page for page in mapping.bad if first <= page <= last]
            if refused:
                raise GuestMemoryError(addr, length, _refusal(mapping, refused[0]))
        return mapping.view[offset : offset + length]

    def direct_regions(self) -> list[tuple[int, int, memoryview]]:
        if not self.static:
            return []
        return [
            (index << BUCKET_SHIFT, (index + 1) << BUCKET_SHIFT, m.view)
            for index, m in self._buckets.items()
            if not m.bad
        ]

    def buffers(
        self, addr: int, length: int, writable: bool, hold: list[Transient] | None = None
    ) -> list[memoryview]:
        if addr & GRANT_DMA_ADDR_OFF:
            return [self._grant_view(addr, length, writable, hold)]
        if addr < 0 or addr + length > 1 << 52:
            raise GuestMemoryError(addr, length)
        out = []
        while length > 0:
            n = min(length, BUCKET_SIZE - (addr & (BUCKET_SIZE - 1)))
            view = self._view(addr, n, hold)
            out.append(view if writable else view.toreadonly())
            addr += n
            length -= n
        return out

    def ring(self, addr: int, length: int) -> memoryview:
        """Rings get mappings of their own pages, outside the cache (they live as long as the
        queue runs and would otherwise hold a whole bucket each)."""
        if length <= 0 or addr < 0:
            raise GuestMemoryError(addr, length)
        if addr & GRANT_DMA_ADDR_OFF:
            return self._grant_view(addr, length, True, None)
        if self.static and (addr & (BUCKET_SIZE - 1)) + length <= BUCKET_SIZE:
            return self._view(addr, length, None)
        view, mapping = self._pages(addr, length)
        with self._lock:
            self._retired.append(mapping)  # unmapped once the queue lets go of the view
        return view

    def _pages(self, addr: int, length: int) -> tuple[memoryview, ForeignMapping]:
        """A mapping of exactly the pages of [addr, addr+length), and the view of the range."""
        first, last = addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT
        try:
            mapping = self.privcmd.map(self.domid, first, last - first + 1)
        except OSError:
            raise GuestMemoryError(addr, length) from None
        if mapping.bad:
            reason = _refusal(mapping, min(mapping.bad))
            mapping.close()
            raise GuestMemoryError(addr, length, reason)
        offset = addr - (first << PAGE_SHIFT)
        return mapping.view[offset : offset + length], mapping

    def _grant_view(
        self, addr: int, length: int, writable: bool, hold: list[Transient] | None
    ) -> memoryview:
        """The buffer behind a grant DMA address (consecutive references, one per page).

        A ring (no ``hold``) is mapped, and unmapped once the queue lets go of the view. A
        request's buffers are copied instead of mapped (IOCTL_GNTDEV_GRANT_COPY, where a
        mapping costs a map and an unmap call with their hypercalls and TLB flush, per
        descriptor), one call for all those of a request in each direction: those the device
        reads are copied in by :meth:`settle`, once the chain's walk has given them all out (a
        :class:`_CopyIn` in ``hold``); those it writes are copied out when it completes (a
        :class:`_CopyBack`). A grant the guest did not give, or gave read-only for a buffer
        the device writes, fails the copy: in, a GuestMemoryError from :meth:`settle`; out,
        the request's data and status never reach the guest (its own request), and the
        daemon logs it.
        """
        if self.gntdev is None:
            raise GuestMemoryError(addr, length, "is a grant address, and grants are not mapped")
        gref, offset = split_grant_address(addr)
        count = (offset + length + PAGE_SIZE - 1) >> PAGE_SHIFT
        if length <= 0 or count > MAX_GRANT_PAGES or gref + count > 1 << 32:
            raise GuestMemoryError(addr, length, "is not a grant range pyvirtio maps")
        if not self.grants_seen:
            self.grants_seen = True
            log.info("dom%d: the guest uses grants (first reference %d)", self.domid, gref)
        if hold is not None:
            return self._grant_copy(addr, length, writable, hold)
        try:
            mapping = self.gntdev.map(self.domid, gref, count, writable)
        except OSError as exc:
            raise GuestMemoryError(addr, length, f"grant {gref}: {exc.strerror}") from None
        self.grant_maps += 1
        view = mapping.view[offset : offset + length]
        with self._lock:
            self._retired.append(mapping)
        return view if writable else view.toreadonly()

    def _grant_copy(
        self, addr: int, length: int, writable: bool, hold: list[Transient]
    ) -> memoryview:
        assert self.gntdev is not None
        bounce = bytearray(length)
        anchor = (ctypes.c_char * length).from_buffer(bounce)
        segments = _segments(ctypes.addressof(anchor), addr, length)
        del anchor
        kind = _CopyBack if writable else _CopyIn
        copies = next((t for t in hold if type(t) is kind), None)
        if copies is None:
            copies = kind(self.gntdev, self.domid)
            hold.append(copies)
        copies.add(bounce, segments)
        return memoryview(bounce) if writable else memoryview(bounce).toreadonly()

    def settle(self, hold: list[Transient]) -> None:
        """Copy in, in one call, the grant buffers of the request that the device reads."""
        for copies in hold:
            if type(copies) is _CopyIn and copies.segments:
                self.grant_copies += 1
                try:
                    copies.copy_in()
                except GuestMemoryError:
                    for out in hold:  # the request fails: none of its buffers is written
                        if isinstance(out, _CopyBack):
                            out.discard()
                    raise


def _segments(address: int, addr: int, length: int) -> list[CopySegment]:
    """The per-page copy segments of the grant range at grant DMA address ``addr``, against
    ``length`` bytes at ``address`` here."""
    gref, offset = split_grant_address(addr)
    out = []
    done = 0
    while done < length:
        n = min(PAGE_SIZE - offset, length - done)
        out.append(CopySegment(address + done, gref, offset, n))
        done += n
        gref += 1
        offset = 0
    return out


class _GrantCopies:
    """Bounce buffers of one request and the grant segments they stand for."""

    def __init__(self, gntdev: Gntdev, domid: int) -> None:
        self.gntdev = gntdev
        self.domid = domid
        self.buffers: list[bytearray] = []
        self.segments: list[CopySegment] = []

    def add(self, bounce: bytearray, segments: list[CopySegment]) -> None:
        self.buffers.append(bounce)  # keeps the addresses in ``segments`` valid
        self.segments.extend(segments)

    def discard(self) -> None:
        self.buffers = []
        self.segments = []

    def close(self) -> bool:
        self.discard()
        return True


class _CopyIn(_GrantCopies):
    """The device-readable grant buffers of one request: copied from the guest in one call
    once the request's chain is walked (:meth:`ForeignGuestMemory.settle`)."""

    def copy_in(self) -> None:
        segments, self.segments = self.segments, []
        try:
            statuses = self.gntdev.copy(self.domid, segments, to_guest=False)
        except OSError as exc:
            first = segments[0]
            raise GuestMemoryError(
                _grant_address(first), first.length, f"grant copy: {exc.strerror}"
            ) from None
        for seg, status in zip(segments, statuses, strict=True):
            if status:
                raise GuestMemoryError(
                    _grant_address(seg), seg.length, f"grant {seg.ref}: status {status}"
                )


def _grant_address(seg: CopySegment) -> int:
    return GRANT_DMA_ADDR_OFF | seg.ref << PAGE_SHIFT | seg.offset


class _CopyBack(_GrantCopies):
    """The device-writable grant buffers of one request: copied to the guest in one call when
    the request completes (``close``, before its used element is written)."""

    def close(self) -> bool:
        segments, self.segments = self.segments, []
        if segments:
            try:
                statuses = self.gntdev.copy(self.domid, segments, to_guest=True)
            except OSError as exc:
                _guest_errors.warning("dom%d: grant copy to the guest failed: %s", self.domid, exc)
            else:
                failed = [(s.ref, st) for s, st in zip(segments, statuses, strict=True) if st]
                if failed:
                    _guest_errors.warning(
                        "dom%d: grant %d refused the device's data (status %d); %d of %d pages "
                        "not written",
                        self.domid,
                        failed[0][0],
                        failed[0][1],
                        len(failed),
                        len(segments),
                    )
        self.buffers = []
        return True


def _refusal(mapping: ForeignMapping, page: int) -> str:
    """Why Xen did not map ``page`` of ``mapping``: not the guest's RAM, or not allowed (a
    domain that is not the guest's device model, an XSM policy without the foreign mapping)."""
    err = mapping.errors[page]
    if err in (errno.EPERM, errno.EACCES):
        return f"may not be mapped by this domain ({errno.errorcode[err]})"
    return "is not RAM of the guest"


__all__ = ["BUCKET_PAGES", "PAGE_SIZE", "ForeignGuestMemory"]
