"""The dirty page log of live migration: which guest pages the device wrote.

A VMM that migrates a guest copies its memory while the guest runs, then copies again what was
written meanwhile. It sees the vCPUs' writes itself; the device's writes it learns from this
log, a bitmap it shares with the back-end (vhost-user SET_LOG_BASE, the kernel's vhost
``VHOST_SET_LOG_BASE``): bit ``n`` stands for the guest-physical page ``[n * 4096,
(n + 1) * 4096)``, bit 0 of each byte first. The back-end sets bits, the VMM collects and clears
them.

A bit is set after the write it stands for: the VMM may collect the page between the two, and a
bit set before the write would then be cleared with the old contents sent. The VMM collects
with atomic exchanges while queues set bits, so a byte where only some bits are set is set with
an atomic OR (as libvhost-user does); whole bytes are plain stores of 0xff, which lose nothing.
"""

from __future__ import annotations

from pyvirtio.memory.atomic import address_of, fetch_or_u8

#: Bytes of guest memory per bit (vhost's VHOST_LOG_PAGE).
LOG_PAGE = 0x1000
_PAGE_SHIFT = 12


class DirtyLog:
    """Sets the bits of a shared bitmap for guest-physical ranges the device wrote."""

    def __init__(self, bitmap: memoryview) -> None:
        if bitmap.readonly or bitmap.format != "B" or bitmap.ndim != 1:
            raise ValueError("the dirty log must be a writable byte view")
        self._bitmap = bitmap
        self._address = address_of(bitmap)
        self.pages = len(bitmap) * 8

    def mark(self, addr: int, length: int) -> None:
        """Guest-physical ``[addr, addr + length)`` was written."""
        if length <= 0 or not self.pages:
            return
        first = addr >> _PAGE_SHIFT
        last = (addr + length - 1) >> _PAGE_SHIFT
        if last >= self.pages:
            # The VMM sized the log for all of its memory: nothing the device can write lies
            # beyond it (a buffer there did not map, and the device did not write it).
            if first >= self.pages:
                return
            last = self.pages - 1
        low, high = first >> 3, last >> 3
        first_bits = (0xFF << (first & 7)) & 0xFF
        last_bits = 0xFF >> (7 - (last & 7))
        if low == high:
            fetch_or_u8(self._address + low, first_bits & last_bits)
            return
        fetch_or_u8(self._address + low, first_bits)
        if high > low + 1:
            self._bitmap[low + 1 : high] = b"\xff" * (high - low - 1)
        fetch_or_u8(self._address + high, last_bits)

    def release(self) -> None:
        """Drop the view of the bitmap; nothing may be marked after this."""
        self.pages = 0
        self._bitmap.release()
