"""Thin ctypes bindings to Xen's stable libraries, loaded on first use.

Only what the IOREQ shim needs: libxendevicemodel (IOREQ servers, interrupts),
libxenforeignmemory (the ioreq page, a hypervisor resource), libxenevtchn (event channels) and
libxenstore. Guest RAM is mapped through /dev/xen/privcmd and /dev/xen/gntdev directly
(``privcmd.py``, ``gntdev.py``) so that mappings are Python ``mmap`` objects, which refuse to be
unmapped while a view into them is alive.

Every failing call raises :class:`XenError` with the errno and the function's name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_uint, c_uint16, c_uint32, c_void_p
from typing import Any, ClassVar

PROT_READ = 1
PROT_WRITE = 2

#: XENMEM_resource_ioreq_server and its frames (xen/include/public/memory.h).
XENMEM_RESOURCE_IOREQ_SERVER = 0


def resource_ioreq_frame(vcpu_page: int) -> int:
    """XENMEM_resource_ioreq_server_frame_ioreq(n): frame 0 is the buffered ioreq page."""
    return 1 + vcpu_page


#: HVM_IOREQSRV_BUFIOREQ_OFF: Arm has no buffered ioreqs.
BUFIOREQ_OFF = 0


class XenError(OSError):
    """A Xen library call failed."""


_libs: dict[str, ctypes.CDLL] = {}


def _lib(soname: str) -> ctypes.CDLL:
    lib = _libs.get(soname)
    if lib is None:
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
        except OSError as exc:
            raise XenError(
                0, f"cannot load {soname} ({exc}); this needs Xen's libraries (Debian: libxen*)"
            ) from None
        _libs[soname] = lib
    return lib


def _fn(soname: str, name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(_lib(soname), name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise XenError(err, f"{what}: {os.strerror(err)}")
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno()
        raise XenError(err, f"{what}: {os.strerror(err)}")
    return ptr


_DM = "libxendevicemodel.so.1"
_FMEM = "libxenforeignmemory.so.1"
_EVTCHN = "libxenevtchn.so.1"
_XS = "libxenstore.so.4"


class _Handle:
    """A handle of one of Xen's ``<prefix>_open(logger, flags)`` libraries."""

    _soname: ClassVar[str]
    _prefix: ClassVar[str]

    def __init__(self) -> None:
        opener = _fn(self._soname, f"{self._prefix}_open", c_void_p, c_void_p, c_uint)
        self._close = _fn(self._soname, f"{self._prefix}_close", c_int, c_void_p)
        self.handle = _check_ptr(opener(None, 0), f"{self._prefix}_open")

    def close(self) -> None:
        if self.handle:
            self._close(self.handle)
            self.handle = 0


class DeviceModel(_Handle):
    """libxendevicemodel: IOREQ servers and interrupt lines."""

    _soname = _DM
    _prefix = "xendevicemodel"

    def __init__(self) -> None:
        self._create = _fn(
            _DM,
            "xendevicemodel_create_ioreq_server",
            c_int,
            c_void_p,
            c_uint16,
            c_int,
            POINTER(c_uint16),
        )
        self._map_range = _fn(
            _DM,
            "xendevicemodel_map_io_range_to_ioreq_server",
            c_int,
            c_void_p,
            c_uint16,
            c_uint16,
            c_int,
            ctypes.c_uint64,
            ctypes.c_uint64,
        )
        self._unmap_range = _fn(
            _DM,
            "xendevicemodel_unmap_io_range_from_ioreq_server",
            c_int,
            c_void_p,
            c_uint16,
            c_uint16,
            c_int,
            ctypes.c_uint64,
            ctypes.c_uint64,
        )
        self._set_state = _fn(
            _DM, "xendevicemodel_set_ioreq_server_state", c_int, c_void_p, c_uint16, c_uint16, c_int
        )
        self._destroy = _fn(
            _DM, "xendevicemodel_destroy_ioreq_server", c_int, c_void_p, c_uint16, c_uint16
        )
        self._set_irq_level = _fn(
            _DM, "xendevicemodel_set_irq_level", c_int, c_void_p, c_uint16, c_uint, c_uint
        )
        self._nr_vcpus = _fn(
            _DM, "xendevicemodel_nr_vcpus", c_int, c_void_p, c_uint16, POINTER(c_uint)
        )
        super().__init__()

    def create_ioreq_server(self, domid: int, bufioreq: int = BUFIOREQ_OFF) -> int:
        server = c_uint16()
        _check(
            self._create(self.handle, domid, bufioreq, byref(server)),
            f"create_ioreq_server(dom{domid})",
        )
        return server.value

    def map_mmio_range(self, domid: int, server: int, start: int, end: int) -> None:
        _check(
            self._map_range(self.handle, domid, server, 1, start, end),
            f"map_io_range_to_ioreq_server({start:#x}-{end:#x})",
        )

    def unmap_mmio_range(self, domid: int, server: int, start: int, end: int) -> None:
        _check(
            self._unmap_range(self.handle, domid, server, 1, start, end),
            f"unmap_io_range_from_ioreq_server({start:#x}-{end:#x})",
        )

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None:
        _check(self._set_state(self.handle, domid, server, int(enabled)), "set_ioreq_server_state")

    def destroy_ioreq_server(self, domid: int, server: int) -> None:
        _check(self._destroy(self.handle, domid, server), "destroy_ioreq_server")

    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        _check(self._set_irq_level(self.handle, domid, irq, level), f"set_irq_level({irq})")

    def nr_vcpus(self, domid: int) -> int:
        count = c_uint()
        _check(self._nr_vcpus(self.handle, domid, byref(count)), f"nr_vcpus(dom{domid})")
        return count.value


class ForeignMemory(_Handle):
    """libxenforeignmemory, for hypervisor resources (the IOREQ server's pages)."""

    _soname = _FMEM
    _prefix = "xenforeignmemory"

    def __init__(self) -> None:
        self._map_resource = _fn(
            _FMEM,
            "xenforeignmemory_map_resource",
            c_void_p,
            c_void_p,
            c_uint16,
            c_uint,
            c_uint,
            ctypes.c_ulong,
            ctypes.c_ulong,
            POINTER(c_void_p),
            c_int,
            c_int,
        )
        self._unmap_resource = _fn(
            _FMEM, "xenforeignmemory_unmap_resource", c_int, c_void_p, c_void_p
        )
        super().__init__()

    def map_resource(
        self,
        domid: int,
        kind: int,
        rid: int,
        frame: int,
        count: int,
        prot: int = PROT_READ | PROT_WRITE,
    ) -> tuple[int, int]:
        """Map ``count`` frames of a resource; returns (resource handle, address)."""
        addr = c_void_p(0)
        fres = self._map_resource(self.handle, domid, kind, rid, frame, count, byref(addr), prot, 0)
        _check_ptr(fres, f"map_resource(dom{domid}, type {kind}, id {rid})")
        assert addr.value is not None
        return fres, addr.value

    def unmap_resource(self, fres: int) -> None:
        _check(self._unmap_resource(self.handle, fres), "unmap_resource")


class EventChannels(_Handle):
    """libxenevtchn. Pending ports are read from, and unmasked by writing to, its fd."""

    _soname = _EVTCHN
    _prefix = "xenevtchn"

    def __init__(self) -> None:
        self._fd = _fn(_EVTCHN, "xenevtchn_fd", c_int, c_void_p)
        self._notify = _fn(_EVTCHN, "xenevtchn_notify", c_int, c_void_p, c_uint32)
        self._bind = _fn(_EVTCHN, "xenevtchn_bind_interdomain", c_int, c_void_p, c_uint32, c_uint32)
        self._unbind = _fn(_EVTCHN, "xenevtchn_unbind", c_int, c_void_p, c_uint32)
        self._pending = _fn(_EVTCHN, "xenevtchn_pending", c_int, c_void_p)
        self._unmask = _fn(_EVTCHN, "xenevtchn_unmask", c_int, c_void_p, c_uint32)
        super().__init__()
        self.fd = self._fd(self.handle)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return _check(
            self._bind(self.handle, domid, remote_port),
            f"bind_interdomain(dom{domid}, port {remote_port})",
        )

    def unbind(self, port: int) -> None:
        _check(self._unbind(self.handle, port), f"unbind({port})")

    def notify(self, port: int) -> None:
        _check(self._notify(self.handle, port), f"notify({port})")

    def pending(self) -> int:
        return _check(self._pending(self.handle), "pending")

    def unmask(self, port: int) -> None:
        _check(self._unmask(self.handle, port), f"unmask({port})")


class XenStore:
    """libxenstore: read, write, list, remove, and watches with a pollable fd."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._free = self._libc.free
        self._free.argtypes = [c_void_p]
        self._open = _fn(_XS, "xs_open", c_void_p, ctypes.c_ulong)
        self._close = _fn(_XS, "xs_close", None, c_void_p)
        self._read = _fn(_XS, "xs_read", c_void_p, c_void_p, c_uint32, c_char_p, POINTER(c_uint))
        self._write = _fn(
            _XS, "xs_write", ctypes.c_bool, c_void_p, c_uint32, c_char_p, c_void_p, c_uint
        )
        self._rm = _fn(_XS, "xs_rm", ctypes.c_bool, c_void_p, c_uint32, c_char_p)
        self._directory = _fn(
            _XS, "xs_directory", POINTER(c_char_p), c_void_p, c_uint32, c_char_p, POINTER(c_uint)
        )
        self._watch = _fn(_XS, "xs_watch", ctypes.c_bool, c_void_p, c_char_p, c_char_p)
        self._unwatch = _fn(_XS, "xs_unwatch", ctypes.c_bool, c_void_p, c_char_p, c_char_p)
        self._read_watch = _fn(_XS, "xs_read_watch", POINTER(c_char_p), c_void_p, POINTER(c_uint))
        self._fileno = _fn(_XS, "xs_fileno", c_int, c_void_p)
        self.handle = _check_ptr(self._open(0), "xs_open")
        self.fd = _check(self._fileno(self.handle), "xs_fileno")

    def close(self) -> None:
        if self.handle:
            self._close(self.handle)
            self.handle = 0

    def read(self, path: str) -> str | None:
        """The value at ``path``, or None if it does not exist."""
        length = c_uint()
        ptr = self._read(self.handle, 0, path.encode(), byref(length))
        if not ptr:
            err = ctypes.get_errno()
            if err in (2, 13):  # ENOENT, EACCES
                return None
            raise XenError(err, f"xs_read({path}): {os.strerror(err)}")
        try:
            return ctypes.string_at(ptr, length.value).decode("utf-8", "replace")
        finally:
            self._free(ptr)

    def write(self, path: str, value: str) -> None:
        data = value.encode()
        if not self._write(self.handle, 0, path.encode(), data, len(data)):
            err = ctypes.get_errno()
            raise XenError(err, f"xs_write({path}): {os.strerror(err)}")

    def rm(self, path: str) -> None:
        if not self._rm(self.handle, 0, path.encode()):
            err = ctypes.get_errno()
            if err != 2:
                raise XenError(err, f"xs_rm({path}): {os.strerror(err)}")

    def directory(self, path: str) -> list[str]:
        num = c_uint()
        arr = self._directory(self.handle, 0, path.encode(), byref(num))
        if not arr:
            return []
        try:
            return [arr[i].decode("utf-8", "replace") for i in range(num.value)]
        finally:
            self._free(ctypes.cast(arr, c_void_p))

    def watch(self, path: str, token: str) -> None:
        if not self._watch(self.handle, path.encode(), token.encode()):
            err = ctypes.get_errno()
            raise XenError(err, f"xs_watch({path}): {os.strerror(err)}")

    def unwatch(self, path: str, token: str) -> None:
        self._unwatch(self.handle, path.encode(), token.encode())

    def read_watch(self) -> tuple[str, str]:
        """Block until a watch fires; returns (path, token)."""
        num = c_uint()
        arr = self._read_watch(self.handle, byref(num))
        if not arr:
            err = ctypes.get_errno()
            raise XenError(err, f"xs_read_watch: {os.strerror(err)}")
        try:
            return arr[0].decode("utf-8", "replace"), arr[1].decode("utf-8", "replace")
        finally:
            self._free(ctypes.cast(arr, c_void_p))
