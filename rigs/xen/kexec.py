"""kexec-tools for the arm64 domUs: Debian's package with the libraries it loads that the domU
base archive lacks (Debian links ``kexec`` against libxenctrl), as files to add to the domU's
initramfs (``XenTest(domu_files=...)``). Packages come through the rig's private arm64 apt and
package cache (:mod:`rigs.xen.packages`), with the same Xen version pins as the rig.
"""

from __future__ import annotations

from rigs.cache import build_lock
from rigs.xen import xen_cache_dir
from rigs.xen.apt import ForeignApt
from rigs.xen.build import XenRig
from rigs.xen.hypervisor import source_version
from rigs.xen.initramfs import DOMU_EXCLUDE
from rigs.xen.packages import Packages, build_tree

PACKAGE = "kexec-tools"
# What kexec does not load: kexec-tools' extras, and the libxenmisc4.17 libraries other than
# libxenctrl (they would pull in libxenstore, libext2fs, ...).
EXCLUDE = (
    *DOMU_EXCLUDE,
    "usr/sbin/coldreboot",
    "usr/sbin/vmcore-dmesg",
    "usr/lib/aarch64-linux-gnu/kexec-tools/*",
    "etc/*",
    "usr/lib/xen-4.17/*",
    *(
        f"usr/lib/aarch64-linux-gnu/{lib}*"
        for lib in ("libxenlight", "libxenguest", "libxlutil", "libxenstat", "libxenvchan")
    ),
)


def domu_kexec_files(rig: XenRig) -> dict[str, bytes]:
    """``usr/sbin/kexec`` and the library files the rig's domU archive does not have
    (archive path -> contents; symlinked sonames become copies)."""
    with build_lock("xen-build"):
        apt = ForeignApt(xen_cache_dir("apt"), xen_cache_dir("debs"))
        apt.update()
        version, binaries, _orig = source_version(apt, xen_cache_dir("src"))
        pkgs = Packages(apt, xen_cache_dir("unpacked"), {b: version for b in binaries})
        tree, chosen = build_tree(pkgs, (PACKAGE,), EXCLUDE)
    in_domu = {key.partition("=")[0] for key in rig.domu_packages}
    extra = {p.name for p in chosen if p.name not in in_domu}
    ours = {arc: e for arc, e in tree.entries.items() if e.origin in extra and arc[0] != "."}
    linked = {tree.resolve(arc) for arc, e in ours.items() if e.link is not None}
    files: dict[str, bytes] = {}
    for arc, entry in ours.items():
        target = tree.resolve(arc)
        if target is not None and (entry.link is not None or arc not in linked):
            files[arc] = tree.entries[target].content()
    if "usr/sbin/kexec" not in files:
        raise RuntimeError(f"{PACKAGE} has no usr/sbin/kexec: {sorted(files)}")
    return files
