"""Build (or find in the cache) everything the Xen rig boots: the IOREQ-enabled hypervisor, the
arm64 kernel, and the dom0 and domU base initramfs archives.

Cache layout under ``<cache>/xen/``: ``apt/`` (private lists), ``debs/``, ``unpacked/``,
``src/`` (xen orig tarballs), ``hypervisor/<version>-<hash>/``, ``kernel-<pkg>_<ver>/``,
``resolved-<role>-<hash>.json`` (the package set chosen for a role, per apt lists refresh) and
``<role>-<hash>.cpio[.gz]`` (the archives, keyed by every package version, the kernel and the
rig's sources). Nothing is rebuilt while those stay the same.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rigs import cpio as cpio_module
from rigs import kernel as rigs_kernel
from rigs.cache import build_lock
from rigs.kernel import Kernel
from rigs.xen import elf, libs, packages, tree, xen_cache_dir
from rigs.xen.apt import ForeignApt
from rigs.xen.hypervisor import Hypervisor, ensure_hypervisor, source_version
from rigs.xen.initramfs import (
    DOM0_EXCLUDE,
    DOM0_ROOTS,
    DOMU_EXCLUDE,
    DOMU_ROOTS,
    finish_dom0,
    finish_domu,
    source_files,
    write_tree,
)
from rigs.xen.kernel import ensure_kernel
from rigs.xen.packages import Package, Packages, build_tree, unpack
from rigs.xen.tree import FileTree

FORMAT = 1  # bump to rebuild every archive


@dataclass(frozen=True)
class XenRig:
    """A built rig: what :mod:`rigs.xen.qemu` boots."""

    hypervisor: Hypervisor
    kernel: Kernel  # dom0's and the domUs' (kernel.vmlinuz is an arm64 Image)
    dom0_initrd: Path  # base archive: /init, packages, modules, /domu/Image
    domu_initrd: Path  # base archive for the domUs (tests append /tests/*.sh)
    dom0_packages: tuple[str, ...]  # name=version
    domu_packages: tuple[str, ...]

    @property
    def image(self) -> Path:
        """The kernel Image (dom0 and domU)."""
        return self.kernel.vmlinuz

    def describe(self) -> str:
        """A few lines naming what was built from which versions."""
        return "\n".join(
            [
                f"xen {self.hypervisor.version}: {self.hypervisor.image}",
                f"kernel {self.kernel.key}: {self.image}",
                f"dom0 initrd ({len(self.dom0_packages)} packages): {self.dom0_initrd}",
                f"domU initrd ({len(self.domu_packages)} packages): {self.domu_initrd}",
            ]
        )


def _digest(*parts: object, files: Sequence[Path] = ()) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode() + b"\n")
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_RESOLVER_SOURCES = [Path(m.__file__ or "") for m in (elf, libs, packages, tree)]
# Sources that do not shape the archives.
_RUN_ONLY = ("qemu.py", "harness.py", "grant_kernel.py", "flask.py")


def _archive_sources() -> list[Path]:
    """Everything whose change must rebuild the base archives."""
    here = Path(__file__).parent
    mine = [p for p in sorted(here.glob("*.py")) if p.name not in _RUN_ONLY]
    shared = [Path(m.__file__ or "") for m in (cpio_module, rigs_kernel)]
    return [*mine, *source_files(), *shared]


def _chosen_packages(
    apt: ForeignApt,
    pkgs: Packages,
    role: str,
    roots: Sequence[str],
    exclude: Sequence[str],
) -> list[Package]:
    """The role's packages: from the resolution cached for the current lists, or resolved."""
    key = _digest(role, roots, exclude, sorted(pkgs.pins.items()), apt.lists_time(),
                  files=_RESOLVER_SOURCES)  # fmt: skip
    record = xen_cache_dir() / f"resolved-{role}-{key}.json"
    if record.is_file():
        chosen = []
        for name, version in json.loads(record.read_text()):
            deb = apt.deb_path(name, version)
            if not deb.is_file():
                break
            chosen.append(Package(name, version, deb, unpack(deb, pkgs.unpacked), ()))
        else:
            return chosen
    _tree, resolved = build_tree(pkgs, roots, exclude)
    for stale in xen_cache_dir().glob(f"resolved-{role}-*.json"):
        stale.unlink()
    record.write_text(json.dumps([[p.name, p.version] for p in resolved], indent=0))
    return resolved


def _ensure_archive(
    role: str,
    chosen: list[Package],
    exclude: Sequence[str],
    finish: Callable[[FileTree, Kernel], None],
    kernel: Kernel,
    compress: bool,
) -> Path:
    """The role's base archive, written once per package set, kernel and rig sources."""
    key = _digest(
        FORMAT, role, [p.key for p in chosen], kernel.key, exclude, compress,
        files=_archive_sources(),
    )  # fmt: skip
    root = xen_cache_dir()
    out = root / f"{role}-{key}.cpio{'.gz' if compress else ''}"
    if out.is_file():
        return out
    files = FileTree()
    for package in chosen:
        files.add_unpacked(package.root, package.name, exclude)
    finish(files, kernel)
    with tempfile.NamedTemporaryFile(dir=root, prefix=f".{role}-", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        write_tree(files, tmp_path, compress)
        tmp_path.chmod(0o644)
        tmp_path.rename(out)
    finally:
        tmp_path.unlink(missing_ok=True)
    for stale in root.glob(f"{role}-*.cpio*"):
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def ensure_rig(*, compress: bool = False) -> XenRig:
    """Build whatever is missing or out of date and return the rig.

    ``compress`` gzips the base archives (smaller files; a TCG guest spends longer unpacking).
    RigError (with the failing command's output) if anything cannot be fetched or built.
    """
    with build_lock("xen-build"):
        apt = ForeignApt(xen_cache_dir("apt"), xen_cache_dir("debs"))
        apt.update()
        version, binaries, orig = source_version(apt, xen_cache_dir("src"))
        pkgs = Packages(apt, xen_cache_dir("unpacked"), {b: version for b in binaries})
        hypervisor = ensure_hypervisor(pkgs, version, orig, xen_cache_dir("hypervisor"))
        kernel = ensure_kernel(apt, xen_cache_dir())
        dom0_pkgs = _chosen_packages(apt, pkgs, "dom0", DOM0_ROOTS, DOM0_EXCLUDE)
        domu_pkgs = _chosen_packages(apt, pkgs, "domu", DOMU_ROOTS, DOMU_EXCLUDE)
        dom0 = _ensure_archive("dom0", dom0_pkgs, DOM0_EXCLUDE, finish_dom0, kernel, compress)
        domu = _ensure_archive("domu", domu_pkgs, DOMU_EXCLUDE, finish_domu, kernel, compress)
        return XenRig(
            hypervisor,
            kernel,
            dom0,
            domu,
            tuple(p.key for p in dom0_pkgs),
            tuple(p.key for p in domu_pkgs),
        )


if __name__ == "__main__":
    print(ensure_rig().describe())
