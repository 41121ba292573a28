"""A Linux TAP device (``/dev/net/tun``) with virtio-net headers (IFF_VNET_HDR): frames go to
the host's network stack, and the kernel does checksums and segmentation for the guest where
it asks it to (TUNSETOFFLOAD). Creating a TAP device needs CAP_NET_ADMIN in its network
namespace; one that exists and belongs to the daemon's user does not."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyvirtio.spec.net import HEADER_SIZE

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
_IFREQ = struct.Struct("16sH22x")


class TapError(Exception):
    """The TAP device cannot be opened or set up."""


class Tap:
    def __init__(self, name: str) -> None:
        if not 0 < len(name.encode()) < 16:
            raise TapError(f"TAP name {name!r} must be 1 to 15 bytes")
        self.name = name
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"/dev/net/tun: {exc.strerror}") from None
        try:
            ifr = _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", HEADER_SIZE))
        except OSError as exc:
            os.close(self.fd)
            raise TapError(f"TAP {name}: {exc.strerror}") from None
        try:  # what this kernel's TAP can do for the guest
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            self.takes_partial_csum = self.takes_gso = True
        except OSError:
            self.takes_partial_csum = self.takes_gso = False
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)

    def fileno(self) -> int:
        return self.fd

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool) -> None:
        flags = 0
        if csum:
            flags |= TUN_F_CSUM
            if tso4:
                flags |= TUN_F_TSO4
            if tso6:
                flags |= TUN_F_TSO6
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def send(self, views: list[memoryview]) -> bool:
        try:
            os.writev(self.fd, views)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINVAL, errno.EIO, errno.ENOBUFS):
                return False  # full, a frame the kernel refuses, or the link is down
            raise
        return True

    def receive_into(self, buffer: memoryview) -> int | None:
        try:
            return os.readv(self.fd, [buffer])
        except BlockingIOError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
