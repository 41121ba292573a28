"""A small x86_64 guest kernel with virtio-gpio and virtio-i2c, for the GPIO and I2C tests only.

No Debian amd64 kernel has the two drivers: ``GPIO_VIRTIO`` and ``I2C_VIRTIO`` are not set in
bookworm's 6.1 (cloud and generic), bookworm-backports' 6.12 or trixie's 6.12 (cloud and
generic) images. So this one is built from Debian's ``linux-source-6.1`` package (arch all:
the source tarball, from the host's own apt lists): ``allnoconfig`` plus :data:`CONFIG`,
everything built in, no modules. It boots in the same microvm rig as Debian's cloud kernel
(:mod:`rigs.qemu`): virtio-mmio devices found through ACPI, the console on ttyS0.

The result is cached under ``<cache>/peripheral-kernel/<source version>-<hash>/`` as a tree
:class:`rigs.kernel.Kernel` understands (``boot/vmlinuz-*``, ``boot/config-*``, an empty
``lib/modules``), with ``build.log``; the hash covers :data:`CONFIG`, the compiler and
:data:`BUILD_FORMAT`. A build takes a few minutes on 2 cores (run at ``nice``).

:func:`ensure_peripheral_guest` gives the rig for the tests: this kernel with an initramfs of
:data:`TOOLS`, the host's libgpiod and i2c-tools programs (Debian's ``gpiod`` and
``i2c-tools``, from ``scripts/host-deps guest``) with their libraries.

``python -m rigs.peripheral_kernel`` builds both (if needed) and prints where they are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rigs import RigError
from rigs.cache import build_lock, cache_dir
from rigs.host import find_tool, run
from rigs.initramfs import ensure_initramfs
from rigs.kernel import GUEST_MODULES, Kernel
from rigs.kernel_build import allnoconfig, cache_key, unpack_source
from rigs.x86_guest import X86Guest
from rigs.xen.crossbuild import run_logged

SOURCE_PACKAGE = "linux-source-6.1"
BUILD_FORMAT = 1  # bump to rebuild
JOBS = 2
RELEASE_SUFFIX = "pyvirtio-peripherals"

#: Host programs in the guest (they take precedence over busybox's applets of the same name).
TOOLS = (
    "dash",
    "gpiodetect",
    "gpioinfo",
    "gpioget",
    "gpioset",
    "gpiomon",
    "i2cdetect",
    "i2cget",
    "i2cset",
    "i2cdump",
    "i2ctransfer",
)

#: Set on top of allnoconfig (``KCONFIG_ALLCONFIG``); each must be ``=y`` in the result.
CONFIG = (
    # what a busybox + glibc userland needs
    "PRINTK",
    "TTY",
    "MULTIUSER",
    "FUTEX",
    "POSIX_TIMERS",
    "FILE_LOCKING",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "PROC_FS",
    "SYSFS",
    "SHMEM",
    "TMPFS",
    "DEVTMPFS",
    "BLK_DEV_INITRD",
    "RD_GZIP",
    # QEMU's microvm: the serial console, devices and power-off through ACPI
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "ACPI",
    "PCI",  # ACPICA installs a PCI_Config handler at load time, or the DSDT is not loaded
    # virtio-mmio, and the two drivers under test with their character devices
    "VIRTIO_MENU",
    "VIRTIO_MMIO",
    "GPIOLIB",
    "GPIO_CDEV",
    "GPIO_CDEV_V1",  # libgpiod 1.6 (Debian 12's gpiod tools) uses the v1 uAPI
    "GPIO_VIRTIO",
    "I2C",
    "I2C_CHARDEV",
    "I2C_VIRTIO",
)


@dataclass(frozen=True)
class PeripheralKernel(Kernel):
    """A built kernel in the layout of an unpacked Debian package, every driver built in."""

    def module_load_order(self, names: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
        """Nothing to load: the kernel has no module support."""
        return []


def compiler_version() -> str:
    """``gcc --version``: a new compiler makes a new build."""
    gcc = find_tool("gcc")
    return subprocess.run([str(gcc), "--version"], capture_output=True, text=True).stdout


def build_key(version: str) -> str:
    """The cache key of a build of source ``version`` with this module's settings."""
    return cache_key(BUILD_FORMAT, version, CONFIG, compiler_version())


def source_version() -> str:
    """The candidate version of :data:`SOURCE_PACKAGE` in the host's apt lists."""
    show = run(["apt-cache", "show", "--no-all-versions", SOURCE_PACKAGE]).decode()
    match = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if not match:
        raise RigError(f"apt-cache show {SOURCE_PACKAGE} gives no version (apt-get update?)")
    return match.group(1)


def _download(version: str, into: Path) -> Path:
    """The source package's .deb, downloaded once into ``into``."""
    deb = into / f"{SOURCE_PACKAGE}_{version.replace(':', '%3a')}_all.deb"
    if deb.is_file():
        return deb
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into, prefix=".dl-") as tmp:
        run(["apt-get", "download", "-q", f"{SOURCE_PACKAGE}={version}"], cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise RigError(f"apt-get download {SOURCE_PACKAGE}={version} left {got}")
        got[0].rename(deb)
    return deb


def _kernel(version: str, out: Path) -> PeripheralKernel:
    upstream = version.split("-")[0]
    release = f"{upstream}-{RELEASE_SUFFIX}"
    return PeripheralKernel(f"peripheral-kernel-{out.name}", version, release, out)


def ensure_peripheral_kernel(into: Path | None = None) -> PeripheralKernel:
    """Build (once) the kernel from the newest ``linux-source-6.1`` into ``into`` (default
    ``<cache>/peripheral-kernel``); RigError if it cannot be built."""
    into = into or cache_dir() / "peripheral-kernel"
    with build_lock("peripheral-kernel"):
        version = source_version()
        out = into / f"{version}-{build_key(version)}"
        kernel = _kernel(version, out)
        if (out / ".complete").is_file():
            return kernel
        for tool in ("make", "gcc", "flex", "bison", "bc", "dpkg-deb", "xz"):
            find_tool(tool)
        deb = _download(version, into / "debs")
        with tempfile.TemporaryDirectory(dir=into, prefix=".build-") as tmp:
            work = Path(tmp)
            log = work / "build.log"
            src = unpack_source(deb, work, SOURCE_PACKAGE)
            make = ["make", "ARCH=x86_64"]
            config = allnoconfig(
                src, make, CONFIG, log, [f'CONFIG_LOCALVERSION="-{RELEASE_SUFFIX}"']
            )
            jobs = f"-j{min(JOBS, os.cpu_count() or 1)}"
            # LOCALVERSION_AUTO would append a "+" (the tree is no git checkout).
            run_logged(["nice", *make, jobs, "LOCALVERSION=", "bzImage"], src, log, "make bzImage")
            built_release = (src / "include" / "config" / "kernel.release").read_text().strip()
            stage = work / "out"
            staged = _kernel(version, stage)
            if built_release != staged.release:
                raise RigError(f"built {built_release!r}, expected {staged.release!r}")
            staged.vmlinuz.parent.mkdir(parents=True)
            shutil.copy2(src / "arch" / "x86" / "boot" / "bzImage", staged.vmlinuz)
            staged.config.write_text(config)
            staged.modules_dir.mkdir(parents=True)
            for index in ("modules.dep", "modules.builtin"):
                (staged.modules_dir / index).write_text("")
            shutil.copy2(log, stage / "build.log")
            (stage / ".complete").write_text(f"{SOURCE_PACKAGE} {version}\n")
            shutil.rmtree(out, ignore_errors=True)
            stage.rename(out)
            out.chmod(0o755)
        for stale in into.glob(f"{version}-*"):
            if stale != out:
                shutil.rmtree(stale, ignore_errors=True)
        return kernel


def ensure_peripheral_guest() -> X86Guest:
    """The kernel and an initramfs with :data:`TOOLS`, built (or reused from the cache)."""
    kernel = ensure_peripheral_kernel()
    return X86Guest(kernel, ensure_initramfs(kernel, TOOLS, name="peripherals-initramfs"))


if __name__ == "__main__":
    guest = ensure_peripheral_guest()
    built = guest.kernel
    for option in ("GPIO_VIRTIO", "I2C_VIRTIO", "GPIO_CDEV_V1", "I2C_CHARDEV"):
        print(f"CONFIG_{option}={built.config_value(option)}")
    print(
        f"{SOURCE_PACKAGE} {built.version}: {built.vmlinuz} ({built.vmlinuz.stat().st_size} bytes)"
    )
    print(f"initramfs: {guest.initramfs} ({guest.initramfs.stat().st_size} bytes)")
