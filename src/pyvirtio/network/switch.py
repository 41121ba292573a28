"""A learning L2 switch between virtio-net devices, with no host networking at all.

Every ``pyvirtio net --switch NAME`` is a port of switch NAME: a UNIX datagram socket in a
directory of the user's own (``$XDG_RUNTIME_DIR`` or the temporary directory, mode 0700), so
only that user's daemons join it. A frame goes to the port that last sent from its destination
MAC address, or to every port (broadcast, multicast, or a destination not seen yet). Frames
keep their virtio-net header, so a frame with a partial checksum (NEEDS_CSUM) stays one: the
receiving device completes the checksum if its guest cannot. Ports do not do segmentation:
a device on a switch does not offer TSO, and its guest segments.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
import tempfile
from collections import OrderedDict

from pyvirtio.spec.net import HEADER_SIZE

#: MAC addresses each port remembers.
MAX_LEARNED = 1024
_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ids = itertools.count()


class SwitchError(Exception):
    """The switch cannot be joined."""


def switch_directory(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise SwitchError(f"switch name {name!r}: 1 to 32 letters, digits, '-' or '_'")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"pyvirtio-switch-{name}")


class SwitchPort:
    takes_partial_csum = True
    takes_gso = False

    def __init__(self, name: str) -> None:
        self.directory = switch_directory(name)
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SwitchError(f"{self.directory}: {exc.strerror}") from None
        st = os.stat(self.directory)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SwitchError(f"{self.directory} is not a private directory of this user")
        self.path = os.path.join(self.directory, f"{os.getpid()}.{next(_ids)}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(self.path)
        self.learned: OrderedDict[bytes, str] = OrderedDict()
        self.dropped = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool) -> None:
        pass  # the device completes checksums for a guest without GUEST_CSUM

    def _ports(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [os.path.join(self.directory, n) for n in names if n != os.path.basename(self.path)]

    def send(self, views: list[memoryview]) -> bool:
        destination = bytes(_frame_bytes(views, HEADER_SIZE, 6))
        target = None if destination[:1] and destination[0] & 1 else self.learned.get(destination)
        delivered = False
        for path in [target] if target is not None else self._ports():
            try:
                self.sock.sendmsg(views, (), 0, path)
                delivered = True
            except (BlockingIOError, FileNotFoundError):
                self.dropped += 1  # that port is full, or gone
            except OSError as exc:
                if exc.errno != errno.ECONNREFUSED:
                    raise
                with contextlib.suppress(OSError):
                    os.unlink(path)  # nobody is bound there any more: a port that died
                self.learned = OrderedDict((m, p) for m, p in self.learned.items() if p != path)
        return delivered

    def receive_into(self, buffer: memoryview) -> int | None:
        try:
            size, sender = self.sock.recvfrom_into(buffer)
        except BlockingIOError:
            return None
        if size >= HEADER_SIZE + 12 and isinstance(sender, str) and sender:
            source = bytes(buffer[HEADER_SIZE + 6 : HEADER_SIZE + 12])
            if not source[0] & 1:
                self.learned[source] = sender
                self.learned.move_to_end(source)
                if len(self.learned) > MAX_LEARNED:
                    self.learned.popitem(last=False)
        return size

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _frame_bytes(views: list[memoryview], offset: int, size: int) -> bytearray:
    out = bytearray()
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        out += view[offset : offset + size - len(out)]
        offset = 0
        if len(out) == size:
            break
    return out
