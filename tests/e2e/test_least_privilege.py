"""`pyvirtio blk` with no privilege: run as nobody, with no capabilities, under its seccomp
filter (``--seccomp``), serving an unmodified guest that runs fio write + verify and makes,
fills and checks an ext4 file system. The host then checks the file system too."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs.backends import BACKENDS, BlkOptions
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import Harness, harness_for, wait_until
from tests.e2e.test_vhost_user_blk import EXT4_SCRIPT, FIO_JOBS, host_tool, sha256

pytestmark = pytest.mark.e2e

MiB = 1 << 20
NOBODY = 65534

SCRIPT = (
    """
fio /verify.fio > /tmp/fio.out 2>&1
rc=$?
echo "@@RESULT fio_rc $rc"
echo "@@RESULT jobs_ok $(grep -c 'err= 0:' /tmp/fio.out)"
[ $rc -eq 0 ] || { cat /tmp/fio.out; exit 1; }
"""
    + EXT4_SCRIPT
    + """
echo "@@RESULT io_errors $(dmesg | grep -c -i 'I/O error')"
"""
)


@pytest.fixture
def pyvirtio_e2e(rig: X86Guest, tmp_path: Path) -> Iterator[Harness]:
    with harness_for(rig, BACKENDS["pyvirtio"], tmp_path) as harness:
        yield harness


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_unprivileged_daemon_under_its_syscall_filter(pyvirtio_e2e: Harness) -> None:
    e2e = pyvirtio_e2e
    # Its own directory, with its image and its socket: nothing else is its own.
    os.chown(e2e.sockdir, NOBODY, NOBODY)
    image = e2e.sockdir / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    os.chown(image, NOBODY, NOBODY)
    disk = e2e.serve(image, BlkOptions(seccomp=True, run_as=NOBODY))
    backend = e2e.backends[0]
    # The daemon loads its filter once everything is open, after its socket is there, and
    # then says it is serving.
    wait_until("the daemon serving", lambda: "serving " in backend.log_text(), 30, backend.log_text)
    # setpriv execs the daemon: the pid is the daemon's
    status = _status(backend.pid)
    assert status["Uid"].split()[0] == str(NOBODY) and status["CapEff"] == "0000000000000000"
    threads = list(Path(f"/proc/{backend.pid}/task").iterdir())
    for task in threads:
        assert "Seccomp:\t2" in (task / "status").read_text()

    r = e2e.run(SCRIPT, [disk], files={"verify.fio": FIO_JOBS.encode()})
    assert r.number("fio_rc") == 0 and r.number("jobs_ok") == 4
    assert r.number("fsck") == 0 and r.number("io_errors") == 0
    assert "seccomp filter loaded" in backend.log_text()
    e2e.stop()  # exits 0 on SIGTERM, image flushed
    fsck = host_tool("e2fsck", "-fn", str(image))
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    cat = host_tool("debugfs", "-R", "cat /file", str(image))
    assert sha256(cat.stdout) == r.results["sha"]
