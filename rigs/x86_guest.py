"""The x86_64 guest rig: a Debian cloud kernel and a busybox initramfs, cached, booted in QEMU.

Typical use::

    rig = ensure_guest()
    result = rig.run("echo @@RESULT size $(blockdev --getsize64 /dev/vda)", disks, workdir=tmp)
    assert result.number("size") == 64 << 20

The script runs as /test.sh under busybox sh after the disks have appeared; its exit status is
reported by /init as ``@@EXIT``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rigs.initramfs import ensure_initramfs, make_initramfs_with
from rigs.kernel import Kernel, ensure_kernel
from rigs.qemu import DEFAULT_TIMEOUT, Disk, GuestResult, QemuGuest
from rigs.rootfs import ensure_rootfs_image, make_rootfs_image

__all__ = [
    "X86Guest",
    "ensure_guest",
    "ensure_initramfs",
    "ensure_kernel",
    "ensure_rootfs_image",
    "make_initramfs_with",
    "make_rootfs_image",
]


@dataclass(frozen=True)
class X86Guest:
    """A built rig: the kernel and the cached base initramfs."""

    kernel: Kernel
    initramfs: Path

    def initrd_with(self, files: Mapping[str, bytes], out: Path) -> Path:
        """The base initramfs with ``files`` appended (written to ``out``)."""
        return make_initramfs_with(self.initramfs, files, out)

    def guest(
        self,
        script: str | None,
        disks: Sequence[Disk],
        *,
        workdir: Path,
        files: Mapping[str, bytes] | None = None,
        smp: int = 1,
        memory_mib: int = 512,
        append: Sequence[str] = (),
        no_reboot: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        extra_args: Sequence[str] = (),
        fatal_stderr: Sequence[str] | None = None,
    ) -> QemuGuest:
        """A (not yet started) QEMU guest running ``script`` as /test.sh.

        ``script`` None boots without a /test.sh (e.g. with ``append=["root=/dev/vda"]``).
        """
        workdir.mkdir(parents=True, exist_ok=True)
        extra = dict(files or {})
        if script is not None:
            extra["test.sh"] = script.encode()
        initrd = self.initrd_with(extra, workdir / "initrd.cpio") if extra else self.initramfs
        return QemuGuest(
            self.kernel.vmlinuz,
            initrd,
            disks,
            smp=smp,
            memory_mib=memory_mib,
            append=append,
            no_reboot=no_reboot,
            timeout=timeout,
            workdir=workdir,
            extra_args=extra_args,
            fatal_stderr=fatal_stderr,
        )

    def run(
        self,
        script: str | None,
        disks: Sequence[Disk],
        *,
        workdir: Path,
        check: bool = True,
        files: Mapping[str, bytes] | None = None,
        smp: int = 1,
        memory_mib: int = 512,
        append: Sequence[str] = (),
        no_reboot: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        extra_args: Sequence[str] = (),
        fatal_stderr: Sequence[str] | None = None,
    ) -> GuestResult:
        """Boot, run ``script`` to completion and return the result (see QemuGuest.wait)."""
        guest = self.guest(
            script,
            disks,
            workdir=workdir,
            files=files,
            smp=smp,
            memory_mib=memory_mib,
            append=append,
            no_reboot=no_reboot,
            timeout=timeout,
            extra_args=extra_args,
            fatal_stderr=fatal_stderr,
        )
        with guest:
            guest.start()
            return guest.wait(check=check)


def ensure_guest() -> X86Guest:
    """Build (or reuse from the cache) the kernel and base initramfs."""
    kernel = ensure_kernel()
    return X86Guest(kernel, ensure_initramfs(kernel))
