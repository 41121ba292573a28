"""Readiness for systemd (``Type=notify`` units): ``READY=1`` on ``$NOTIFY_SOCKET``, the
sd_notify(3) protocol, without libsystemd."""

from __future__ import annotations

import contextlib
import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
        return True
    return False
