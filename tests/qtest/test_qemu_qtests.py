"""QEMU 7.2's own vhost-user-blk qtests (``tests/qtest/vhost-user-blk-test.c``, part of
``qos-test``) against pyvirtio.

qos-test starts its back-end as ``$QTEST_QEMU_STORAGE_DAEMON_BINARY`` with qemu-storage-daemon
arguments; here that is ``qsd_wrapper.py`` (through a shim pinning this interpreter), which runs
``pyvirtio blk``. ``qos-test`` and a qtest-capable ``qemu-system-x86_64`` come from
:mod:`rigs.qtest` (built once from Debian's qemu source, then cached; a rig that cannot be built
fails the tests, never skips them).

Each test runs in its own ``qos-test -p PATH`` process: a failed assertion aborts qos-test, which
would hide the results of the tests after it. A skipped test counts as a failure.
``PYVIRTIO_QTEST_TIMEOUT`` is the limit per qos-test run (default 60 s; a test waiting for an
interrupt that never comes gives up after 30 s by itself).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from rigs import RigError
from rigs.qtest import QtestRig, ensure_qtest

pytestmark = pytest.mark.qtest

# vhost-user-blk-test.c's tests in QEMU 7.2. On x86_64 they are all under the pc machine's PCI
# bus (vhost-user-blk-pci); the virtio-mmio variant (vhost-user-blk-device) of basic and indirect
# only exists on Arm machines.
EXPECTED = ("basic", "indirect", "idx", "nxvirtq", "hotplug", "multiqueue")
TIMEOUT = float(os.environ.get("PYVIRTIO_QTEST_TIMEOUT", "60"))
WRAPPER = Path(__file__).with_name("qsd_wrapper.py")
LOG_TAIL = 120  # lines of each log in a failure message

_TAP = re.compile(r"^(ok|not ok) \d+ (\S+)(?:\s+#\s*(.*))?$")


@dataclass(frozen=True)
class Run:
    """One qos-test run."""

    command: list[str]
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    log_dir: Path

    def results(self) -> dict[str, tuple[str, str]]:
        """Test path -> (``ok``/``not ok``, directive such as ``SKIP reason``) from the TAP."""
        found: dict[str, tuple[str, str]] = {}
        for line in self.stdout.splitlines():
            match = _TAP.match(line.strip())
            if match:
                found[match.group(2)] = (match.group(1), match.group(3) or "")
        return found

    def verdict(self, path: str) -> str:
        """One line on how test ``path`` ended: its TAP result, else why there is none."""
        result, directive = self.results().get(path, ("", ""))
        if result:
            return f"{result} {directive}".strip()
        if self.returncode is None:
            return f"no result: qos-test still running after {TIMEOUT:.0f} s"
        bail = [line for line in self.stdout.splitlines() if line.startswith("Bail out!")]
        died = f"exit status {self.returncode}"
        if self.returncode < 0:
            died = f"killed by {signal.Signals(-self.returncode).name}"
        return f"no result, qos-test {died}" + (f": {bail[0]}" if bail else "")

    def report(self) -> str:
        """The command, its status and output, the wrapper's and pyvirtio's logs."""
        status = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        parts = [
            f"$ {shlex.join(self.command)}  ({status})",
            _section("qos-test stdout", self.stdout),
            _section("qos-test stderr (qemu's too)", self.stderr),
        ]
        logs = sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []
        for path in logs:
            parts.append(_section(path.name, path.read_text(errors="replace")))
        if not logs:
            parts.append("(no wrapper or pyvirtio logs: the back-end was never started)")
        return "\n".join(parts)


def _section(title: str, text: str) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > LOG_TAIL:
        lines = [f"... ({len(lines) - LOG_TAIL} lines before)", *lines[-LOG_TAIL:]]
    return f"----- {title} -----\n" + ("\n".join(lines) if lines else "(empty)")


def _shim(directory: Path) -> Path:
    """An executable that runs the wrapper with this interpreter (the project's venv)."""
    shim = directory / "qemu-storage-daemon"
    shim.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(WRAPPER))} "$@"\n'
    )
    shim.chmod(0o755)
    return shim


def run_qos_test(rig: QtestRig, args: list[str], work: Path) -> Run:
    """``qos-test ARGS`` in ``work`` (its images go there), killed with everything it started
    (QEMU, the wrapper, pyvirtio) at :data:`TIMEOUT` or when it ends."""
    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    # qos-test's sockets go to $TMPDIR, and an aborted run leaves them behind: a short
    # directory of our own (UNIX socket paths are limited to 107 bytes), removed afterwards
    with tempfile.TemporaryDirectory(prefix="qos-test-", dir="/tmp") as sockets:
        env = {
            **os.environ,
            **rig.environment(),
            "QTEST_QEMU_STORAGE_DAEMON_BINARY": str(_shim(work)),
            "PYVIRTIO_QSD_LOG_DIR": str(log_dir),
            "TMPDIR": sockets,
        }
        return _run(rig, args, work, env, log_dir)


def _run(rig: QtestRig, args: list[str], work: Path, env: dict[str, str], log_dir: Path) -> Run:
    """:func:`run_qos_test` with its environment made."""
    command = [str(rig.qos_test), *args]
    proc = subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    returncode: int | None
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        returncode = None
    finally:
        with contextlib.suppress(ProcessLookupError):  # what an aborted qos-test left behind
            os.killpg(proc.pid, signal.SIGKILL)
    return Run(command, returncode, stdout, stderr, log_dir)


@pytest.fixture(scope="module")
def rig() -> QtestRig:
    """qos-test and qemu-system-x86_64 (built once, cached across runs)."""
    try:
        return ensure_qtest()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build QEMU's qtests (rigs.qtest): {exc}", pytrace=False)


@pytest.fixture(scope="module")
def listing(rig: QtestRig, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The vhost-user-blk test paths ``qos-test -l`` lists."""
    run = run_qos_test(rig, ["-l"], tmp_path_factory.mktemp("qos-list"))
    if run.returncode != 0:
        pytest.fail(f"qos-test -l failed\n{run.report()}", pytrace=False)
    lines = [line.strip() for line in run.stdout.splitlines()]
    paths = [line for line in lines if line.startswith("/") and "vhost-user-blk" in line]
    if not paths:
        pytest.fail(f"qos-test -l lists no vhost-user-blk tests\n{run.report()}", pytrace=False)
    return paths


def test_listing_has_the_expected_tests(listing: list[str]) -> None:
    """qos-test has exactly the vhost-user-blk tests named here (a new one must be added)."""
    names = sorted({path.rsplit("/", 1)[-1] for path in listing})
    assert names == sorted(EXPECTED), f"qos-test -l lists: {listing}"


@pytest.mark.parametrize("name", EXPECTED)
def test_vhost_user_blk(name: str, rig: QtestRig, listing: list[str], tmp_path: Path) -> None:
    """Every listed path of test ``name`` passes (not skipped) against pyvirtio."""
    paths = [path for path in listing if path.rsplit("/", 1)[-1] == name]
    if not paths:
        pytest.fail(f"qos-test -l has no vhost-user-blk test {name!r}: {listing}")
    for i, path in enumerate(paths):
        run = run_qos_test(rig, ["--tap", "-k", "-p", path], tmp_path / f"run{i}")
        result, directive = run.results().get(path, ("", ""))
        if result != "ok" or directive or run.returncode != 0:
            pytest.fail(f"{name}: {run.verdict(path)}\n{run.report()}", pytrace=False)
