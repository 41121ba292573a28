"""What goes into the dom0 and domU base initramfs archives: packages, files left out, kernel
modules, /init and the shell libraries (rigs/xen/sh/)."""

from __future__ import annotations

import gzip
from pathlib import Path

from rigs.cpio import CpioWriter
from rigs.kernel import Kernel
from rigs.xen.bytecode import compile_sources
from rigs.xen.kernel import DOM0_MODULES, DOMU_MODULES
from rigs.xen.tree import FileTree

SH_DIR = Path(__file__).parent / "sh"
MODULES_DIR = "usr/lib/modules/rigs"
PYVIRTIO_DIR = "opt/pyvirtio"  # PYTHONPATH in dom0: /opt/pyvirtio/pyvirtio is the package
DOMU_DIR = "domu"  # in dom0: Image, initrd.cpio(.gz)

# Libraries whose sonames nothing we run needs pull in no packages: python's optional
# extension modules for them are left out along with documentation and unused programs.
COMMON_EXCLUDE = (
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "usr/share/bug/*",
    "usr/share/bash-completion/*",
    "usr/share/i18n/*",
    "usr/share/zoneinfo/*",
    "usr/lib/aarch64-linux-gnu/gconv/*",
    "usr/lib/aarch64-linux-gnu/audit/*",
    "usr/lib/systemd/*",
    "usr/lib/udev/*",
    "etc/init.d/*",
    "etc/default/*",
    "etc/cron.*",
    "etc/logrotate.d/*",
    "boot/*",
    # libc-bin: only ldconfig is used.
    "usr/bin/getconf",
    "usr/bin/getent",
    "usr/bin/iconv",
    "usr/bin/ldd",
    "usr/bin/locale",
    "usr/bin/localedef",
    "usr/bin/tzselect",
    "usr/bin/zdump",
    "usr/sbin/iconvconfig",
    "usr/sbin/zic",
)
PYTHON_EXCLUDE = tuple(
    f"usr/lib/python3.11/{name}"
    for name in (
        "test/*",
        "idlelib/*",
        "tkinter/*",
        "lib2to3/*",
        "ensurepip/*",
        "turtledemo/*",
        "pydoc_data/*",
        "config-3.11-*",
        "lib-dynload/_sqlite3.*",
        "lib-dynload/_dbm.*",
        "lib-dynload/_gdbm.*",
        "lib-dynload/readline.*",
        "lib-dynload/_curses*",
        "lib-dynload/_tkinter.*",
        "lib-dynload/nis.*",
        "lib-dynload/_ssl.*",
        "lib-dynload/_hashlib.*",
    )
)
XEN_EXCLUDE = tuple(
    f"usr/lib/xen-4.17/{name}"
    for name in (
        "bin/xentop",
        "bin/pygrub",
        "bin/oxenstored",
        "bin/xenpvnetboot",
        "bin/xentrace*",
        "bin/xencov",
        "bin/xen-access",
        "bin/test-*",
        "lib/python/*",
    )
)
DOM0_EXCLUDE = COMMON_EXCLUDE + PYTHON_EXCLUDE + XEN_EXCLUDE

# Root packages; the libraries their programs load are added by rigs.xen.packages.
DOM0_ROOTS = (
    "busybox-static",
    "libc6",
    "libgcc-s1",  # dlopen()ed by glibc for pthread_cancel (xl needs it): no DT_NEEDED says so
    "libc-bin",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxendevicemodel1",
    "libxenforeignmemory1",
    "libxenevtchn1",
    "libxengnttab1",
    "libxencall1",
    "libxenstore4",
    "libxentoollog1",
    "libxentoolcore1",
    "libxenhypfs1",
    "libxenmisc4.17",
    "libyajl2",
    "libfdt1",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libatomic1",
    "libffi8",
    "zlib1g",
    "libexpat1",
    "e2fsprogs",
)
DOMU_ROOTS = ("busybox-static", "libc6", "libgcc-s1", "e2fsprogs")
DOMU_EXCLUDE = COMMON_EXCLUDE


def _sh(name: str) -> bytes:
    return (SH_DIR / name).read_bytes()


def add_common(tree: FileTree, kernel: Kernel, modules: tuple[str, ...]) -> None:
    """Directories, /bin/sh, and ``modules`` (with dependencies) plus their load order."""
    for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "var/log", "var/lib", "mnt"):
        tree.mkdir(d)
    tree.add_symlink("var/run", "/run")
    tree.add_symlink("usr/bin/sh", "/usr/bin/busybox")
    names = []
    for mod in kernel.module_load_order(modules):
        name = mod.name.split(".ko")[0] + ".ko"
        tree.add_bytes(f"{MODULES_DIR}/{name}", kernel.module_bytes(mod))
        names.append(name)
    tree.add_bytes("etc/rigs/modules", "".join(f"{n}\n" for n in names).encode())
    tree.add_bytes("etc/rigs/kernel", f"{kernel.key}\n".encode())


def finish_dom0(tree: FileTree, kernel: Kernel) -> None:
    """Add dom0's /init, modules, the test library, the domU kernel and the Python standard
    library's bytecode to a package tree."""
    add_common(tree, kernel, DOM0_MODULES)
    tree.add_bytes("init", _sh("dom0-init.sh"), 0o755)
    tree.add_bytes("etc/rigs/lib.sh", _sh("dom0-lib.sh"))
    # A driver domain boots from a copy of dom0's root (dom0-lib.sh: domd_start).
    tree.add_bytes("etc/rigs/domd-init.sh", _sh("domd-init.sh"), 0o755)
    tree.add_bytes("etc/rigs/domd-lib.sh", _sh("domd-lib.sh"))
    tree.add_bytes("etc/rigs/block-loop", _sh("block-loop.sh"), 0o755)
    tree.add_symlink("usr/bin/python3", "python3.11")
    tree.add_file(f"{DOMU_DIR}/Image", kernel.vmlinuz, 0o644, origin="kernel")
    for d in ("var/lib/xen", "var/lib/xenstored", "var/log/xen/console", PYVIRTIO_DIR):
        tree.mkdir(d)
    sources = [
        (arc, entry.source)
        for arc, entry in tree.files()
        if arc.startswith("usr/lib/python3") and arc.endswith(".py") and entry.source
    ]
    for arc, data in compile_sources(sources).items():
        tree.add_bytes(arc, data)


def finish_domu(tree: FileTree, kernel: Kernel) -> None:
    """Add the domU's /init, modules and test library to a package tree."""
    add_common(tree, kernel, DOMU_MODULES)
    tree.add_bytes("init", _sh("domu-init.sh"), 0o755)
    tree.add_bytes("etc/rigs/lib.sh", _sh("domu-lib.sh"))
    tree.mkdir("tests")


def write_tree(tree: FileTree, out: Path, compress: bool) -> None:
    """Write ``tree`` as one newc archive (gzip if ``compress``)."""
    with out.open("wb") as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                cpio = CpioWriter(gz)
                tree.write(cpio)
                cpio.close()
        else:
            cpio = CpioWriter(raw)
            tree.write(cpio)
            cpio.close()


def source_files() -> list[Path]:
    """Files whose contents go into the base archives' cache keys."""
    return [*sorted(SH_DIR.glob("*.sh")), Path(__file__)]
