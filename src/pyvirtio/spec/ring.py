"""Split virtqueue layout (VIRTIO 1.2 §2.7).

Descriptor table: ``struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }``.
Available ring: ``le16 flags; le16 idx; le16 ring[size]; le16 used_event``.
Used ring: ``le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event``.
"""

import struct
from enum import IntFlag

DESC_SIZE = 16
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = 8

#: Largest queue size a split ring may have (§2.7: "Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768

#: Alignment requirements (§2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


class DescFlag(IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlag(IntFlag):
    NO_INTERRUPT = 1


class UsedFlag(IntFlag):
    NO_NOTIFY = 1


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring including ``used_event``."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of the used ring including ``avail_event``."""
    return 6 + USED_ELEM_SIZE * size


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.7.2 / §2.7.10: does moving from ``old_idx`` to ``new_idx`` cross ``event_idx``?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def legacy_layout(size: int, align: int) -> tuple[int, int, int]:
    """Offsets of (desc, avail, used) in a legacy contiguous ring (§2.7.2 "Legacy Interfaces")."""
    avail = desc_table_size(size)
    used = (avail + avail_ring_size(size) + align - 1) // align * align
    return 0, avail, used


def legacy_ring_bytes(size: int, align: int) -> int:
    _, _, used = legacy_layout(size, align)
    return used + used_ring_size(size)
