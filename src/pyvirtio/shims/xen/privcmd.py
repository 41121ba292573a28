"""Foreign mappings of guest memory through /dev/xen/privcmd (linux/include/uapi/xen/privcmd.h).

Each mapping is a Python ``mmap`` of the privcmd device populated with the guest's frames by
IOCTL_PRIVCMD_MMAPBATCH_V2, which is what ``xenforeignmemory_map`` does on Linux (see
``mapping.py`` for why an ``mmap`` and not a raw pointer).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Mapping

from pyvirtio.shims.xen.mapping import MmapMapping

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def _ioc_none(kind: str, nr: int, size: int) -> int:
    return (size << 16) | (ord(kind) << 8) | nr


#: struct privcmd_mmapbatch_v2 { u32 num; u16 dom; u64 addr; u64 *arr; int *err; }
_MMAPBATCH_V2 = struct.Struct("<IHxxQQQ")
IOCTL_PRIVCMD_MMAPBATCH_V2 = _ioc_none("P", 4, _MMAPBATCH_V2.size)
IOCTL_PRIVCMD_RESTRICT = _ioc_none("P", 6, 2)
PRIVCMD_PATH = "/dev/xen/privcmd"


class ForeignMapping(MmapMapping):
    """Guest frames mapped into this process; ``errors`` maps the index of each page that did
    not map to Xen's errno for it, ``bad`` lists those indices."""

    def __init__(
        self, m: mmap.mmap, gfn: int, count: int, errors: Mapping[int, int] | None = None
    ) -> None:
        super().__init__(m)
        self.gfn = gfn
        self.count = count
        self.errors = dict(errors or {})
        self.bad = frozenset(self.errors)


class Privcmd:
    """A privcmd handle, optionally restricted to one domain."""

    def __init__(self, domid: int | None = None) -> None:
        self.fd = os.open(PRIVCMD_PATH, os.O_RDWR | os.O_CLOEXEC)
        if domid is not None:
            try:
                fcntl.ioctl(self.fd, IOCTL_PRIVCMD_RESTRICT, struct.pack("<H", domid))
            except OSError:
                os.close(self.fd)
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def map(self, domid: int, gfn: int, count: int) -> ForeignMapping:
        """Map ``count`` guest frames starting at ``gfn``, readable and writable."""
        m = mmap.mmap(
            self.fd,
            count << PAGE_SHIFT,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        anchor = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(anchor)
        del anchor  # releases the buffer export: the mmap can be closed again
        gfns = (ctypes.c_uint64 * count)(*range(gfn, gfn + count))
        errs = (ctypes.c_int * count)()
        arg = bytearray(
            _MMAPBATCH_V2.pack(count, domid, addr, ctypes.addressof(gfns), ctypes.addressof(errs))
        )
        try:
            fcntl.ioctl(self.fd, IOCTL_PRIVCMD_MMAPBATCH_V2, arg)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: some frames failed, see errs
                m.close()
                raise
        return ForeignMapping(m, gfn, count, {i: -errs[i] for i in range(count) if errs[i]})
