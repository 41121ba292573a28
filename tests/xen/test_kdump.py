"""A domU kernel crashes in the middle of disk I/O; its kdump kernel resets the disk and uses it.

The domU (Debian's arm64 kernel, unmodified) boots with ``crashkernel=``, loads itself as the
crash kernel (``kexec -p``, Debian's kexec-tools: :mod:`rigs.xen.kexec`) and writes to its
pyvirtio disk; then ``echo c > /proc/sysrq-trigger``. The kdump kernel's virtio_mmio probe
writes STATUS=0 while the old kernel's requests are still in flight (Linux 6.1's virtio bus has
no shutdown hook), which pyvirtio must answer only once the request in hand is done, without
touching the old rings afterwards; the kdump kernel then initialises the disk again, reads what
the old kernel wrote before the crash, and writes and reads back new data over the range the
old kernel was writing to. dom0 checks the image afterwards.

Two workarounds make kdump possible in a Xen/Arm domU at all, neither touching a kernel:

* The kdump kernel boots without Xen: its device tree (``kexec --dtb``) is the domU's own with
  the ``xen,xen`` compatible strings renamed, so it runs as a plain arm64 VM (console on the
  emulated SBSA UART, ``vuart = "sbsa_uart"``). A Xen-aware kdump kernel cannot start in a
  domU: Xen 4.17 on Arm refuses to map the shared_info page a second time while the crashed
  kernel's mapping is still there (XENMEM_add_to_physmap -EBUSY: ``kernel BUG at
  arch/arm64/xen/../../arm/xen/enlighten.c:475`` in xen_guest_init), and would then refuse to
  register vcpu_info again (VCPUOP_register_vcpu_info, BUG_ON in xen_starting_cpu). The virtio
  disk needs no Xen support in the guest: pyvirtio serves it over IOREQs either way.
* kexec-tools takes any system with /proc/xen for Xen's dom0 on arm64 (its xen_present() has
  no PV check there) and tries to load through the hypervisor; the domU runs it in a mount
  namespace whose /proc has only the files it reads.

The kdump kernel needs many seconds to boot and pyvirtio finishes the old kernel's requests in
milliseconds, so dom0 runs the daemon with its storage calls stalled on demand
(``rigs/stall.py run``: ``preadv``/``pwritev``/``fdatasync`` wait while a flag file exists), a
stalled disk: the domU sees its writes stop completing and crashes itself; dom0 lets the disk
go on once the daemon logs that the reset came while it was serving requests.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from rigs import stall
from rigs.initramfs import make_initramfs_with
from rigs.xen.build import XenRig
from rigs.xen.harness import SCRIPT_HEADER
from rigs.xen.kexec import domu_kexec_files

from tests.xen.conftest import Runner

pytestmark = pytest.mark.xen

STALL_FLAG = "/tmp/stall-io"
BACKEND = f"python3 /tmp/stall.py run {STALL_FLAG} pyvirtio xen -v"
STOPPED_LINE = "queue 0: stopping while it serves requests; they complete first"
CRASH_APPEND = "console=ttyAMA0 rdinit=/init rigs.script=kdump2 rigs.disks=1 nr_cpus=1 cma=0"

# Phase 1 (the domU's first kernel).
PHASE1 = r"""
dd if=/dev/urandom of=/tmp/pre bs=1M count=4 2>/dev/null
dd if=/tmp/pre of=/dev/vda bs=1M conv=fsync 2>/dev/null || fail "pre write"
result pre_md5 "$(md5sum </tmp/pre | cut -d' ' -f1)"
rm -f /tmp/pre
# The kdump kernel's device tree: this one without "xen,xen" (it boots as a plain VM).
hexdump -v -e '/1 "%02x "' /sys/firmware/fdt \
    | sed 's/78 65 6e 2c 78 65 6e /78 65 6e 2c 78 78 78 /g' | tr -d ' ' | xxd -r -p >/tmp/kdump.dtb
result dtb_xen_left "$(grep -c 'xen,xen' /tmp/kdump.dtb)"
# kexec in a /proc without /proc/xen (else it loads through the hypervisor, as in dom0).
mkdir -p /tmp/proc
cat >/tmp/kexec-load.sh <<'EOF'
mount -t proc proc /tmp/proc || exit 90
mount -t tmpfs none /proc || exit 91
for f in iomem cmdline kallsyms kcore cpuinfo stat meminfo; do
    : >/proc/$f
    mount --bind /tmp/proc/$f /proc/$f || exit 92
done
exec kexec -p /boot/Image.gz --initrd=/boot/crash.cpio --dtb=/tmp/kdump.dtb --append="@APPEND@"
EOF
unshare -m sh /tmp/kexec-load.sh
result kexec_rc $?
result crash_loaded "$(cat /sys/kernel/kexec_crash_loaded)"
[ "$(cat /sys/kernel/kexec_crash_loaded)" = 1 ] || fail "no crash kernel loaded"
# Four writers over 16-48 MiB, buffered: writeback keeps many requests in flight.
for i in 0 1 2 3; do
    (while :; do
        dd if=/dev/zero of=/dev/vda bs=1M count=8 seek=$((16 + i * 8)) conv=fsync 2>/dev/null
    done) &
done
n=0
while :; do
    set -- $(cat /sys/block/vda/stat)
    [ "$9" -gt 0 ] && break
    n=$((n + 1))
    [ $n -gt 600 ] && fail "no I/O in flight"
    usleep 100000
done
result io_running 1
# dom0 stalls the disk now: crash once no write completed for 2 s with writes in flight.
last=-1 still=0 n=0
while [ $still -lt 8 ]; do
    usleep 250000
    set -- $(cat /sys/block/vda/stat)
    if [ "$5" = "$last" ] && [ "$9" -gt 0 ]; then still=$((still + 1)); else still=0; fi
    last=$5
    n=$((n + 1))
    [ $n -gt 2400 ] && fail "the disk never stalled"
done
result crash_inflight "$9"
result crashing 1
echo c >/proc/sysrq-trigger
result survived_crash 1
""".replace("@APPEND@", CRASH_APPEND)

# Phase 2 (the kdump kernel, /tests/kdump2.sh of its own initramfs; console: the vuart).
PHASE2 = r"""
result kdump "$([ -e /proc/vmcore ] && echo 1 || echo 0)"
result elfcorehdr "$(dmesg | grep -c 'for elfcorehdr')"  # arm64: from /chosen, not the command line
result xen "$(cat /sys/hypervisor/type 2>/dev/null || echo none)"
dmesg | grep -i -E 'virtio|vda|command line|elfcorehdr' | sed 's/^/kdump-dmesg| /'
result pre_read "$(dd if=/dev/vda bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/new bs=1M count=8 2>/dev/null
dd if=/tmp/new of=/dev/vda bs=1M seek=16 conv=fsync 2>/dev/null || fail "new write"
result new_md5 "$(md5sum </tmp/new | cut -d' ' -f1)"
sync
echo 3 >/proc/sys/vm/drop_caches
result new_read "$(dd if=/dev/vda bs=1M skip=16 count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
result io_errors "$(dmesg | grep -c -i 'I/O error')"
"""

DOM0 = r"""
wait_file() {  # FILE PATTERN SECONDS: until FILE has a line matching PATTERN
    _n=0
    until grep -q -- "$2" "$1" 2>/dev/null; do
        _n=$((_n + 1))
        [ $_n -gt $(($3 * 10)) ] && return 1
        usleep 100000
    done
}
report() {
    domu_console d1 | tail -n 80
    tr -d '\r' <"$VUART" 2>/dev/null | sed 's/^/kdump| /'
    domu_results d1
    tr -d '\r' <"$VUART" 2>/dev/null \
        | sed -n 's/^.*@@GUEST \([^ ]*\) *\(.*\)$/@@RESULT kdump.\1 \2/p'
    backend_log
}
backend_start
make_disk /tmp/a.img 64
DOMU_MEMORY=512
DOMU_EXTRA="quiet crashkernel=128M cma=0"
domu_config d1 kdump1 "$(vdisk xvda /tmp/a.img)"
echo 'vuart = "sbsa_uart"' >>/etc/xen/d1.cfg
echo 'on_reboot = "destroy"' >>/etc/xen/d1.cfg
LOG=$CONSOLE_DIR/guest-d1.log
VUART=$CONSOLE_DIR/guest-d1-vuart0.log
domu_create d1 || { backend_log; fail "xl create"; }
wait_file "$LOG" '@@GUEST io_running' 300 || { report; fail "no I/O in the domU"; }
touch @FLAG@
n=0
until [ -e @FLAG@.held ]; do
    n=$((n + 1))
    [ $n -gt 600 ] && { report; fail "no storage call held"; }
    usleep 100000
done
result dom0.stalled 1
wait_file "$LOG" '@@GUEST crashing' 120 || { report; fail "the domU did not crash"; }
t0=$(now)
wait_file "$BACKEND_LOG" '@STOPPED@' 300 || { report; fail "no reset while serving requests"; }
result dom0.reset_after_s "$(elapsed "$t0")"
rm -f @FLAG@
wait_file "$VUART" '@@GUEST-EXIT' 300 || { report; fail "the kdump kernel did not finish"; }
result kdump.exit "$(tr -d '\r' <"$VUART" | sed -n 's/.*@@GUEST-EXIT \(-\{0,1\}[0-9]*\).*/\1/p' | tail -n 1)"
n=0
while domu_exists d1 && [ $n -lt 30 ]; do n=$((n + 1)); sleep 1; done
domu_exists d1 && { result dom0.domu_left 1; xl destroy d1; }
backend_alive && result backend.after 1 || result backend.after 0
result dom0.pre_md5 "$(dd if=/tmp/a.img bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)"
result dom0.new_md5 "$(dd if=/tmp/a.img bs=1M skip=16 count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
report
""".replace("@FLAG@", STALL_FLAG).replace("@STOPPED@", STOPPED_LINE)


def _domu_files(rig: XenRig, workdir: Path) -> dict[str, bytes]:
    """kexec, the kernel (gzip: kexec-tools unpacks it) and the kdump kernel's initramfs."""
    workdir.mkdir(parents=True, exist_ok=True)
    crash = make_initramfs_with(
        rig.domu_initrd,
        {"tests/kdump2.sh": (SCRIPT_HEADER + PHASE2 + "\n").encode()},
        workdir / "crash.cpio",
    )
    return {
        **domu_kexec_files(rig),
        "boot/Image.gz": gzip.compress(rig.image.read_bytes(), 6),
        "boot/crash.cpio": crash.read_bytes(),
    }


def test_kdump_resets_disk_with_requests_in_flight(
    xen_run: Runner, xen_rig: XenRig, tmp_path: Path
) -> None:
    source = Path(stall.__file__).read_text()
    dom0 = f"cat >/tmp/stall.py <<'PYEOF'\n{source}\nPYEOF\n{DOM0}"
    result = xen_run(
        dom0,
        {"kdump1": PHASE1},
        backend=BACKEND,
        domu_files=_domu_files(xen_rig, tmp_path / "kdump"),
    )
    r = result.results
    console = result.console
    # Phase 1: crash kernel loaded, writes in flight when the kernel crashed.
    assert r["d1.crash_loaded"] == "1", r
    assert r["d1.dtb_xen_left"] == "0", r
    assert int(r["d1.crash_inflight"]) > 0, r
    assert "d1.survived_crash" not in r, r
    assert "Kernel panic - not syncing: sysrq triggered crash" in console
    assert "Starting crashdump kernel" in console
    # The reset came while the daemon served the old kernel's requests (held in storage).
    assert r["dom0.stalled"] == "1", r
    assert "dom0.reset_after_s" in r, r
    assert STOPPED_LINE in console
    # Phase 2: a kdump kernel (without Xen) re-initialised the disk and used it.
    assert r["kdump.exit"] == "0", r
    assert r["kdump.kdump"] == "1", r
    assert r["kdump.elfcorehdr"] == "1", r
    assert r["kdump.xen"] == "none", r
    assert r["kdump.pre_read"] == r["d1.pre_md5"], r
    assert r["kdump.new_read"] == r["kdump.new_md5"], r
    assert r["kdump.io_errors"] == "0", r
    # dom0's image: nothing of the old kernel's requests landed after the kdump kernel's.
    assert r["dom0.pre_md5"] == r["d1.pre_md5"], r
    assert r["dom0.new_md5"] == r["kdump.new_md5"], r
    assert r.get("backend.after") == "1", r
    assert "dom0.domu_left" not in r, r
