"""End-to-end: an unmodified Debian guest kernel drives vhost-user-blk back-ends through QEMU.

Each test boots the microvm guest (TCG) once per back-end; the guest script prints
``@@RESULT key value`` lines, and the tests check those and the host image afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
from rigs.backends import BlkOptions
from rigs.host import find_tool
from rigs.rootfs import ensure_rootfs_image

from tests.e2e.conftest import Harness

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def read_range(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of a host file from ``offset``."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def host_tool(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    """Run a host tool (sbin included), capturing its output."""
    return subprocess.run([str(find_tool(cmd[0])), *cmd[1:]], capture_output=True, check=False)


# -- 1. configuration space ------------------------------------------------------------------

CONFIG_SCRIPT = """
echo "@@RESULT size $(blockdev --getsize64 /dev/vda)"
echo "@@RESULT sectors $(cat /sys/block/vda/size)"
echo "@@RESULT lbs $(cat /sys/block/vda/queue/logical_block_size)"
echo "@@RESULT queues $(ls /sys/block/vda/mq | wc -l)"
echo "@@RESULT ro $(cat /sys/block/vda/ro)"
echo "@@RESULT serial $(cat /sys/block/vda/serial)"
dd if=/dev/vda of=/dev/null bs=64k iflag=direct 2>/dev/null
echo "@@RESULT read_all $?"
"""


@pytest.mark.parametrize(("lbs", "queues"), [(512, 1), (4096, 2)], ids=["lbs512-q1", "lbs4096-q2"])
def test_config(e2e: Harness, lbs: int, queues: int) -> None:
    """Capacity, logical block size, queue count and serial reach the guest as configured."""
    size = 48 * MiB + 3 * lbs  # deliberately not a round number
    serial = "e2e-serial-0123" if e2e.capabilities.serial else None
    image = e2e.image("disk.img", size)
    disk = e2e.serve(image, BlkOptions(num_queues=queues, logical_block_size=lbs, serial=serial))
    r = e2e.run(CONFIG_SCRIPT, [disk], smp=queues)
    assert r.number("size") == size
    assert r.number("sectors") == size // 512  # always in 512-byte units
    assert r.number("lbs") == lbs
    assert r.number("queues") == queues
    assert r.number("ro") == 0
    assert r.number("read_all") == 0
    if serial is not None:
        assert r.results.get("serial") == serial


# -- 2. fio write + verify -------------------------------------------------------------------

FIO_JOBS = """
[global]
filename=/dev/vda
ioengine=libaio
direct=1
rw=randwrite
verify=crc32c
verify_fatal=1
do_verify=1
stonewall

[bs512]
bs=512
iodepth=16
offset=0
size=1m

[bs4k]
bs=4k
iodepth=16
offset=1m
size=4m

[bs64k]
bs=64k
iodepth=8
offset=8m
size=8m

[bs1m]
bs=1m
iodepth=4
offset=16m
size=16m
"""

FIO_SCRIPT = """
fio /verify.fio > /tmp/fio.out 2>&1
rc=$?
cat /tmp/fio.out
echo "@@RESULT fio_rc $rc"
echo "@@RESULT jobs $(grep -c 'groupid=' /tmp/fio.out)"
echo "@@RESULT jobs_ok $(grep -c 'err= 0:' /tmp/fio.out)"
exit $rc
"""


def test_fio_verify(e2e: Harness) -> None:
    """fio random writes with crc32c verification at 512 B, 4 KiB, 64 KiB and 1 MiB."""
    disk = e2e.serve(e2e.image("disk.img", 64 * MiB), BlkOptions(logical_block_size=512))
    r = e2e.run(FIO_SCRIPT, [disk], files={"verify.fio": FIO_JOBS.encode()})
    assert r.number("fio_rc") == 0
    assert r.number("jobs") == 4
    assert r.number("jobs_ok") == 4


# -- 3. ext4 ---------------------------------------------------------------------------------

EXT4_SCRIPT = """
mkfs.ext4 -q -F /dev/vda || exit 10
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || exit 11
dd if=/dev/urandom of=/mnt/file bs=64k count=40 2>/dev/null || exit 12
echo "@@RESULT sha $(sha256sum /mnt/file | cut -c1-64)"
umount /mnt || exit 13
e2fsck -fn /dev/vda
echo "@@RESULT fsck $?"
"""


def test_ext4(e2e: Harness) -> None:
    """mkfs.ext4, mount, write, umount and fsck in the guest; the host sees a clean fs."""
    image = e2e.image("disk.img", 64 * MiB)
    r = e2e.run(EXT4_SCRIPT, [e2e.serve(image)])
    assert r.number("fsck") == 0
    e2e.stop()
    fsck = host_tool("e2fsck", "-fn", str(image))
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    cat = host_tool("debugfs", "-R", "cat /file", str(image))
    assert cat.returncode == 0, cat.stderr.decode()
    assert len(cat.stdout) == 40 * 64 * 1024
    assert sha256(cat.stdout) == r.results["sha"]


# -- 4. discard and write-zeroes -------------------------------------------------------------

DISCARD_SCRIPT = """
dd if=/pattern of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null || exit 10
echo "@@RESULT discard_max $(cat /sys/block/vda/queue/discard_max_bytes)"
echo "@@RESULT zeroes_max $(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
blkdiscard -o $((2 << 20)) -l $((4 << 20)) /dev/vda
echo "@@RESULT discard_rc $?"
blkdiscard -z -o $((8 << 20)) -l $((4 << 20)) /dev/vda
echo "@@RESULT zeroout_rc $?"
dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | cmp -s -n $((4 << 20)) - /dev/zero
echo "@@RESULT guest_zeroes $?"
"""


def test_discard_and_write_zeroes(e2e: Harness) -> None:
    """Write-zeroes reads back as zeros; discard succeeds (and punches a hole if declared)."""
    data = pattern(16 * MiB, seed=4)
    image = e2e.image("disk.img", 64 * MiB)
    r = e2e.run(DISCARD_SCRIPT, [e2e.serve(image)], files={"pattern": data})
    assert r.number("discard_max") > 0, "the device offers no VIRTIO_BLK_F_DISCARD"
    assert r.number("zeroes_max") > 0, "the device offers no VIRTIO_BLK_F_WRITE_ZEROES"
    assert r.number("discard_rc") == 0
    assert r.number("zeroout_rc") == 0
    assert r.number("guest_zeroes") == 0
    e2e.stop()
    # Untouched ranges keep the data; the write-zeroes range is zeros.
    for start, end in ((0, 2), (6, 8), (12, 16)):
        assert read_range(image, start * MiB, (end - start) * MiB) == data[start * MiB : end * MiB]
    assert read_range(image, 8 * MiB, 4 * MiB) == bytes(4 * MiB)
    if e2e.capabilities.discard_punches_holes:
        assert read_range(image, 2 * MiB, 4 * MiB) == bytes(4 * MiB)
        with image.open("rb") as f:
            assert os.lseek(f.fileno(), 2 * MiB, os.SEEK_HOLE) == 2 * MiB
            assert os.lseek(f.fileno(), 2 * MiB, os.SEEK_DATA) >= 6 * MiB
        allocated = os.stat(image).st_blocks * 512
        assert allocated <= 12 * MiB + 64 * 1024, f"{allocated} bytes still allocated"


# -- 5. read-only ----------------------------------------------------------------------------

READ_ONLY_SCRIPT = """
echo "@@RESULT ro $(cat /sys/block/vda/ro)"
dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/tmp/err
echo "@@RESULT write_rc $?"
cat /tmp/err
err=$(grep -o -E 'Operation not permitted|Input/output error|Read-only file system' /tmp/err)
echo "@@RESULT write_err $(echo "$err" | head -n 1 | tr ' ' _)"
blkdiscard /dev/vda 2>/dev/null
echo "@@RESULT discard_rc $?"
echo "@@RESULT read_sha $(dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""


def test_read_only(e2e: Harness) -> None:
    """A read-only disk is marked ro in the guest, refuses writes and still reads."""
    data = pattern(1 * MiB, seed=5)
    image = e2e.image("disk.img", 16 * MiB, data)
    r = e2e.run(READ_ONLY_SCRIPT, [e2e.serve(image, BlkOptions(read_only=True))])
    assert r.number("ro") == 1
    assert r.number("write_rc") != 0
    assert r.results.get("write_err"), "dd failed without EPERM/EIO/EROFS"
    assert r.number("discard_rc") != 0
    assert r.results["read_sha"] == sha256(data)
    e2e.stop()
    assert read_range(image, 0, 1 * MiB) == data


# -- 6. two queues on two vCPUs --------------------------------------------------------------

MULTIQUEUE_SCRIPT = """
D=/sys/kernel/debug/block/vda
echo "@@RESULT hctx $(ls /sys/block/vda/mq | wc -l)"
for q in /sys/block/vda/mq/*; do echo "@@RESULT cpus_${q##*/} $(cat $q/cpu_list)"; done
# hctxN/run counts dispatch runs of hardware queue N (= virtqueue req.N); "none" issues
# requests directly without counting, mq-deadline dispatches through the counted path.
# (Not kprobes: arming one patches kernel text, which hung the 2-vCPU TCG guest ~1 in 9 runs.)
echo mq-deadline > /sys/block/vda/queue/scheduler || exit 20
for h in 0 1; do echo "@@RESULT run${h}_before $(cat $D/hctx$h/run)"; done
fio --name=mq --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \\
    --iodepth=8 --size=8m --offset_increment=8m --numjobs=2 --cpus_allowed=0,1 \\
    --cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 --group_reporting \\
    > /tmp/fio.out 2>&1
rc=$?
cat /tmp/fio.out
echo "@@RESULT fio_rc $rc"
for h in 0 1; do echo "@@RESULT run$h $(cat $D/hctx$h/run)"; done
exit $rc
"""


def test_two_queues(e2e: Harness) -> None:
    """With 2 queues and 2 vCPUs, fio jobs pinned to each CPU use both virtqueues."""
    disk = e2e.serve(e2e.image("disk.img", 64 * MiB), BlkOptions(num_queues=2))
    r = e2e.run(MULTIQUEUE_SCRIPT, [disk], smp=2)
    assert r.number("hctx") == 2
    assert r.results.get("cpus_0") == "0"
    assert r.results.get("cpus_1") == "1"
    assert r.number("fio_rc") == 0
    for q in (0, 1):
        runs = r.number(f"run{q}") - r.number(f"run{q}_before")
        assert runs > 100, f"hardware queue {q} dispatched {runs} times: {r.results}"


# -- 7. reboot -------------------------------------------------------------------------------

REBOOT_SCRIPT = """
header() {  # write one 512-byte header sector
    printf '%s\\n' "$1" > /tmp/hdr
    truncate -s 512 /tmp/hdr
    dd if=/tmp/hdr of=/dev/vda bs=512 count=1 oflag=direct conv=fsync 2>/dev/null
}
write_data() {  # write 4 MiB of random data at MiB offset $1, print its sha256
    dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
    dd if=/tmp/data of=/dev/vda bs=1M seek="$1" oflag=direct conv=fsync 2>/dev/null || exit 10
    sha256sum /tmp/data | cut -c1-64
}
read_data() {
    dd if=/dev/vda bs=1M skip="$1" count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-64
}
phase=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\\000' | head -n 1)
case "$phase" in
"")
    sum=$(write_data 1)
    header "PHASE1 $sum"
    echo "@@RESULT phase1_sha $sum"
    sync
    reboot -f
    ;;
"PHASE1 "*)
    echo "@@RESULT phase2_read $(read_data 1)"
    sum=$(write_data 5)
    echo "@@RESULT phase2_sha $sum"
    echo "@@RESULT phase2_reread $(read_data 5)"
    header "PHASE2 $sum"
    ;;
*)
    echo "@@RESULT phase unexpected"
    exit 1
    ;;
esac
"""


def test_reboot(e2e: Harness) -> None:
    """A guest reboot (device reset) keeps the disk working: data written before reads back."""
    image = e2e.image("disk.img", 16 * MiB)
    r = e2e.run(REBOOT_SCRIPT, [e2e.serve(image)], no_reboot=False)
    first = r.results.get("phase1_sha")
    assert first, "the first boot did not write its data"
    assert r.results.get("phase2_read") == first, "data changed across the reboot"
    assert r.results["phase2_reread"] == r.results["phase2_sha"]
    e2e.stop()
    header = read_range(image, 0, 512).rstrip(b"\0").decode()
    assert header == f"PHASE2 {r.results['phase2_sha']}\n"
    assert sha256(read_range(image, 1 * MiB, 4 * MiB)) == first
    assert sha256(read_range(image, 5 * MiB, 4 * MiB)) == r.results["phase2_sha"]


# -- 8. two disks ----------------------------------------------------------------------------

TWO_DISKS_SCRIPT = """
for d in vda vdb; do
    echo "@@RESULT size_$d $(blockdev --getsize64 /dev/$d)"
    dd if=/$d.bin of=/dev/$d bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null || exit 10
done
for d in vda vdb; do
    sum=$(dd if=/dev/$d bs=1M skip=1 count=2 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)
    echo "@@RESULT sha_$d $sum"
    dd if=/dev/$d bs=1M count=1 iflag=direct 2>/dev/null | cmp -s -n 1048576 - /dev/zero
    echo "@@RESULT zero_head_$d $?"
done
"""


def test_two_disks(e2e: Harness) -> None:
    """Two disks of different sizes on one guest are independent and both writable."""
    a_data, b_data = pattern(2 * MiB, seed=8), pattern(2 * MiB, seed=9)
    a = e2e.image("a.img", 64 * MiB)
    b = e2e.image("b.img", 24 * MiB)
    r = e2e.run(
        TWO_DISKS_SCRIPT,
        [e2e.serve(a), e2e.serve(b)],
        files={"vda.bin": a_data, "vdb.bin": b_data},
    )
    assert r.number("size_vda") == 64 * MiB
    assert r.number("size_vdb") == 24 * MiB
    assert r.results["sha_vda"] == sha256(a_data)
    assert r.results["sha_vdb"] == sha256(b_data)
    assert r.number("zero_head_vda") == 0
    assert r.number("zero_head_vdb") == 0
    e2e.stop()
    for image, data, size in ((a, a_data, 64 * MiB), (b, b_data, 24 * MiB)):
        assert image.stat().st_size == size
        assert read_range(image, 0, 1 * MiB) == bytes(1 * MiB)
        assert read_range(image, 1 * MiB, 2 * MiB) == data
        assert read_range(image, 3 * MiB, 1 * MiB) == bytes(1 * MiB)


# -- 9. root file system on a vhost-user disk ------------------------------------------------

WORKLOAD = """
echo "@@RESULT kernel $(uname -r)"
echo "written by the guest" > /from-guest
sync
"""


def test_root_on_vhost_user(e2e: Harness) -> None:
    """The kernel boots with root=/dev/vda on the back-end (the demo's setup)."""
    image = ensure_rootfs_image(e2e.tmp / "root.img", 32, files={"workload.sh": WORKLOAD.encode()})
    r = e2e.run(None, [e2e.serve(image)], append=["root=/dev/vda"])
    assert r.results.get("root") == "/dev/vda"
    assert r.results.get("kernel") == e2e.rig.kernel.release
    e2e.stop()
    fsck = host_tool("e2fsck", "-fn", str(image))
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    cat = host_tool("debugfs", "-R", "cat /from-guest", str(image))
    assert cat.stdout == b"written by the guest\n"


# -- 10. back-end restart --------------------------------------------------------------------

RESTART_SCRIPT = """
dd if=/a.bin of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null || exit 10
echo @@READY
sleep 5  # the host kills and restarts the back-end now
echo "@@RESULT a_after $(dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
dd if=/b.bin of=/dev/vda bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null || exit 11
echo "@@RESULT b_read $(dd if=/dev/vda bs=1M skip=4 count=2 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""


def test_backend_restart(e2e: Harness) -> None:
    """The back-end crashes and restarts on the same socket while the guest is idle; QEMU
    reconnects (chardev reconnect=1) and the guest's disk keeps working."""
    a_data, b_data = pattern(2 * MiB, seed=10), pattern(2 * MiB, seed=11)
    image = e2e.image("disk.img", 16 * MiB)
    disk = dataclasses.replace(e2e.serve(image), reconnect=1)
    guest = e2e.start_guest(RESTART_SCRIPT, [disk], files={"a.bin": a_data, "b.bin": b_data})
    e2e.wait_for_console(guest, "@@READY", timeout=90)
    e2e.restart(0)
    r = e2e.finish(guest)
    assert r.results.get("a_after") == sha256(a_data)
    assert r.results.get("b_read") == sha256(b_data)
    e2e.stop()
    assert read_range(image, 0, 2 * MiB) == a_data
    assert read_range(image, 4 * MiB, 2 * MiB) == b_data
