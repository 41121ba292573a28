"""``make demo``: an unmodified Debian kernel boots with its root file system on a pyvirtio disk.

1. The guest is built from Debian packages (cached in ~/.cache/pyvirtio): the stock
   cloud-amd64 kernel and a small initramfs that loads its virtio modules.
2. An ext4 root file system image (busybox and an init) is made with ``mkfs.ext4 -d``.
3. ``pyvirtio blk`` serves the image over vhost-user.
4. QEMU (microvm, TCG) boots the kernel with ``root=/dev/vda``; the guest mounts its root from
   the pyvirtio disk, runs a short workload on it and powers off.
5. The demo prints what happened, checks the image on the host, and exits 0.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rigs import RigError
from rigs.backends import BACKENDS, BlkOptions
from rigs.qemu import GuestError, VhostUserBlk
from rigs.rootfs import make_rootfs_image
from rigs.x86_guest import ensure_guest

WORKLOAD = r"""
rate() {  # START END: seconds and MiB/s for 32 MiB
    echo "$1 $2" | awk '{printf "%.2f s (%.1f MiB/s)", $2 - $1, 32 / ($2 - $1)}'
}
echo "@@DEMO kernel: $(uname -sr)"
dmesg | grep -E 'virtio_blk|vda|EXT4-fs \(vda\)' | sed 's/^/@@DEMO dmesg: /'
echo "@@DEMO mount: $(grep ' / ' /proc/mounts | tail -n 1)"
echo "@@DEMO root: $(df -h / | tail -n 1)"
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/demo.bin bs=1M count=32 conv=fsync 2>/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
echo "@@DEMO write: 32 MiB to /demo.bin on the root file system, fsync'ed, in $(rate $start $end)"
sync
echo 3 > /proc/sys/vm/drop_caches
start=$(cut -d' ' -f1 /proc/uptime)
sum=$(md5sum < /demo.bin | cut -d' ' -f1)
end=$(cut -d' ' -f1 /proc/uptime)
echo "@@DEMO read: 32 MiB back from the disk in $(rate $start $end), md5 $sum"
rm /demo.bin
echo "Hello from $(uname -r), written on the root file system" > /hello.txt
sync
echo "@@DEMO wrote /hello.txt"
"""


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main() -> int:
    started = time.monotonic()
    say("building the guest from Debian packages (cached after the first run) ...")
    rig = ensure_guest()
    say(f"kernel {rig.kernel.package} {rig.kernel.version}")
    work = Path(tempfile.mkdtemp(prefix="pyvirtio-demo-"))
    image = work / "root.img"
    make_rootfs_image(image, 64, files={"workload.sh": WORKLOAD.encode()})
    say(f"root file system: {image} (64 MiB ext4, busybox, /sbin/init)")
    backend = BACKENDS["pyvirtio"].start(
        image, work / "root.sock", BlkOptions(serial="pyvirtio-root"), log_path=work / "backend.log"
    )
    say(f"pyvirtio blk serves it on {work / 'root.sock'} (pid {backend.proc.pid})")
    say("booting QEMU microvm (TCG) with root=/dev/vda ...")
    try:
        guest = rig.guest(
            None,
            [VhostUserBlk(work / "root.sock")],
            workdir=work / "guest",
            append=["root=/dev/vda"],
            timeout=120,
        )
        with guest:
            guest.start()
            result = guest.wait()
    except (GuestError, RigError) as exc:
        say(f"FAILED: {exc}")
        print(backend.log_text()[-2000:], file=sys.stderr)
        backend.stop()
        return 1
    finally:
        if backend.running():
            backend.stop()
    for line in result.console.splitlines():
        if line.startswith("@@DEMO "):
            print(f"  guest| {line[7:]}")
    if result.results.get("root") != "/dev/vda" or result.exit_code != 0:
        say(
            f"FAILED: the guest's root was {result.results.get('root')!r}, "
            f"exit status {result.exit_code}"
        )
        return 1
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    hello = subprocess.run(
        ["debugfs", "-R", "cat /hello.txt", str(image)], capture_output=True, text=True
    )
    say(
        f"on the host: e2fsck {'clean' if fsck.returncode == 0 else 'FAILED'}; "
        f"/hello.txt says {hello.stdout.strip()!r}"
    )
    if fsck.returncode != 0 or "Hello from" not in hello.stdout:
        print(fsck.stdout, file=sys.stderr)
        return 1
    say(
        f"done in {time.monotonic() - started:.1f} s: an unmodified Debian kernel ran with its "
        "root file system on a pyvirtio virtio-blk disk"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
