"""A guest kernel crashes in the middle of disk I/O; its kdump kernel resets the disk and uses it.

The unmodified Debian guest kernel boots with ``crashkernel=``, loads itself as the crash
kernel (``kexec -p``, kexec-tools from Debian: :mod:`rigs.kexec`) and runs fio against the
pyvirtio disk; then ``echo c > /proc/sysrq-trigger``. The kdump kernel boots from the reserved
memory with its own small initramfs, and its virtio_mmio probe writes STATUS=0 while the old
kernel's requests are still in flight (Linux 6.1's virtio bus has no shutdown hook: nothing
quiesced the device); QEMU's vhost-user-blk stops the back-end's queue (GET_VRING_BASE), which
must finish the request in hand and then leave the old rings alone. The kdump kernel then
initialises the device again, reads what the old kernel wrote before the crash, and writes
and reads back new data over the range the old kernel's fio was writing to.

The kdump kernel needs ~2 s to reach its disk under TCG and the back-end finishes the old
kernel's requests in milliseconds, so the back-end runs with its storage calls stalled on
demand (:mod:`rigs.stall`: ``preadv``/``pwritev``/``fdatasync`` wait while a flag file
exists), a stalled disk: the host stalls it while fio runs, the guest sees its writes stop
completing and crashes itself, and the host lets the disk go on once the back-end has logged
that the reset came while it was serving requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs import stall
from rigs.backends import BlkOptions, Pyvirtio
from rigs.initramfs import ensure_initramfs, make_initramfs_with
from rigs.kexec import ensure_kexec_tools
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import Harness, harness_for, wait_until

pytestmark = pytest.mark.e2e

MiB = 1 << 20
CRASHKERNEL = "crashkernel=160M"
GUEST_MEMORY_MIB = 768
# The kdump kernel's initramfs: busybox, the virtio modules and these host tools (no fio:
# its libraries would make the archive ~90 MB, too big for the reserved memory).
CRASH_TOOLS = ("dash", "dd", "sync", "sha256sum", "cmp", "blockdev")
CRASH_APPEND = (
    "console=ttyS0 tsc_early_khz=2000000 panic=-1 reboot=t nr_cpus=1 irqpoll reset_devices "
    "rigs.disks=1 rigs.kdump=1"
)
STOPPED_LINE = "queue 0: stopping while it serves requests; they complete first"

# Phase 1 (the first kernel): data the kdump kernel will read back, the crash kernel loaded,
# fio writing at 16-80 MiB; once no write completed for 1 s with writes in flight (the host
# stalled the back-end's storage), crash.
PHASE1 = f"""
dd if=/dev/urandom of=/tmp/pre bs=1M count=4 2>/dev/null
dd if=/tmp/pre of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null || exit 10
echo "@@RESULT pre_sha $(sha256sum </tmp/pre | cut -c1-64)"
rm -f /tmp/pre
kexec -p /boot/vmlinuz --initrd=/boot/crash.cpio --append="{CRASH_APPEND}" || exit 11
echo "@@RESULT crash_loaded $(cat /sys/kernel/kexec_crash_loaded)"
echo "@@RESULT crash_size $(cat /sys/kernel/kexec_crash_size)"
fio --name=busy --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=256k \\
    --iodepth=32 --offset=16m --size=64m --time_based --runtime=300 >/tmp/fio.out 2>&1 &
ticks=0
while :; do
    set -- $(cat /sys/block/vda/stat)
    [ "$9" -gt 0 ] && break
    ticks=$((ticks + 1))
    [ $ticks -gt 600 ] && {{ cat /tmp/fio.out; exit 12; }}
    usleep 100000
done
echo @@IO-RUNNING
last=-1 still=0 ticks=0
while [ $still -lt 4 ]; do
    usleep 250000
    set -- $(cat /sys/block/vda/stat)
    if [ "$5" = "$last" ] && [ "$9" -gt 0 ]; then still=$((still + 1)); else still=0; fi
    last=$5
    ticks=$((ticks + 1))
    [ $ticks -gt 1200 ] && {{ echo "@@RESULT never_stalled 1"; exit 13; }}
done
echo "@@RESULT crash_inflight $9"
echo "@@RESULT crash_writes_done $5"
echo @@CRASHING
echo c > /proc/sysrq-trigger
echo "@@RESULT survived_crash 1"
exit 14
"""

# Phase 2 (the kdump kernel, /test.sh of its own initramfs).
PHASE2 = """
echo "@@RESULT kdump $([ -e /proc/vmcore ] && echo 1 || echo 0)"
echo "@@RESULT elfcorehdr $(grep -c elfcorehdr= /proc/cmdline)"
dmesg | grep -i -E 'virtio|vda|command line' | sed 's/^/kdump-dmesg| /'
echo "@@RESULT pre_read $(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
dd if=/dev/urandom of=/tmp/new bs=1M count=8 2>/dev/null
dd if=/tmp/new of=/dev/vda bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null || exit 20
echo "@@RESULT new_sha $(sha256sum </tmp/new | cut -c1-64)"
echo "@@RESULT new_read $(dd if=/dev/vda bs=1M skip=16 count=8 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
sync
echo "@@RESULT io_errors $(dmesg | grep -c -i 'I/O error')"
"""


class StalledPyvirtio(Pyvirtio):
    """pyvirtio blk whose storage calls wait while the file ``flag`` exists (rigs/stall.py)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        python, dash_m, module, *args = super().command(image, socket, options)
        assert (dash_m, module) == ("-m", "pyvirtio")
        return stall.command(python, str(self.flag), module, *args)


@pytest.fixture
def stalled_e2e(rig: X86Guest, tmp_path: Path) -> Iterator[Harness]:
    """A harness whose back-end is :class:`StalledPyvirtio` (flag: ``tmp_path/stall``)."""
    with harness_for(rig, StalledPyvirtio(tmp_path / "stall"), tmp_path) as harness:
        yield harness


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _sha256(path: Path, offset: int, length: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def test_kdump_resets_disk_with_requests_in_flight(stalled_e2e: Harness) -> None:
    e2e = stalled_e2e
    kernel = e2e.rig.kernel
    crash_base = ensure_initramfs(kernel, CRASH_TOOLS, compress=True, name="kdump-initramfs")
    crash_initrd = make_initramfs_with(
        crash_base, {"test.sh": PHASE2.encode()}, e2e.tmp / "crash.cpio.gz", compress=True
    )
    files = {
        **ensure_kexec_tools().initramfs_files(),
        "boot/vmlinuz": kernel.vmlinuz.read_bytes(),
        "boot/crash.cpio": crash_initrd.read_bytes(),
    }
    flag = e2e.tmp / "stall"
    held = e2e.tmp / "stall.held"
    image = e2e.image("disk.img", 128 * MiB)
    disk = e2e.serve(image, BlkOptions(writethrough=True))
    backend = e2e.backends[0]
    guest = e2e.start_guest(
        PHASE1, [disk], files=files, append=[CRASHKERNEL], memory_mib=GUEST_MEMORY_MIB
    )
    e2e.wait_for_console(guest, "@@IO-RUNNING", timeout=120)
    try:
        flag.touch()  # the disk stalls: the back-end's next storage call waits
        wait_until("a storage call of the back-end held", held.exists, 30)
        e2e.wait_for_console(guest, "@@CRASHING", timeout=60)
        # The kdump kernel boots; its virtio_mmio probe resets the device (QEMU: GET_VRING_BASE)
        # while the back-end's worker waits in the middle of an old request.
        wait_until(
            f"{STOPPED_LINE!r} in the back-end's log after the crash",
            lambda: STOPPED_LINE in backend.log_text() or not guest.running(),
            120,
            lambda: (
                f"guest console:\n{_tail(guest.console_text())}\n"
                f"back-end log:\n{_tail(backend.log_text())}"
            ),
        )
        log_at_reset = backend.log_text()
    finally:
        flag.unlink(missing_ok=True)  # the disk comes back
    result = e2e.finish(guest)
    console = result.console
    print("\n".join(line for line in backend.log_text().splitlines() if "queue" in line))

    # Phase 1: the crash kernel was loaded and the crash came with writes in flight.
    assert result.number("crash_loaded") == 1
    assert result.number("crash_inflight") > 0
    assert "Kernel panic - not syncing: sysrq triggered crash" in console
    assert "survived_crash" not in result.results
    # The reset came while the back-end served the old kernel's requests.
    assert STOPPED_LINE in log_at_reset, f"no {STOPPED_LINE!r} at the reset:\n{log_at_reset}"
    # Phase 2: a kdump kernel, which re-initialised the disk and used it.
    assert result.number("kdump") == 1, "phase 2 did not run in a kdump kernel"
    assert result.number("elfcorehdr") == 1
    assert result.results["pre_read"] == result.results["pre_sha"]
    assert result.results["new_read"] == result.results["new_sha"]
    assert result.number("io_errors") == 0
    e2e.stop()
    # Nothing of the old kernel's requests landed after the kdump kernel's writes.
    assert _sha256(image, 0, 4 * MiB) == result.results["pre_sha"]
    assert _sha256(image, 16 * MiB, 8 * MiB) == result.results["new_sha"]
