"""Test rigs: an x86_64 QEMU microvm guest built from Debian packages, and block back-ends.

Everything downloaded or built lives in the cache directory (see :mod:`rigs.cache`); nothing of it
is committed. The usual entry points:

* :func:`rigs.x86_guest.ensure_guest` -- kernel + initramfs, built once and cached;
* :class:`rigs.qemu.QemuGuest` -- boot it with vhost-user-blk disks;
* :data:`rigs.backends.BACKENDS` -- vhost-user-blk back-ends (qemu-storage-daemon, pyvirtio).
"""

from __future__ import annotations


class RigError(Exception):
    """The rig could not be built or run (missing tool, apt failure, bad output)."""
