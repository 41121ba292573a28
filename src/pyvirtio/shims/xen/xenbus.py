"""Xenbus states (xen/include/public/io/xenbus.h) and the back-end's part of the handshake.

libxl creates a virtio disk's back-end directory in state Initialising and waits (10 s) for
InitWait. A virtio guest has no xenbus front-end driver to move things on, so the back-end goes
to Connected itself once the guest's virtio driver sets DRIVER_OK, and answers the toolstack's
Closing (device removal) with Closed after it let go of the device.
"""

from __future__ import annotations

from enum import IntEnum


class XenbusState(IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


def parse_state(text: str | None) -> XenbusState:
    """A state read from xenstore; anything that is not a known number is UNKNOWN."""
    if text is None or not text.strip().isdigit():
        return XenbusState.UNKNOWN
    try:
        return XenbusState(int(text))
    except ValueError:
        return XenbusState.UNKNOWN
