"""A real ``pyvirtio blk`` daemon for hostile front-ends, checked after every test.

Each test gets a fresh daemon process. After the test, whatever it did, the daemon must still
be running, must serve a well-behaved front-end (a write and a read-back through both queues)
within a few seconds, and must hold no more file descriptors than it did after serving one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.frontend import serve_well

IMAGE_SIZE = 16 << 20
ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """``pyvirtio blk`` in a subprocess, with its log."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.image = tmp / "disk.img"
        with self.image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        # UNIX socket paths are limited to 107 bytes: keep it short.
        self.sockdir = Path(tempfile.mkdtemp(prefix="pvh-"))
        self.socket = str(self.sockdir / "blk.sock")
        self.log_path = tmp / "daemon.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyvirtio",
                    "blk",
                    "--socket-path",
                    self.socket,
                    "--image",
                    str(self.image),
                    "--num-queues",
                    "2",
                    "-v",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def settled(self, fds: int, timeout: float = 10.0) -> int:
        """Wait for the sessions in progress to be torn down (at most ``fds`` fds open);
        returns how many fds the daemon holds then."""
        deadline = time.monotonic() + timeout
        while (count := self.fd_count()) > fds and time.monotonic() < deadline:
            time.sleep(0.05)
        return count

    def check_serves(self, timeout: float = 10.0) -> None:
        """A well-behaved front-end connects (retrying while a session ends) and does I/O."""
        assert self.alive(), f"the daemon died:\n{self.log()[-4000:]}"
        serve_well(self.socket, timeout=timeout)
        assert self.alive(), f"the daemon died:\n{self.log()[-4000:]}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def checked_daemon(tmp: Path, *extra: str) -> Iterator[Daemon]:
    """A daemon (``extra``: more options) that must, after the block, still serve a
    well-behaved front-end, hold no more fds than after a clean session, stop cleanly and
    have logged no traceback."""
    d = Daemon(tmp, *extra)
    try:
        idle = d.fd_count()
        d.check_serves()
        baseline = d.settled(idle, timeout=5)
        yield d
        d.check_serves()
        leaked = d.settled(baseline) - baseline
        assert leaked <= 0, f"the daemon holds {leaked} more fds than after a clean session"
        assert d.stop() == 0, f"the daemon did not stop cleanly:\n{d.log()[-4000:]}"
        assert "Traceback" not in d.log(), d.log()[-6000:]
    finally:
        d.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with checked_daemon(tmp_path) as d:
        yield d
