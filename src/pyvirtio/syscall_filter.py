"""A seccomp filter for a serving daemon: the system calls its data path needs, and no others.

Loaded once the daemon has opened everything it will ever open (image, sockets, devices), on
every thread (TSYNC), for good. A system call outside the list fails with EPERM instead of
running: the daemon reports the failure as it reports any other (a request fails, a session
ends), and nothing it is tricked into doing can open, create, delete or execute a file, fork,
trace a process or open a network socket (unless the storage is reached over the network).

What stays allowed, beyond reading, writing and mapping what is already open: threads (clone
with CLONE_THREAD only; clone3 answers ENOSYS, so that the C library falls back to clone, whose
flags the filter can see), UNIX sockets (accepting front-ends, connecting to vsock's host
programs or an NBD server's socket), memfds for in-flight areas, and ioctl with the few requests
the devices issue. Memory can be mapped or protected executable by no call: nothing is loaded
after the filter.

libseccomp's own Python binding does the work (Debian's python3-seccomp: ``system_bindings``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from types import ModuleType
from typing import Any

from pyvirtio.system_bindings import load

log = logging.getLogger(__name__)

#: Calls allowed whatever their arguments (names the architecture lacks are skipped).
ALLOWED = (
    # I/O on descriptors the daemon holds
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "lseek", "fsync", "fdatasync", "fallocate", "ftruncate",
    "close", "dup", "dup3", "fcntl", "fstat", "newfstatat", "statx", "fstatfs",
    "readlink", "readlinkat", "eventfd2", "memfd_create", "pipe2",
    # waiting
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "futex", "nanosleep", "clock_nanosleep", "sched_yield",
    # sockets already made, and UNIX ones (socket() itself below)
    "accept", "accept4", "connect", "recvmsg", "sendmsg", "recvfrom", "sendto", "recvmmsg",
    "sendmmsg", "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt",
    # memory (mmap and mprotect below)
    "munmap", "mremap", "madvise", "brk",
    # threads, time, signals, exit
    "set_robust_list", "get_robust_list", "rseq", "gettid", "getpid", "getuid", "geteuid",
    "getgid", "getegid", "clock_gettime", "clock_getres", "gettimeofday", "getrandom",
    "uname", "sched_getaffinity", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
    "sigaltstack", "restart_syscall", "exit", "exit_group",
)  # fmt: skip

# ioctl requests the daemons issue while they serve.
_FIONBIO = 0x5421  # os.set_blocking
_TCGETS = 0x5401  # isatty
_BLKSSZGET, _BLKPBSZGET, _BLKGETSIZE64 = 0x1268, 0x127B, 0x80081272
_BLKDISCARD, _BLKZEROOUT = 0x1277, 0x127F
_TUNSETOFFLOAD = 0x400454D0  # virtio-net: the guest changes its offloads
IOCTLS = (
    _FIONBIO, _TCGETS, _BLKSSZGET, _BLKPBSZGET, _BLKGETSIZE64, _BLKDISCARD, _BLKZEROOUT,
    _TUNSETOFFLOAD,
)  # fmt: skip

_CLONE_THREAD = 0x00010000
_PROT_EXEC = 0x4
_O_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class FilterError(Exception):
    """The filter cannot be built or loaded (no libseccomp binding, a kernel without seccomp)."""


def _seccomp() -> ModuleType:
    try:
        return load(("seccomp",), package="python3-seccomp", is_it=_is_libseccomp)
    except ImportError as exc:
        raise FilterError(f"libseccomp's Python binding: {exc}") from None


def _is_libseccomp(module: ModuleType) -> bool:
    return hasattr(module, "SyscallFilter")


#: Allowed only for ``pyvirtio blk --io-engine io_uring``. The operations a ring carries out
#: are not system calls: seccomp never sees them (the ring's opcodes are limited by the engine,
#: not by this filter).
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def build(*, network: bool = False, io_uring: bool = False) -> Any:
    """The filter (a ``seccomp.SyscallFilter``), not loaded. ``network``: the daemon also
    reaches a server over TCP (an ``nbd://`` export): IPv4 and IPv6 sockets, and opening files
    read-only (the resolver reads /etc/hosts and friends when it reconnects). ``io_uring``:
    the storage engine makes and drives io_uring instances (:data:`IO_URING`)."""
    seccomp = _seccomp()
    denied = seccomp.ERRNO(errno.EPERM)
    f = seccomp.SyscallFilter(denied)
    f.set_attr(seccomp.Attr.CTL_TSYNC, 1)
    for name in ALLOWED + (IO_URING if io_uring else ()):
        if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
            continue  # not on this architecture (select, poll: not on arm64)
        f.add_rule(seccomp.ALLOW, name)
    arg = seccomp.Arg
    f.add_rule(seccomp.ALLOW, "clone", arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for call in ("mmap", "mprotect"):
        f.add_rule(seccomp.ALLOW, call, arg(2, seccomp.MASKED_EQ, _PROT_EXEC, 0))
    f.add_rule(seccomp.ALLOW, "tgkill", arg(0, seccomp.EQ, os.getpid()))
    for request in IOCTLS:
        f.add_rule(seccomp.ALLOW, "ioctl", arg(1, seccomp.EQ, request))
    families = [socket.AF_UNIX, *((socket.AF_INET, socket.AF_INET6) if network else ())]
    for family in families:
        f.add_rule(seccomp.ALLOW, "socket", arg(0, seccomp.EQ, family))
    if network:
        f.add_rule(seccomp.ALLOW, "openat", arg(2, seccomp.MASKED_EQ, _O_WRITES, 0))
    return f


def install(*, network: bool = False, io_uring: bool = False) -> None:
    """Build the filter and load it on every thread of the process; FilterError if it cannot."""
    f = build(network=network, io_uring=io_uring)
    try:
        f.load()
    except OSError as exc:
        raise FilterError(f"cannot load the seccomp filter: {exc.strerror or exc}") from None
    log.info("seccomp filter loaded: %d system calls allowed", len(ALLOWED))
