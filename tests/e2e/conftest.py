"""Fixtures for end-to-end tests: the x86 guest rig and vhost-user-blk back-ends.

Every test taking ``e2e`` runs once per selected back-end. Select back-ends with
``PYVIRTIO_E2E_BACKENDS=name[,name...]`` (default: all of :data:`rigs.backends.BACKENDS`), or
with ``-k``. ``PYVIRTIO_E2E_TIMEOUT`` is the per-guest wall-clock limit (default 180 s).
A rig that cannot be built (no network, apt failure) fails the tests, never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from rigs import RigError
from rigs.backends import BACKENDS, BackendFactory, BlkOptions, RunningBackend
from rigs.qemu import Disk, GuestError, GuestResult, QemuGuest, VhostUserBlk
from rigs.x86_guest import X86Guest, ensure_guest


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, show: Callable[[], str] = str
) -> None:
    """Poll ``check`` until it holds; fail the test with ``what`` and ``show()`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{show()}", pytrace=False)
        time.sleep(0.05)


BACKENDS_ENV = "PYVIRTIO_E2E_BACKENDS"
GUEST_TIMEOUT = float(os.environ.get("PYVIRTIO_E2E_TIMEOUT", "180"))


def selected_backends() -> list[str]:
    """Back-end names from PYVIRTIO_E2E_BACKENDS (default: all); unknown names are an error."""
    raw = os.environ.get(BACKENDS_ENV, "")
    names = [n.strip() for n in raw.split(",") if n.strip()] or list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"{BACKENDS_ENV}: unknown back-end(s) {unknown}; known: {sorted(BACKENDS)}"
        )
    return names


@pytest.fixture(scope="session")
def rig() -> X86Guest:
    """The kernel and base initramfs, built once (cached across runs)."""
    try:
        return ensure_guest()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build the x86 guest rig: {exc}", pytrace=False)


@pytest.fixture(params=selected_backends())
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """One vhost-user-blk back-end kind per test instance."""
    return BACKENDS[str(request.param)]


class Harness:
    """Images, back-ends and guest runs for one test; back-ends are stopped at teardown."""

    def __init__(self, rig: X86Guest, factory: BackendFactory, tmp: Path, sockdir: Path) -> None:
        self.rig = rig
        self.factory = factory
        self.capabilities = factory.capabilities
        self.tmp = tmp
        self.sockdir = sockdir  # short: UNIX socket paths are limited to 107 bytes
        self.backends: list[RunningBackend] = []
        self.retired: list[RunningBackend] = []
        self.guests: list[QemuGuest] = []

    def image(self, name: str, size: int, data: bytes = b"") -> Path:
        """A sparse raw image of ``size`` bytes, starting with ``data``."""
        path = self.tmp / name
        with path.open("wb") as f:
            f.write(data)
            f.truncate(size)
        return path

    def serve(self, image: Path, options: BlkOptions | None = None) -> VhostUserBlk:
        """Start the back-end on ``image``; return the disk to give QEMU."""
        options = options or BlkOptions()
        socket = self.sockdir / f"{image.stem}.sock"
        backend = self.factory.start(
            image, socket, options, log_path=self.tmp / f"{image.stem}.backend.log"
        )
        self.backends.append(backend)
        return VhostUserBlk(socket, num_queues=options.num_queues)

    def _logs(self) -> str:
        return "\n".join(
            f"--- back-end {b.name} for {b.image.name} ---\n{b.log_text()[-3000:]}"
            for b in [*self.retired, *self.backends]
        )

    def restart(self, index: int = 0) -> RunningBackend:
        """SIGKILL back-end ``index`` (a crash) and start it again on the same socket."""
        old = self.backends[index]
        old.kill()
        new = self.factory.start(
            old.image, old.socket, old.options, log_path=old.log_path.with_suffix(".2.log")
        )
        self.backends[index] = new
        self.retired.append(old)  # its log still goes into failure reports
        return new

    def start_guest(
        self,
        script: str | None,
        disks: Sequence[Disk],
        *,
        name: str = "guest",
        smp: int = 1,
        append: Sequence[str] = (),
        no_reboot: bool = True,
        files: Mapping[str, bytes] | None = None,
        timeout: float = GUEST_TIMEOUT,
        memory_mib: int = 512,
    ) -> QemuGuest:
        """Boot the guest in the background (killed at teardown); see :meth:`finish`."""
        guest = self.rig.guest(
            script,
            disks,
            workdir=self.tmp / name,
            smp=smp,
            memory_mib=memory_mib,
            append=append,
            no_reboot=no_reboot,
            files=files,
            timeout=timeout,
        )
        self.guests.append(guest)
        return guest.start()

    def wait_for_console(self, guest: QemuGuest, text: str, timeout: float | None = None) -> None:
        """Wait for ``text`` on the guest console; fail with console and back-end logs."""
        try:
            guest.wait_for_console(text, timeout)
        except GuestError as exc:
            pytest.fail(f"{exc}\n{self._logs()}", pytrace=False)

    def finish(self, guest: QemuGuest, name: str = "guest") -> GuestResult:
        """Wait for a started guest; fail with console and back-end logs (also if a back-end
        died)."""
        try:
            result = guest.wait()
        except GuestError as exc:
            pytest.fail(f"{exc}\n{self._logs()}", pytrace=False)
        dead = [b.image.name for b in self.backends if not b.running()]
        if dead:
            pytest.fail(f"back-end(s) died during the run: {dead}\n{self._logs()}", pytrace=False)
        print(f"guest {name}: {result.elapsed:.1f}s, results {result.results}")
        return result

    def run(
        self,
        script: str | None,
        disks: Sequence[Disk],
        *,
        name: str = "guest",
        smp: int = 1,
        append: Sequence[str] = (),
        no_reboot: bool = True,
        files: Mapping[str, bytes] | None = None,
        timeout: float = GUEST_TIMEOUT,
    ) -> GuestResult:
        """Boot the guest with ``script`` as /test.sh and wait for it (see :meth:`finish`)."""
        guest = self.start_guest(
            script,
            disks,
            name=name,
            smp=smp,
            append=append,
            no_reboot=no_reboot,
            files=files,
            timeout=timeout,
        )
        return self.finish(guest, name)

    def stop(self) -> None:
        """Stop all back-ends (they flush the images); fail if one exits unsuccessfully."""
        failed = []
        for backend in self.backends:
            status = backend.stop()
            if status != 0:
                failed.append((backend.image.name, status))
        if failed:
            pytest.fail(f"back-end exit status: {failed}\n{self._logs()}", pytrace=False)


@contextlib.contextmanager
def harness_for(rig: X86Guest, factory: BackendFactory, tmp: Path) -> Iterator[Harness]:
    """A :class:`Harness` whose guests and back-ends are gone when the block ends."""
    sockdir = Path(tempfile.mkdtemp(prefix="rigs-"))
    harness = Harness(rig, factory, tmp, sockdir)
    try:
        yield harness
    finally:
        for guest in harness.guests:
            guest.kill()
        for backend in harness.backends:
            backend.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def e2e(rig: X86Guest, backend_factory: BackendFactory, tmp_path: Path) -> Iterator[Harness]:
    """A :class:`Harness` for the parametrized back-end."""
    with harness_for(rig, backend_factory, tmp_path) as harness:
        yield harness
