"""Atomic read-modify-write of memory shared with another process, through libatomic's
out-of-line operations (CPython has none of its own). Addresses are raw: callers take them
from a mapping they keep alive (:func:`address_of`)."""

from __future__ import annotations

import ctypes

from pyvirtio.memory.barrier import libatomic

_SEQ_CST = 5

_fetch_or_1 = libatomic.__atomic_fetch_or_1
_fetch_or_1.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
_fetch_or_1.restype = ctypes.c_uint8
_exchange_8 = libatomic.__atomic_exchange_8
_exchange_8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
_exchange_8.restype = ctypes.c_uint64


def address_of(view: memoryview) -> int:
    """The address of a writable, contiguous view's first byte (valid while it is alive)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def fetch_or_u8(address: int, bits: int) -> int:
    """``*address |= bits`` for one byte, atomically; returns the byte before."""
    return int(_fetch_or_1(address, bits, _SEQ_CST))


def exchange_u64(address: int, value: int) -> int:
    """Swap the 8-byte word at ``address`` (8-aligned) for ``value``; returns the old one."""
    return int(_exchange_8(address, value, _SEQ_CST))
