"""pyvirtio xen serving virtio-mmio disks to an unmodified domU, configured by xl.

dom0 runs the backend (``PYVIRTIO_XEN_BACKEND``), makes raw images in its RAM, creates domUs
with ``backendtype=standalone, specification=virtio`` disks, and checks the images after the
domU is gone. Keys in the results: ``<domU>.<key>`` come from the domU, ``dom0.*`` from dom0.
"""

from __future__ import annotations

import json
import re

import pytest
from rigs.qemu import GuestResult

from tests.xen.conftest import Runner

pytestmark = pytest.mark.xen

MIB = 1 << 20

# domU: write 4 MiB of random data at 56 MiB on DEV, read it back uncached, compare; report
# its md5 (dom0 compares the image) and the device's size and read-only flag.
PATTERN = r"""
pattern() {  # DEV KEY: random 4 MiB at offset 56 MiB, read back past the page cache
    dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
    dd if=/tmp/pat of="$1" bs=1M seek=56 conv=fsync 2>/dev/null || fail "$2: write failed"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    dd if="$1" of=/tmp/back bs=1M skip=56 count=4 2>/dev/null || fail "$2: read failed"
    a=$(md5sum </tmp/pat | cut -d' ' -f1)
    b=$(md5sum </tmp/back | cut -d' ' -f1)
    result "$2.pattern_md5" "$a"
    [ "$a" = "$b" ] && result "$2.pattern_ok" 1 || result "$2.pattern_ok" 0
}
describe() {  # NAME: size and ro flag of /dev/NAME
    result "$1.size" "$(blockdev --getsize64 /dev/$1)"
    result "$1.ro" "$(cat /sys/block/$1/ro)"
}
"""

# domU: pattern I/O, then ext4 on the first 48 MiB: write files, fsck, remount, verify.
DOMU_FS = (
    PATTERN
    + r"""
describe vda
pattern /dev/vda vda
mkfs.ext4 -F -q -E nodiscard /dev/vda 48M || fail "mkfs.ext4"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || fail "mount"
echo "hello from the domU" >/mnt/hello.txt
dd if=/dev/urandom of=/mnt/big.bin bs=1M count=3 2>/dev/null
result big_md5 "$(md5sum </mnt/big.bin | cut -d' ' -f1)"
umount /mnt || fail "umount"
e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1
result fsck $?
sed 's/^/fsck| /' /tmp/fsck.log
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/vda /mnt || fail "remount"
result big_md5_again "$(md5sum </mnt/big.bin | cut -d' ' -f1)"
result hello "$(cat /mnt/hello.txt)"
umount /mnt
"""
)

# dom0: what the image holds after the domU is gone.
DOM0_CHECK_IMAGE = r"""
check_image() {  # IMG KEY: pattern md5, e2fsck, files through debugfs
    result "dom0.$2.pattern_md5" "$(dd if="$1" bs=1M skip=56 count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
    e2fsck -fn "$1" >/tmp/fsck0.log 2>&1
    result "dom0.$2.fsck" $?
    sed 's/^/dom0-fsck| /' /tmp/fsck0.log
    result "dom0.$2.hello" "$(debugfs -R 'cat /hello.txt' "$1" 2>/dev/null)"
    debugfs -R 'dump /big.bin /tmp/big.bin' "$1" >/dev/null 2>&1
    result "dom0.$2.big_md5" "$(md5sum </tmp/big.bin | cut -d' ' -f1)"
}
backend_check() {  # KEY: is the daemon still running
    backend_alive && result "backend.$1" 1 || result "backend.$1" 0
}
"""


def _assert_fs(r: dict[str, str], dom: str, key: str) -> None:
    """The domU's I/O checks passed and dom0 sees the same bytes and files."""
    assert r[f"{dom}.exit"] == "0", r
    assert r[f"{dom}.vda.size"] == str(64 * MIB), r
    assert r[f"{dom}.vda.ro"] == "0", r
    assert r[f"{dom}.vda.pattern_ok"] == "1", r
    assert r[f"{dom}.fsck"] == "0", r
    assert r[f"{dom}.big_md5_again"] == r[f"{dom}.big_md5"], r
    assert r[f"{dom}.hello"] == "hello from the domU", r
    assert r[f"dom0.{key}.pattern_md5"] == r[f"{dom}.vda.pattern_md5"], r
    assert r[f"dom0.{key}.fsck"] == "0", r
    assert r[f"dom0.{key}.hello"] == "hello from the domU", r
    assert r[f"dom0.{key}.big_md5"] == r[f"{dom}.big_md5"], r


def _backend_ok(result: GuestResult, *keys: str) -> None:
    for key in keys:
        assert result.results.get(f"backend.{key}") == "1", (
            f"the pyvirtio daemon was not running at {key}"
        )


def test_read_write_and_ext4(xen_run: Runner) -> None:
    """(a) The domU reads and writes /dev/vda, makes and checks ext4; dom0 sees it all."""
    dom0 = (
        DOM0_CHECK_IMAGE
        + r"""
backend_start
make_disk /tmp/a.img 64
domu_run d1 fs 600 "$(vdisk xvda /tmp/a.img)"
rc=$?
backend_check after_domu
check_image /tmp/a.img a
backend_log
exit $rc
"""
    )
    result = xen_run(dom0, {"fs": DOMU_FS})
    _assert_fs(result.results, "d1", "a")
    _backend_ok(result, "after_domu")
    # dom0's kernel (Debian's 6.1) has no privcmd ioeventfd: the IOREQ thread serves every
    # QueueNotify and set_irq_level raises every interrupt.
    assert "notifications through the IOREQ thread and set_irq_level (privcmd: ENOTTY)" in (
        result.console
    )
    stats = re.search(r"backend\| .*: stats (\{.*\})$", result.console, re.MULTILINE)
    assert stats, "the daemon did not report its statistics"
    figures = json.loads(stats.group(1))
    assert figures["ioreq"]["served"]["notify"] > 0 and figures["ioreq"]["kernel"] == 0, figures
    assert figures["ioreq"]["outwaits"] == 0, figures  # no kernel handler to wait out
    assert figures["interrupts"]["raised"] > 0 and not figures["interrupts"]["irqfd"], figures


DOMU_BUSY = r"""
result busy 1
i=0
while :; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=$((i % 64 * 16)) conv=fsync 2>/dev/null
    dd if=/dev/vda of=/dev/null bs=64k count=16 skip=$((i % 64 * 16)) 2>/dev/null
    i=$((i + 1))
    [ $((i % 8)) -eq 0 ] && result busy_rounds "$i"
done
"""


def test_destroy_mid_io_then_recreate(xen_run: Runner) -> None:
    """(b) xl destroy while the domU does I/O: the daemon survives; the domU can be created
    again and its disk works."""
    dom0 = (
        DOM0_CHECK_IMAGE
        + r"""
backend_start
make_disk /tmp/a.img 64
domu_config d1 busy "$(vdisk xvda /tmp/a.img)"
domu_create d1 || { backend_log; fail "xl create (busy)"; }
n=0
until grep -q '@@GUEST busy_rounds' "$CONSOLE_DIR/guest-d1.log" 2>/dev/null; do
    n=$((n + 1))
    [ "$n" -gt 3000 ] && { domu_console d1; backend_log; fail "the domU never got busy"; }
    usleep 100000
done
xs_dump /local/domain/0/backend/virtio_disk
xs_dump "/local/domain/$(xl domid d1)/device/virtio_disk"
sleep 2
t0=$(now)
xl destroy d1
result destroy.rc $?
result destroy.s "$(elapsed "$t0")"
domu_console d1 | tail -n 5
sleep 5
backend_check after_destroy
xs_dump /local/domain/0/backend
domu_run d1 fs 600 "$(vdisk xvda /tmp/a.img)"
rc=$?
backend_check after_recreate
check_image /tmp/a.img a
backend_log
exit $rc
"""
    )
    result = xen_run(dom0, {"busy": DOMU_BUSY, "fs": DOMU_FS})
    r = result.results
    assert r["destroy.rc"] == "0", r
    _backend_ok(result, "after_destroy", "after_recreate")
    _assert_fs(r, "d1", "a")


DOMU_TWO = (
    PATTERN
    + r"""
describe vda
describe vdb
pattern /dev/vda vda
pattern /dev/vdb vdb
result vdb.head_md5 "$(dd if=/dev/vdb bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
"""
)


def test_two_disks(xen_run: Runner) -> None:
    """(c) Two disks on one domU (xvda 64 MiB, xvdb 96 MiB, both rw) are distinct devices
    with their own data; dom0 finds each domU write in the right image."""
    dom0 = r"""
backend_start
make_disk /tmp/a.img 64
make_disk /tmp/b.img 96
dd if=/dev/urandom of=/tmp/b.img bs=1M count=8 conv=notrunc 2>/dev/null
result dom0.b.head_md5 "$(dd if=/tmp/b.img bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
domu_run d2 two 600 "$(vdisk xvda /tmp/a.img)" "$(vdisk xvdb /tmp/b.img)"
rc=$?
for img in a b; do
    result "dom0.$img.pattern_md5" "$(dd if=/tmp/$img.img bs=1M skip=56 count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
done
backend_alive && result backend.after_domu 1 || result backend.after_domu 0
backend_log
exit $rc
"""
    result = xen_run(dom0, {"two": DOMU_TWO})
    r = result.results
    assert r["d2.exit"] == "0", r
    assert r["d2.vda.size"] == str(64 * MIB), r
    assert r["d2.vdb.size"] == str(96 * MIB), r
    assert r["d2.vda.ro"] == "0" and r["d2.vdb.ro"] == "0", r
    assert r["d2.vda.pattern_ok"] == "1" and r["d2.vdb.pattern_ok"] == "1", r
    assert r["d2.vda.pattern_md5"] != r["d2.vdb.pattern_md5"], r
    assert r["dom0.a.pattern_md5"] == r["d2.vda.pattern_md5"], r
    assert r["dom0.b.pattern_md5"] == r["d2.vdb.pattern_md5"], r
    assert r["d2.vdb.head_md5"] == r["dom0.b.head_md5"], r
    _backend_ok(result, "after_domu")


DOMU_RO = r"""
result vda.ro "$(cat /sys/block/vda/ro)"
result vda.getro "$(blockdev --getro /dev/vda)"
result vda.size "$(blockdev --getsize64 /dev/vda)"
result vda.head_md5 "$(dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/tmp/dd.err; then
    result write_refused 0
else
    result write_refused 1
    result write_error "$(head -n 1 /tmp/dd.err)"
fi
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt 2>/dev/null; then umount /mnt; fi
"""


def test_read_only_disk(xen_run: Runner) -> None:
    """(d) access=ro: the domU sees a read-only disk with dom0's data, and writes fail; the
    image is unchanged afterwards."""
    dom0 = r"""
backend_start
make_disk /tmp/r.img 32
dd if=/dev/urandom of=/tmp/r.img bs=1M count=8 conv=notrunc 2>/dev/null
before=$(md5sum </tmp/r.img | cut -d' ' -f1)
result dom0.head_md5 "$(dd if=/tmp/r.img bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
domu_run d3 ro 600 "$(vdisk xvda /tmp/r.img ro)"
rc=$?
after=$(md5sum </tmp/r.img | cut -d' ' -f1)
[ "$before" = "$after" ] && result dom0.unchanged 1 || result dom0.unchanged 0
backend_alive && result backend.after_domu 1 || result backend.after_domu 0
backend_log
exit $rc
"""
    result = xen_run(dom0, {"ro": DOMU_RO})
    r = result.results
    assert r["d3.exit"] == "0", r
    assert r["d3.vda.ro"] == "1", r
    assert r["d3.vda.getro"] == "1", r
    assert r["d3.vda.size"] == str(32 * MIB), r
    assert r["d3.vda.head_md5"] == r["dom0.head_md5"], r
    assert r["d3.write_refused"] == "1", r
    assert r["dom0.unchanged"] == "1", r
    _backend_ok(result, "after_domu")
