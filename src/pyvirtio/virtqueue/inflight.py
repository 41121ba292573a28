"""In-flight tracking for split virtqueues (QEMU docs/interop/vhost-user.rst, "Inflight I/O
tracking"), so that a back-end that crashes or restarts can resubmit what it had taken from the
ring but not yet returned.

The region of one queue lives in shared memory the front-end keeps across back-end restarts:

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];

A head is marked in flight when it is taken from the available ring (with a counter that keeps
the order), linked into the "last batch" list when its used element is written, and unmarked
once the used index that covers it is published; ``used_idx`` then records that index. After a
crash the used index in guest memory tells which of these steps happened.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<QHHHH")
HEADER_SIZE = HEADER.size  # 16
DESC_SIZE = 16
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
VERSION = 1
ALIGNMENT = 64


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (as libvhost-user sizes it, so fds are interchangeable)."""
    return -(-(DESC_SIZE * queue_size + 2) // ALIGNMENT) * ALIGNMENT


class InflightRegion:
    """One queue's in-flight tracking area."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < HEADER_SIZE + DESC_SIZE * queue_size:
            raise ValueError("in-flight region too small for the queue")
        self.view = view
        _, version, desc_num, _, _ = HEADER.unpack_from(view)
        used = HEADER_SIZE + DESC_SIZE * queue_size
        if version == 0:  # a fresh region: initialise it
            view[:used] = bytes(used)
            HEADER.pack_into(view, 0, 0, VERSION, queue_size, 0, 0)
        elif version != VERSION or desc_num != queue_size:
            raise ValueError(
                f"in-flight region version {version} for {desc_num} descriptors, "
                f"expected version {VERSION} for {queue_size}"
            )
        self.queue_size = queue_size
        self._flags = view[HEADER_SIZE:].cast("B")
        self.counter = 0
        self._batch: list[int] = []

    @property
    def used_idx(self) -> int:
        value: int = _U16.unpack_from(self.view, 14)[0]
        return value

    @property
    def last_batch_head(self) -> int:
        value: int = _U16.unpack_from(self.view, 12)[0]
        return value

    def is_inflight(self, head: int) -> bool:
        return bool(self._flags[head * DESC_SIZE])

    # -- normal operation ----------------------------------------------------------------------

    def begin(self, head: int) -> None:
        """``head`` was taken from the available ring."""
        base = HEADER_SIZE + head * DESC_SIZE
        _U64.pack_into(self.view, base + 8, self.counter)
        self.counter += 1
        self._flags[head * DESC_SIZE] = 1

    def used(self, head: int) -> None:
        """``head``'s used element was written (not yet published)."""
        _U16.pack_into(self.view, HEADER_SIZE + head * DESC_SIZE + 6, self.last_batch_head)
        _U16.pack_into(self.view, 12, head)
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """The used index covering the batch is visible to the driver."""
        flags = self._flags
        for head in self._batch:
            flags[head * DESC_SIZE] = 0
        self._batch.clear()
        _U16.pack_into(self.view, 14, used_idx)

    # -- after a restart -----------------------------------------------------------------------

    def recover(self, ring_used_idx: int) -> list[int]:
        """Heads to resubmit, oldest first, given the used index found in guest memory."""
        done = (ring_used_idx - self.used_idx) & 0xFFFF
        head = self.last_batch_head
        for _ in range(min(done, self.queue_size)):
            if head >= self.queue_size:
                break
            self._flags[head * DESC_SIZE] = 0
            head = _U16.unpack_from(self.view, HEADER_SIZE + head * DESC_SIZE + 6)[0]
        _U16.pack_into(self.view, 14, ring_used_idx)
        pending = [h for h in range(self.queue_size) if self._flags[h * DESC_SIZE]]
        pending.sort(key=lambda h: _U64.unpack_from(self.view, HEADER_SIZE + h * DESC_SIZE + 8)[0])
        if pending:
            last = _U64.unpack_from(self.view, HEADER_SIZE + pending[-1] * DESC_SIZE + 8)[0]
            self.counter = last + 1
        return pending

    @classmethod
    def attach(cls, view: memoryview) -> InflightRegion:
        """A region in an area of any origin: its header says how many descriptors it tracks;
        a fresh (zero) region gets as many as fit, rounded down to a power of two."""
        _, version, desc_num, _, _ = HEADER.unpack_from(view)
        if version == 0:
            fit = (len(view) - HEADER_SIZE) // DESC_SIZE
            desc_num = 1 << (fit.bit_length() - 1) if fit > 0 else 0
        if not 0 < desc_num <= 32768:
            raise ValueError(f"in-flight region for {desc_num} descriptors")
        return cls(view, desc_num)

    def release(self) -> None:
        self._flags.release()
        self.view.release()
