"""A small arm64 domU kernel whose virtio devices use Xen grants (test guest only).

Debian's arm64 kernels lack ``CONFIG_XEN_VIRTIO``, so this one is cross-built from Debian's
``linux-source-6.1`` package (arch all: the source tarball): ``allnoconfig`` plus
:data:`CONFIG` (everything built in, no modules), with the test-only
``grant-dma-dom0.patch`` beside this file applied. With ``XEN_VIRTIO_FORCE_GRANT`` and that
patch every virtio device of the guest, including the virtio-mmio disks libxl describes in
its device tree, passes buffers as grant references to dom0: ``(1 << 63) | gref << 12`` plus
the offset in the page (linux ``drivers/xen/grant-dma-ops.c``). Such a device must offer
``VIRTIO_F_VERSION_1`` and ``VIRTIO_F_ACCESS_PLATFORM``, or the guest refuses it.

The result is cached under ``<cache>/xen/grant-kernel/<source version>-<hash>/`` (``Image``,
``config``, ``build.log``); the hash covers :data:`CONFIG`, the patch, the compiler and
:data:`BUILD_FORMAT`. A build takes ~6 min on 2 cores (run at ``nice``). The domU initramfs
needs no change: its /init skips ``insmod`` when the kernel has no module support.

``python -m rigs.xen.grant_kernel`` builds it (if needed) and prints the Image's path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rigs.cache import build_lock
from rigs.host import find_tool
from rigs.kernel import kconfig_value
from rigs.kernel_build import allnoconfig, cache_key, unpack_source
from rigs.xen import xen_cache_dir
from rigs.xen.apt import ForeignApt
from rigs.xen.crossbuild import CROSS_COMPILE, compiler_version, run_logged

SOURCE_PACKAGE = "linux-source-6.1"
PATCH = Path(__file__).with_name("grant-dma-dom0.patch")
BUILD_FORMAT = 1  # bump to rebuild
JOBS = 2
GRANT_IMAGE_NAME = "Image-grants"  # its name in dom0's /domu (XenTest.domu_kernels)

#: What a busybox + glibc userland from an initramfs needs, in every kernel the Xen rig builds.
USERLAND_CONFIG = (
    "PRINTK",
    "TTY",
    "MULTIUSER",
    "FUTEX",
    "POSIX_TIMERS",
    "FILE_LOCKING",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "PROC_FS",
    "PROC_SYSCTL",  # /proc/sys/vm/drop_caches
    "SYSFS",
    "TMPFS",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "BLK_DEV_INITRD",
)

#: Set on top of allnoconfig (``KCONFIG_ALLCONFIG``); each must be ``=y`` in the result.
CONFIG = (
    *USERLAND_CONFIG,
    "RD_GZIP",
    # an arm64 Xen guest with its console on hvc0
    "OF",
    "XEN",
    "HVC_XEN",
    # virtio-mmio disks, through grants
    "VIRTIO_MENU",
    "VIRTIO",
    "VIRTIO_MMIO",
    "XEN_VIRTIO",
    "XEN_VIRTIO_FORCE_GRANT",
    "BLOCK",
    "BLK_DEV",
    "VIRTIO_BLK",
    "EXT4_FS",
    # Xen's PV block front-end, for benchmarks against the PV block driver on this kernel
    "XEN_BLKDEV_FRONTEND",
)


@dataclass(frozen=True)
class GrantKernel:
    """A built grant kernel: the arm64 ``Image`` a domU boots, and its .config."""

    version: str  # the linux-source package version
    image: Path
    config: Path

    def config_value(self, option: str) -> str | None:
        """``y``/value of ``CONFIG_<option>``, or None."""
        return kconfig_value(self.config, option)


def build_key(version: str) -> str:
    """The cache key of a build of source ``version`` with this module's settings."""
    return config_key(BUILD_FORMAT, version, CONFIG, PATCH)


def config_key(build_format: int, version: str, config: tuple[str, ...], patch: Path | None) -> str:
    """The cache key of a kernel built from source ``version`` with ``config`` (and
    ``patch``) by the current cross-compiler."""
    return cache_key(build_format, version, config, compiler_version(), patch)


def ensure_grant_kernel(apt: ForeignApt | None = None, into: Path | None = None) -> GrantKernel:
    """Build (once) the grant kernel from the newest ``linux-source-6.1`` into
    ``into`` (default ``<cache>/xen/grant-kernel``); RigError if it cannot be built."""
    into = into or xen_cache_dir("grant-kernel")
    with build_lock("xen-grant-kernel"):
        if apt is None:
            apt = ForeignApt(xen_cache_dir("apt"), xen_cache_dir("debs"))
            apt.update()
        return build_kernel(apt, SOURCE_PACKAGE, CONFIG, PATCH, BUILD_FORMAT, into)


def build_kernel(
    apt: ForeignApt,
    source_package: str,
    config: tuple[str, ...],
    patch: Path | None,
    build_format: int,
    into: Path,
) -> GrantKernel:
    """An arm64 ``Image`` of the newest ``source_package`` (a Debian ``linux-source-X.Y``):
    ``allnoconfig`` plus ``config`` (each must end up ``=y``), ``patch`` applied; built once
    into ``into/<version>-<key>``. The caller holds the build lock."""
    version = apt.version(source_package)
    out = into / f"{version}-{config_key(build_format, version, config, patch)}"
    built = GrantKernel(version, out / "Image", out / "config")
    if built.image.is_file() and built.config.is_file():
        return built
    for tool in ("make", "flex", "bison", "bc", "patch", "dpkg-deb", "xz"):
        find_tool(tool)
    find_tool(f"{CROSS_COMPILE}gcc")
    deb = apt.download({source_package: version})[source_package]
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into, prefix=".build-") as tmp:
        work = Path(tmp)
        log = work / "build.log"
        src = unpack_source(deb, work, source_package)
        if patch is not None:
            run_logged(["patch", "-p1", "--forward", "-i", str(patch)], src, log, "patch")
        make = ["make", "ARCH=arm64", f"CROSS_COMPILE={CROSS_COMPILE}"]
        text = allnoconfig(src, make, config, log)
        jobs = f"-j{min(JOBS, os.cpu_count() or 1)}"
        run_logged(["nice", *make, jobs, "Image"], src, log, "make Image")
        stage = work / "out"
        stage.mkdir()
        shutil.copy2(src / "arch" / "arm64" / "boot" / "Image", stage / "Image")
        (stage / "config").write_text(text)
        shutil.copy2(log, stage / "build.log")
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
        out.chmod(0o755)
    for stale in into.glob(f"{version}-*"):
        if stale != out and not stale.name.startswith("."):
            shutil.rmtree(stale, ignore_errors=True)
    return built


if __name__ == "__main__":
    kernel = ensure_grant_kernel()
    size = kernel.image.stat().st_size
    print(f"{SOURCE_PACKAGE} {kernel.version}: {kernel.image} ({size} bytes)")
