"""What a virtio-net device needs from the network it is plugged into.

Frames cross a port with a virtio-net header in front (``spec.net.HEADER``, 12 bytes): the
same layout Linux's TAP devices use with IFF_VNET_HDR, so the device moves them without
rewriting. Every operation is non-blocking: a frame the network cannot take now is dropped,
as a NIC drops what its queue has no room for; nothing is queued without bound.
"""

from __future__ import annotations

from typing import Protocol


class NetPort(Protocol):
    #: The port takes frames with partial checksums (NEEDS_CSUM) from the guest...
    takes_partial_csum: bool
    #: ... and TCP segmentation offload (GSO) frames.
    takes_gso: bool

    def fileno(self) -> int:
        """A file descriptor that polls readable when a frame can be received."""

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool) -> None:
        """What the guest takes (its GUEST_CSUM, GUEST_TSO4, GUEST_TSO6): frames given to
        the device are within it."""

    def send(self, views: list[memoryview]) -> bool:
        """One frame, header first; False if it was dropped."""

    def receive_into(self, buffer: memoryview) -> int | None:
        """One frame, header first, into ``buffer``; its size, or None if there is none now."""

    def close(self) -> None: ...
