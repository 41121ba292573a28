"""virtio-rng on an unmodified Debian guest: `pyvirtio rng` and a device class of one's own
served with `pyvirtio serve` (docs/devices.md's example), both read through Linux's stock
virtio-rng driver and /dev/hwrng in one boot."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rigs.qemu import VhostUserDevice
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import GUEST_TIMEOUT

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

# Both devices appear as hw_random sources; each is selected in turn and read through
# /dev/hwrng (a read ends up in one virtio-rng request per buffer the kernel posts).
SCRIPT = """
ls /sys/class/misc/hw_random/ >/dev/null || exit 2
available=$(cat /sys/class/misc/hw_random/rng_available)
echo "@@RESULT available $available"
n=0
for rng in $available; do
    echo "$rng" > /sys/class/misc/hw_random/rng_current || exit 3
    echo "@@RESULT bytes_$n $(head -c 16 /dev/hwrng | od -An -tu1 | tr -s ' ' | sed 's/^ //')"
    n=$((n + 1))
done
"""


@contextmanager
def _daemon(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    socket = Path(args[args.index("--socket-path") + 1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtio", *args, "-v"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pyvirtio {args[0]} did not start:\n{log.read_text()}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


def test_rng_devices_feed_dev_hwrng(rig: X86Guest, tmp_path: Path) -> None:
    source = tmp_path / "entropy"
    source.write_bytes(bytes(range(0, 256, 2)))  # even bytes, counting in steps of 2
    rng_sock, own_sock = tmp_path / "rng.sock", tmp_path / "own.sock"
    with (
        _daemon(
            ["rng", "--socket-path", str(rng_sock), "--filename", str(source)],
            tmp_path / "rng.log",
        ) as rng,
        _daemon(
            [
                "serve",
                "examples.counting_rng:CountingRng",
                "--socket-path",
                str(own_sock),
                "--arg",
                "start=7",
            ],
            tmp_path / "own.log",
        ) as own,
    ):
        result = rig.run(
            SCRIPT,
            [
                VhostUserDevice(rng_sock, "vhost-user-rng"),
                VhostUserDevice(own_sock, "vhost-user-rng"),
            ],
            workdir=tmp_path / "guest",
            timeout=GUEST_TIMEOUT,
        )
        assert rng.poll() is None and own.poll() is None, "a daemon died"
    print(result.results)
    assert len(result.results["available"].split()) == 2
    # The kernel also reads each source for its own entropy pool (at registration and from
    # its hwrng thread), so the runs start where it left them; their steps tell them apart.
    runs = [[int(b) for b in result.results[f"bytes_{i}"].split()] for i in (0, 1)]
    steps = sorted(({(b - a) % 256 for a, b in itertools.pairwise(run)} for run in runs), key=min)
    assert steps == [{1}, {2}], runs  # pyvirtio serve's counting, and pyvirtio rng's file
    assert all(len(run) == 16 for run in runs)
