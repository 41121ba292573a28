"""Memory barriers for rings shared with a guest (VIRTIO 1.2 §2.7.13.3, §2.7.7.2).

CPython has no fence primitive, so a real fence comes from libatomic's out-of-line
``atomic_thread_fence``. On x86-64 (TSO) loads are not reordered with older loads and stores
are not reordered with older stores, so acquire and release fences need no instruction there;
the interpreter's opaque C calls keep the compiler from reordering, and only the full fence (a
store followed by a load, as the EVENT_IDX checks need) emits ``mfence``. Every other
architecture, arm64 first, gets the real fence for all three.
"""

import ctypes
import ctypes.util
import functools
import platform
import sys
from collections.abc import Callable

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("pyvirtio supports little-endian hosts only")

_MEMORY_ORDER_ACQUIRE = 2
_MEMORY_ORDER_RELEASE = 3
_MEMORY_ORDER_SEQ_CST = 5


def _load_libatomic() -> ctypes.CDLL:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        raise ImportError(
            "pyvirtio needs libatomic (Debian package libatomic1) for memory barriers"
        ) from exc


#: GCC's libatomic: fences here, atomic operations in ``memory/atomic.py``.
libatomic = _load_libatomic()
_fence = libatomic.atomic_thread_fence
_fence.argtypes = [ctypes.c_int]
_fence.restype = None

#: Orders every earlier load and store before every later one.
full_fence: Callable[[], None] = functools.partial(_fence, _MEMORY_ORDER_SEQ_CST)


def _no_fence() -> None:
    """Acquire or release ordering that the architecture gives for free (x86-64 TSO)."""


if platform.machine() in ("x86_64", "AMD64"):
    acquire_fence: Callable[[], None] = _no_fence
    release_fence: Callable[[], None] = _no_fence
else:
    acquire_fence = functools.partial(_fence, _MEMORY_ORDER_ACQUIRE)
    release_fence = functools.partial(_fence, _MEMORY_ORDER_RELEASE)
