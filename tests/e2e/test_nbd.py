"""End-to-end: an unmodified guest on qcow2 images served by qemu-nbd through ``pyvirtio blk
--nbd``.

The data checks are the raw suite's own guest scripts (tests/e2e/test_vhost_user_blk.py); the
host then reads the qcow2 back with qemu-img. The last test restarts qemu-nbd (SIGKILL, then
started again) in the middle of the guest's I/O: the daemon must survive and reconnect, and
whatever the guest had flushed must be in the qcow2 afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs.backends import BACKENDS, BlkOptions
from rigs.nbd import NbdServer, PyvirtioNbd, qemu_img, qemu_nbd
from rigs.qemu import VhostUserBlk
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import Harness, harness_for
from tests.e2e.test_vhost_user_blk import (
    DISCARD_SCRIPT,
    EXT4_SCRIPT,
    FIO_JOBS,
    FIO_SCRIPT,
    host_tool,
    pattern,
    read_range,
    sha256,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20
#: pyvirtio's --nbd-timeout in these tests: longer than a qemu-nbd restart takes.
NBD_TIMEOUT = 15.0


class NbdRig:
    """qcow2 images, each served by its own qemu-nbd and ``pyvirtio blk --nbd``."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.servers: list[NbdServer] = []

    def qcow2(self, name: str, size: int) -> Path:
        path = self.h.tmp / name
        out = qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
        assert out.returncode == 0, out.stderr
        return path

    def serve(self, image: Path) -> tuple[VhostUserBlk, NbdServer]:
        server = qemu_nbd(image, self.h.sockdir / f"{image.stem}.nbd")
        server.log_path = self.h.tmp / f"{image.stem}.qemu-nbd.log"
        self.servers.append(server.start())
        backend = PyvirtioNbd(server, timeout=NBD_TIMEOUT).start(
            image,
            self.h.sockdir / f"{image.stem}.sock",
            BlkOptions(),
            log_path=self.h.tmp / f"{image.stem}.backend.log",
        )
        self.h.backends.append(backend)
        return VhostUserBlk(backend.socket), server

    def stop(self) -> None:
        """Stop the back-ends (they flush), then the servers (they close the qcow2 cleanly)."""
        self.h.stop()
        for server in self.servers:
            status = server.stop()
            assert status == 0, f"qemu-nbd exited with {status}:\n{server.log()}"

    def host_view(self, image: Path) -> Path:
        """The qcow2, checked by qemu-img and converted to a raw file to read."""
        check = qemu_img("check", str(image))
        # 0: clean; 3: leaked clusters only (what a killed qemu-nbd may leave), no corruption.
        assert check.returncode in (0, 3), check.stdout + check.stderr
        raw = image.with_suffix(".raw")
        out = qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
        assert out.returncode == 0, out.stderr
        return raw


@pytest.fixture
def nbd(rig: X86Guest, tmp_path: Path) -> Iterator[NbdRig]:
    with harness_for(rig, BACKENDS["pyvirtio"], tmp_path) as harness:
        nbd_rig = NbdRig(harness)
        try:
            yield nbd_rig
        finally:
            for server in nbd_rig.servers:
                server.kill()


def test_nbd_ext4(nbd: NbdRig) -> None:
    """mkfs.ext4, write a file, fsck in the guest; the qcow2 holds a clean file system."""
    image = nbd.qcow2("ext4.qcow2", 64 * MiB)
    disk, _ = nbd.serve(image)
    r = nbd.h.run(EXT4_SCRIPT, [disk])
    assert r.number("fsck") == 0
    nbd.stop()
    raw = nbd.host_view(image)
    fsck = host_tool("e2fsck", "-fn", str(raw))
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    cat = host_tool("debugfs", "-R", "cat /file", str(raw))
    assert len(cat.stdout) == 40 * 64 * 1024
    assert sha256(cat.stdout) == r.results["sha"]


def test_nbd_fio_verify(nbd: NbdRig) -> None:
    """fio random writes with crc32c verification at 512 B to 1 MiB."""
    disk, _ = nbd.serve(nbd.qcow2("fio.qcow2", 64 * MiB))
    r = nbd.h.run(FIO_SCRIPT, [disk], files={"verify.fio": FIO_JOBS.encode()})
    assert (r.number("fio_rc"), r.number("jobs"), r.number("jobs_ok")) == (0, 4, 4)
    nbd.stop()


def test_nbd_discard_and_write_zeroes(nbd: NbdRig) -> None:
    """The pattern reads back, write-zeroes reads as zeros, and the guest's discard reaches
    the qcow2 through NBD trim (the clusters are no longer allocated)."""
    data = pattern(16 * MiB, seed=4)
    image = nbd.qcow2("discard.qcow2", 64 * MiB)
    disk, _ = nbd.serve(image)
    r = nbd.h.run(DISCARD_SCRIPT, [disk], files={"pattern": data})
    assert r.number("discard_max") > 0 and r.number("zeroes_max") > 0
    assert (r.number("discard_rc"), r.number("zeroout_rc"), r.number("guest_zeroes")) == (0, 0, 0)
    nbd.stop()
    raw = nbd.host_view(image)
    for start, end in ((0, 2), (6, 8), (12, 16)):
        assert read_range(raw, start * MiB, (end - start) * MiB) == data[start * MiB : end * MiB]
    assert read_range(raw, 2 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert read_range(raw, 8 * MiB, 4 * MiB) == bytes(4 * MiB)
    out = qemu_img("map", "--output=json", "-f", "qcow2", str(image))
    assert out.returncode == 0, out.stderr
    for extent in json.loads(out.stdout):
        lo, hi = extent["start"], extent["start"] + extent["length"]
        if lo < 6 * MiB and hi > 2 * MiB:  # overlaps the discarded range
            assert not extent["data"], f"discarded range still allocated: {extent}"


RESTART_SCRIPT = """
dd if=/a.bin of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null || exit 10
echo @@READY
# Write and flush for a while: the host kills qemu-nbd and starts it again meanwhile.
end=$(( $(date +%s) + 10 ))
loops=0; failures=0
while [ "$(date +%s)" -lt "$end" ]; do
    dd if=/b.bin of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || failures=$((failures + 1))
    loops=$((loops + 1))
done
echo "@@RESULT loops $loops"
echo "@@RESULT loop_failures $failures"
# Then a write that must succeed, retried as an application would after an I/O error.
tries=0; rc=1
while [ $tries -lt 5 ] && [ $rc -ne 0 ]; do
    tries=$((tries + 1))
    dd if=/c.bin of=/dev/vda bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null
    rc=$?
done
echo "@@RESULT c_rc $rc"
echo "@@RESULT c_tries $tries"
echo "@@RESULT a_read $(dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
echo "@@RESULT c_read $(dd if=/dev/vda bs=1M skip=16 count=2 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""


def test_nbd_server_restart_mid_io(nbd: NbdRig) -> None:
    """qemu-nbd is killed (SIGKILL: nothing of its own is flushed) while the guest writes and
    flushes in a loop, and started again 2 s later. The daemon survives and reconnects, the
    guest's disk goes on working, and everything it had flushed is in the qcow2."""
    a_data, b_data, c_data = (pattern(2 * MiB, seed=s) for s in (20, 21, 22))
    image = nbd.qcow2("restart.qcow2", 64 * MiB)
    disk, server = nbd.serve(image)
    guest = nbd.h.start_guest(
        RESTART_SCRIPT, [disk], files={"a.bin": a_data, "b.bin": b_data, "c.bin": c_data}
    )
    nbd.h.wait_for_console(guest, "@@READY", timeout=90)
    time.sleep(2)  # well into the write loop
    server.kill()
    time.sleep(2)
    server.start()
    r = nbd.h.finish(guest)  # also fails if the daemon died
    backend = nbd.h.backends[0]
    log = backend.log_text()
    assert "connection ended" in log and "reconnected" in log, log
    assert r.number("loops") > r.number("loop_failures")  # B was flushed at least once
    assert r.number("c_rc") == 0, "writing C failed 5 times after the restart"
    assert r.results["a_read"] == sha256(a_data)
    assert r.results["c_read"] == sha256(c_data)
    print(
        f"{r.number('loops')} write+flush loops, {r.number('loop_failures')} failed; "
        f"C written in {r.number('c_tries')} tries"
    )
    nbd.stop()
    raw = nbd.host_view(image)
    assert read_range(raw, 0, 2 * MiB) == a_data
    assert read_range(raw, 8 * MiB, 2 * MiB) == b_data
    assert read_range(raw, 16 * MiB, 2 * MiB) == c_data
