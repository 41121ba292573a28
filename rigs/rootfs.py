"""An ext4 root file system image (busybox + an /sbin/init script) to boot with ``root=/dev/vda``.

The initramfs /init mounts it and switch_roots to its /sbin/init; the default init mounts the
usual file systems, runs ``/workload.sh`` if present and ends the guest with the same
``@@EXIT <status>`` protocol as the initramfs tests.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path

from rigs import RigError
from rigs.host import find_tool, run

DEFAULT_INIT = r"""#!/bin/sh
# rigs root file system /sbin/init: run /workload.sh and power off.
export PATH=/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "@@RESULT root $(awk '$2 == "/" {print $1}' /proc/mounts | tail -n 1)"
if [ -f /workload.sh ]; then
    sh /workload.sh
    rc=$?
else
    echo "rigs root file system on $(uname -r): up"
    rc=0
fi
echo "@@EXIT $rc"
cd /
umount /tmp
mount -o remount,ro /
sync
sleep 0.2
poweroff -f
"""

_STAMP_SUFFIX = ".rigs-stamp"


def _busybox_applets(busybox: Path) -> list[str]:
    return [a for a in run([str(busybox), "--list"]).decode().split() if a != "busybox"]


def make_rootfs_image(
    path: Path,
    size_mib: int,
    init_script: str = DEFAULT_INIT,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """(Re)create ``path``: ext4 of ``size_mib`` MiB with busybox, /sbin/init and ``files``
    (path in the image -> contents, mode 0755). Uses ``mkfs.ext4 -d``; no root needed."""
    busybox = find_tool("busybox")
    with tempfile.TemporaryDirectory(prefix="rigs-rootfs-") as tmp:
        root = Path(tmp).resolve()
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "mnt"):
            (root / d).mkdir()
        (root / "tmp").chmod(0o1777)
        (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
        (root / "bin" / "busybox").chmod(0o755)
        for applet in _busybox_applets(busybox):
            (root / "bin" / applet).symlink_to("busybox")
        (root / "sbin" / "init").write_text(init_script)
        (root / "sbin" / "init").chmod(0o755)
        (root / "etc" / "mtab").symlink_to("/proc/mounts")
        for name, data in (files or {}).items():
            target = root / name.lstrip("/")
            if root not in target.resolve().parents:
                raise RigError(f"make_rootfs_image: bad path {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o755)
        path.unlink(missing_ok=True)
        with path.open("wb") as f:
            f.truncate(size_mib << 20)
        mkfs = ["mkfs.ext4", "-q", "-F", "-L", "rigs-root", "-E", "root_owner=0:0"]
        run([*mkfs, "-d", str(root), str(path)])
    return path


def ensure_rootfs_image(
    path: Path,
    size_mib: int,
    init_script: str = DEFAULT_INIT,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Like :func:`make_rootfs_image`, but keep an existing image built from the same inputs
    (recorded in ``<path>.rigs-stamp``); the guest's own changes to it are then kept too."""
    digest = hashlib.sha256(f"{size_mib}\n{init_script}".encode())
    for name, data in sorted((files or {}).items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    digest.update(find_tool("busybox").read_bytes())
    stamp = path.with_name(path.name + _STAMP_SUFFIX)
    want = digest.hexdigest()
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return path
    stamp.unlink(missing_ok=True)
    make_rootfs_image(path, size_mib, init_script, files)
    stamp.write_text(want + "\n")
    return path
