"""The guest initramfs: busybox, the virtio modules, host tools with their libraries, and /init.

The base archive is built once per kernel and host-tool set and cached; per-test files
(``/test.sh``) are appended as a second archive by :func:`make_initramfs_with`, which Linux
unpacks over the first.

The /init protocol (kernel command line):

* ``rigs.disks=N`` -- wait (up to ``rigs.wait=S`` seconds, default 60) for N ``/sys/block/vd*``;
* ``root=DEV`` (optionally ``rootfstype=``) -- mount DEV rw on /newroot and switch_root to its
  /sbin/init; otherwise run ``sh /test.sh``, print ``@@EXIT <status>`` and end the guest
  (``rigs.end=poweroff`` (default) or ``reboot``; both exit QEMU under ``-no-reboot``).

Lines ``@@INIT ...`` report /init's own failures.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from rigs import RigError
from rigs import cpio as cpio_module
from rigs.cache import build_lock
from rigs.cpio import CpioWriter, write_archive
from rigs.host import find_tool, library_closure, run
from rigs.kernel import Kernel

# Bump to rebuild cached archives (the key also covers this module's and cpio's source).
FORMAT = 1

# Host programs copied into the guest (with their libraries); they take precedence over
# busybox applets of the same name. /bin/sh is dash: busybox sh runs its own applets in
# preference to PATH (FEATURE_SH_STANDALONE), which would hide util-linux's blkdiscard etc.
HOST_TOOLS = (
    "dash",
    "fio",
    "mkfs.ext4",
    "mke2fs",
    "e2fsck",
    "blkdiscard",
    "blockdev",
    "lsblk",
    "fallocate",
    "cmp",
    "dd",
    "sync",
    "md5sum",
    "sha256sum",
    "socat",
)
HOST_FILES = ("/etc/mke2fs.conf",)

MODULES_DIR = "usr/lib/modules/rigs"

INIT_SCRIPT = r"""#!/bin/sh
# rigs /init: mount, load modules, wait for the disks, then switch_root or run /test.sh.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ln -s /proc/self/fd /dev/fd 2>/dev/null

disks=0 wait=60 root= fstype=ext4 end=poweroff
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rigs.disks=*) disks=${arg#*=} ;;
        rigs.wait=*) wait=${arg#*=} ;;
        rigs.end=*) end=${arg#*=} ;;
        root=*) root=${arg#root=} ;;
        rootfstype=*) fstype=${arg#*=} ;;
    esac
done

finish() {
    echo "@@EXIT $1"
    sync
    sleep 0.2
    "$end" -f
    echo "@@INIT $end -f failed"
    sleep 1000000
}

while read -r mod; do
    insmod "/lib/modules/rigs/$mod" || echo "@@INIT insmod $mod failed"
done < /etc/rigs/modules

ticks=0
while :; do
    found=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)
    [ "$found" -ge "$disks" ] && break
    ticks=$((ticks + 1))
    if [ "$ticks" -gt $((wait * 10)) ]; then
        echo "@@INIT only $found of $disks virtio disks appeared within ${wait}s"
        ls /sys/bus/virtio/devices/ /sys/block/
        finish 253
    fi
    usleep 100000
done

if [ -n "$root" ]; then
    mkdir -p /newroot
    if ! mount -t "$fstype" -o rw "$root" /newroot; then
        echo "@@INIT cannot mount $root ($fstype)"
        finish 252
    fi
    umount /sys/kernel/debug 2>/dev/null
    umount /tmp /sys /proc
    if [ -d /newroot/dev ]; then mount --move /dev /newroot/dev; else umount /dev; fi
    exec switch_root /newroot /sbin/init
fi

cd /tmp
if [ -f /test.sh ]; then
    sh /test.sh
    rc=$?
else
    echo "@@INIT no /test.sh in the initramfs"
    rc=127
fi
finish "$rc"
"""


def _canonical(path: Path) -> str:
    """Archive path for a host file: its directory resolved (merged /usr), its own name kept."""
    return str(Path(os.path.realpath(path.parent)) / path.name).lstrip("/")


def _host_files(tools: Iterable[str]) -> dict[str, Path]:
    """Archive path -> host path for the tools, their libraries and HOST_FILES."""
    files: dict[str, Path] = {}
    for name in tools:
        binary = find_tool(name)
        files[_canonical(binary)] = binary
        for lib in library_closure(binary):
            files[_canonical(lib)] = lib
    for extra in HOST_FILES:
        if Path(extra).exists():
            files[extra.lstrip("/")] = Path(extra)
    return files


def _busybox_applets(busybox: Path) -> list[str]:
    # Debian's busybox lists itself as an applet: a "busybox -> busybox" link would loop.
    return [a for a in run([str(busybox), "--list"]).decode().split() if a != "busybox"]


def _cache_key(kernel: Kernel, modules: list[Path], files: Mapping[str, Path]) -> str:
    digest = hashlib.sha256(f"{FORMAT}\n{kernel.key}\n".encode())
    for source in (Path(__file__), Path(cpio_module.__file__)):
        digest.update(source.read_bytes())
    for mod in modules:
        digest.update(f"mod {mod}\n".encode())
    for arc, host in sorted(files.items()):
        st = host.stat()
        digest.update(f"{arc} {host} {st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _write_base(
    out: Path, kernel: Kernel, modules: list[Path], files: Mapping[str, Path], compress: bool
) -> None:
    with out.open("wb") as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                _write_base_entries(CpioWriter(gz), kernel, modules, files)
        else:
            _write_base_entries(CpioWriter(raw), kernel, modules, files)


def _write_base_entries(
    cpio: CpioWriter, kernel: Kernel, modules: list[Path], files: Mapping[str, Path]
) -> None:
    busybox = find_tool("busybox")
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "dev", "proc", "sys", "root"):
        cpio.mkdir(d)
    cpio.mkdir("tmp", 0o1777)
    for link in ("bin", "sbin", "lib", "lib64"):
        cpio.add_symlink(link, f"usr/{link}")
    cpio.add_device("dev/console", char=True, major=5, minor=1)
    cpio.add_device("dev/null", char=True, major=1, minor=3, mode=0o666)
    cpio.add_symlink("etc/mtab", "/proc/mounts")
    cpio.add_file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.add_file("usr/bin/busybox", busybox.read_bytes(), 0o755)
    shadowed = {Path(arc).name for arc in files if arc.startswith(("usr/bin/", "usr/sbin/"))}
    if "dash" in shadowed:
        cpio.add_symlink("usr/bin/sh", "dash")
        shadowed.add("sh")
    for applet in _busybox_applets(busybox):
        if applet not in shadowed:
            cpio.add_symlink(f"usr/bin/{applet}", "busybox")
    for arc, host in sorted(files.items()):
        mode = host.stat().st_mode & 0o7777
        cpio.add_file(arc, host.read_bytes(), mode)
    names = []
    for mod in modules:
        name = mod.name.split(".ko")[0] + ".ko"
        cpio.add_file(f"{MODULES_DIR}/{name}", kernel.module_bytes(mod), 0o644)
        names.append(name)
    cpio.add_file("etc/rigs/modules", "".join(f"{n}\n" for n in names).encode())
    cpio.add_file("etc/rigs/kernel", f"{kernel.key}\n".encode())
    cpio.close()


def ensure_initramfs(
    kernel: Kernel,
    tools: Iterable[str] = HOST_TOOLS,
    *,
    compress: bool = False,
    name: str = "initramfs",
) -> Path:
    """Build (or reuse) the cached base initramfs for ``kernel``; return its path.

    Uncompressed by default: the ~90 MB archive (fio's libraries) takes a TCG guest ~2.5 s
    longer per boot to gunzip than to copy. ``compress=True`` writes gzip (.cpio.gz).
    ``name`` starts the cache file's name; building one removes older entries of that name
    only, so archives of other names (another tool set) stay cached beside it.
    """
    modules = kernel.module_load_order()
    files = _host_files(tools)
    key = _cache_key(kernel, modules, files)
    suffix = ".cpio.gz" if compress else ".cpio"
    with build_lock() as root:
        out = root / f"{name}-{kernel.key}-{key}{suffix}"
        if out.is_file():
            return out
        with tempfile.NamedTemporaryFile(dir=root, prefix=".initramfs-", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            _write_base(tmp_path, kernel, modules, files, compress)
            tmp_path.chmod(0o644)
            tmp_path.rename(out)
        finally:
            tmp_path.unlink(missing_ok=True)
        for stale in root.glob(f"{name}-*.cpio*"):
            if stale != out:
                stale.unlink(missing_ok=True)
        return out


def make_initramfs_with(
    base: Path, files: Mapping[str, bytes], out: Path, *, compress: bool = False
) -> Path:
    """Write ``out``: the ``base`` archive followed by an archive of ``files`` (path -> bytes).

    Files are mode 0755; later archives override earlier ones, so this can replace /init too.
    Compressed and uncompressed members may be mixed.
    """
    if not files:
        raise RigError("make_initramfs_with: no files to add")
    with out.open("wb") as f:
        with base.open("rb") as b:
            while chunk := b.read(1 << 20):
                f.write(chunk)
        write_archive(f, dict(files), compress=compress)
    return out
