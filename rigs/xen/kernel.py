"""The arm64 Linux kernel for dom0 and the domUs: the linux-image-6.1.0-NN-arm64 package that
Debian's ``linux-image-arm64`` metapackage depends on, unpacked once with a ``depmod`` index.

Its ``boot/vmlinuz-*`` is an uncompressed arm64 ``Image``. Module handling (dependency order,
built-ins) is :class:`rigs.kernel.Kernel`'s.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from rigs import RigError
from rigs.host import find_tool
from rigs.kernel import Kernel
from rigs.xen.apt import ForeignApt, parse_depends

META_PACKAGE = "linux-image-arm64"

# Modules dom0 loads, in this order (rigs.md): the xen device drivers, then xenfs.
DOM0_MODULES = ("xen-evtchn", "xen-privcmd", "xen-gntdev", "xen-gntalloc", "xenfs")
# Modules a domU loads: virtio-mmio, virtio-blk and virtio-rng, ext4 for the file system tests
# (crc32c_generic is ext4's softdep "crypto-crc32c", which modules.dep does not list), and Xen's
# PV block front-end for the benchmarks against it.
DOMU_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "virtio_rng",
    "xen-blkfront",
)


def kernel_package(apt: ForeignApt) -> tuple[str, str]:
    """(package, version) of the kernel the metapackage depends on."""
    record = apt.show(META_PACKAGE)
    if record is None:
        raise RigError(f"no {apt.arch} package {META_PACKAGE}")
    names = [a for alts in parse_depends(record) for a in alts if a.startswith("linux-image-")]
    if not names:
        raise RigError(f"{META_PACKAGE} depends on no linux-image package: {record}")
    target = apt.show(names[0])
    if target is None:
        raise RigError(f"{META_PACKAGE} depends on {names[0]}, which is not in the lists")
    return names[0], target["Version"]


def ensure_kernel(apt: ForeignApt, into: Path) -> Kernel:
    """Download and unpack the kernel into ``into/kernel-<package>_<version>`` (once)."""
    package, version = kernel_package(apt)
    release = package.removeprefix("linux-image-")
    kernel = Kernel(package, version, release, into / f"kernel-{package}_{version}")
    if (kernel.root / ".complete").exists():
        return kernel
    shutil.rmtree(kernel.root, ignore_errors=True)
    deb = apt.download({package: version})[package]
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into, prefix=".kernel-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
        shutil.rmtree(tree / "usr" / "share", ignore_errors=True)
        modules = tree / "lib" / "modules" / release
        merged = tree / "usr" / "lib" / "modules" / release
        if not modules.is_dir() and merged.is_dir():
            modules.parent.mkdir(parents=True)
            merged.rename(modules)
        if not modules.is_dir():
            raise RigError(f"{deb.name} has no lib/modules/{release}")
        proc = subprocess.run(
            [str(find_tool("depmod")), "-b", str(tree), release],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RigError(f"depmod -b {tree} {release} failed: {proc.stderr.strip()}")
        (tree / ".complete").write_text(f"{package} {version}\n")
        tree.rename(kernel.root)
    if not kernel.vmlinuz.is_file():
        raise RigError(f"{package} has no {kernel.vmlinuz.name}")
    return kernel
