"""pyvirtio blk killed with SIGKILL in the middle of a guest's I/O, again and again.

QEMU reconnects (chardev ``reconnect=1``) and hands the new back-end the in-flight area it
keeps (INFLIGHT_SHMFD); the back-end resubmits what its predecessor had taken but not returned.
The guest's fio write + verify must end with zero errors, and the guest kernel must never log an
I/O error. qemu-storage-daemon is not run here: its in-flight tracking is switched off upstream,
so it cannot pass this test.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs.backends import BACKENDS, BlkOptions
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import Harness, harness_for

pytestmark = pytest.mark.e2e

MiB = 1 << 20

# Large writes, and a writethrough back-end that makes each wait for the host's disk: the
# back-end is nearly always holding requests, so the kills land among them.
CRASH_SCRIPT = """
echo @@READY
fio --name=crash --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=256k \\
    --iodepth=16 --size=96m --verify=crc32c --do_verify=1 --verify_fatal=1 \\
    > /tmp/fio.out 2>&1
rc=$?
cat /tmp/fio.out
echo "@@RESULT fio_rc $rc"
echo "@@RESULT fio_err $(grep -c 'err= *[1-9]' /tmp/fio.out)"
echo "@@RESULT io_errors $(dmesg | grep -c -i 'I/O error')"
dmesg | grep -i -E 'vda|virtio' | tail -n 20
exit $rc
"""


@pytest.fixture
def pyvirtio_e2e(rig: X86Guest, tmp_path: Path) -> Iterator[Harness]:
    with harness_for(rig, BACKENDS["pyvirtio"], tmp_path) as harness:
        yield harness


def _wait_serving(e2e: Harness, timeout: float = 30) -> bool:
    """Wait until QEMU has reconnected to the current back-end (it retries every second) and
    the back-end serves the queue again. Until then the in-flight area still shows what the
    previous back-end held, and a kill would land in the middle of QEMU's handshake, which
    QEMU 7.2 does not retry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "queue 0: started" in e2e.backends[0].log_text():
            return True
        time.sleep(0.05)
    return False


def _inflight_area(qemu_pid: int) -> mmap.mmap | None:
    """QEMU's copy of the in-flight area (it keeps the memfd the back-end gave it)."""
    fd_dir = Path(f"/proc/{qemu_pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if "pyvirtio-inflight" in target:
            with open(entry, "rb") as f:
                return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    return None


def _wait_holding(area: mmap.mmap, timeout: float = 20) -> bool:
    """Wait until the back-end holds a request it took and has not returned."""
    flags = memoryview(area)[16 : 16 + 16 * 1024 : 16]  # queue 0: DescStateSplit.inflight
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(flags):
                return True
        return False
    finally:
        flags.release()


def test_sigkill_mid_io_loses_nothing(pyvirtio_e2e: Harness) -> None:
    e2e = pyvirtio_e2e
    image = e2e.image("disk.img", 128 * MiB)
    disk = dataclasses.replace(e2e.serve(image, BlkOptions(writethrough=True)), reconnect=1)
    guest = e2e.start_guest(CRASH_SCRIPT, [disk])
    e2e.wait_for_console(guest, "@@READY", timeout=90)
    assert guest.pid is not None
    area = None
    kills = 0
    for _ in range(4):
        if not _wait_serving(e2e):
            break
        area = area or _inflight_area(guest.pid)
        assert area is not None, "QEMU holds no in-flight area: INFLIGHT_SHMFD not negotiated?"
        if not _wait_holding(area) or "@@RESULT fio_rc" in guest.console_text():
            break
        e2e.restart(0)  # SIGKILL while it holds requests, and a new back-end
        kills += 1
    result = e2e.finish(guest)
    if area is not None:
        area.close()
    assert kills == 4, f"fio ended after {kills} kills"
    assert result.number("fio_rc") == 0
    assert result.number("fio_err") == 0
    assert result.number("io_errors") == 0
    resubmitted = sum("resubmitting" in b.log_text() for b in e2e.backends + e2e.retired)
    print(f"{kills} kills; {resubmitted} restarts resubmitted requests left in flight")
    assert resubmitted >= 1, "no kill landed while the back-end held requests"


FLUSH_SCRIPT = """
i=1
while [ $i -le 400 ]; do
    yes "blk $(printf %08d $i)" | head -c 4096 > /tmp/b
    dd if=/tmp/b of=/dev/vda bs=4k seek=$i oflag=direct conv=fsync 2>/dev/null || exit 10
    echo "@@FLUSHED $i"
    i=$((i + 1))
done
"""


def _block(i: int) -> bytes:
    return (f"blk {i:08d}\n".encode() * 400)[:4096]


def test_every_flushed_write_survives_killing_backend_and_qemu(pyvirtio_e2e: Harness) -> None:
    """The guest writes numbered blocks, each followed by a flush, and says so after each; the
    back-end and QEMU are killed (SIGKILL) at a random moment. Every block the guest saw
    flushed is on the image afterwards. (The host's page cache outlives both processes, so this
    checks that no completion reaches the guest before its data reached the host kernel; that
    FLUSH and writethrough go on to fdatasync is checked by the unit tests. A power cut is not
    something a test here can simulate.)"""
    e2e = pyvirtio_e2e
    image = e2e.image("disk.img", 8 * MiB)
    guest = e2e.start_guest(FLUSH_SCRIPT, [e2e.serve(image)])
    e2e.wait_for_console(guest, "@@FLUSHED 20", timeout=90)
    time.sleep(random.Random(3).uniform(0.2, 1.5))
    e2e.backends[0].kill()
    guest.kill()
    flushed = [
        int(line.split()[1])
        for line in guest.console_text().splitlines()
        if line.startswith("@@FLUSHED ")
    ]
    assert flushed and flushed == list(range(1, len(flushed) + 1))
    last = flushed[-1]
    with image.open("rb") as f:
        for i in range(1, last + 1):
            f.seek(i * 4096)
            assert f.read(4096) == _block(i), f"block {i} was flushed but is not on the image"
    print(f"{last} flushed blocks all on the image")
