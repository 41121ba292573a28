"""vhost-user-blk back-ends: start one on a UNIX socket for an image, stop it afterwards.

Each back-end is a :class:`BackendFactory` in :data:`BACKENDS` (name -> factory) declaring its
:class:`Capabilities`, so tests ask "does it honour a serial?" rather than checking names. To add
one, subclass :class:`BackendFactory` (``command()`` and ``capabilities``) and register it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rigs import RigError
from rigs.host import die_with_parent, find_tool

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BlkOptions:
    """How to export the image."""

    read_only: bool = False
    num_queues: int = 1
    logical_block_size: int = 512
    serial: str | None = None  # only for back-ends with Capabilities.serial
    writethrough: bool = False  # every write durable before it completes (pyvirtio only)
    direct: bool = False  # O_DIRECT on the image
    queue_size: int | None = None  # pyvirtio's --queue-size (None: its default)
    io_threads: int = 0  # pyvirtio's --io-threads
    locking: bool = True  # False: another back-end may open the image too (a migration's two)
    seccomp: bool = False  # pyvirtio's --seccomp
    run_as: int | None = None  # a uid (and gid) to run the back-end as, with no capabilities
    aio: str | None = None  # qemu-storage-daemon's file driver aio= (None: its default, threads)
    io_engine: str | None = None  # pyvirtio's --io-engine (None: its default, auto)
    poll_us: int = 0  # pyvirtio's --poll-us


@dataclass(frozen=True)
class Capabilities:
    """What a back-end guarantees beyond the virtio-blk basics."""

    serial: bool  # honours BlkOptions.serial (GET_ID returns it)
    discard_punches_holes: bool  # a discard deallocates the range in a sparse image file


class RunningBackend:
    """A started back-end process; :meth:`stop` ends it (also as a context manager)."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        image: Path,
        socket: Path,
        options: BlkOptions,
        log_path: Path,
    ) -> None:
        self.name = name
        self.proc = proc
        self.image = image
        self.socket = socket
        self.options = options
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.proc.poll() is None

    def log_text(self) -> str:
        """The back-end's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the back-end (a crash, as seen by QEMU) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RunningBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_for_socket(proc: subprocess.Popen[bytes], socket: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(socket.stat().st_mode):
                return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise RigError(f"exited with status {proc.returncode} before creating {socket}")
        if time.monotonic() > deadline:
            raise RigError(f"no socket {socket} after {timeout:.0f}s")
        time.sleep(0.02)


class BackendFactory(ABC):
    """Starts one kind of vhost-user-blk back-end."""

    name: str
    capabilities: Capabilities

    @abstractmethod
    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        """The command line serving ``image`` on ``socket``."""

    def environment(self) -> dict[str, str]:
        """The process environment."""
        return dict(os.environ)

    def start(
        self,
        image: Path,
        socket: Path,
        options: BlkOptions | None = None,
        *,
        log_path: Path | None = None,
        timeout: float = 30.0,
    ) -> RunningBackend:
        """Start serving ``image`` on ``socket``; return once the socket exists."""
        options = options or BlkOptions()
        if options.serial is not None and not self.capabilities.serial:
            raise RigError(f"back-end {self.name} cannot set a serial")
        socket.unlink(missing_ok=True)
        log_path = log_path or socket.with_name(socket.name + ".log")
        cmd = self.command(image, socket, options)
        if options.run_as is not None:
            uid = options.run_as
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            cmd += ["--inh-caps=-all", "--bounding-set=-all", *self.command(image, socket, options)]
        with log_path.open("wb") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                preexec_fn=die_with_parent,
            )
        backend = RunningBackend(self.name, proc, image, socket, options, log_path)
        try:
            _wait_for_socket(proc, socket, timeout)
        except RigError as exc:
            backend.kill()
            raise RigError(f"back-end {self.name}: {exc}\n{backend.log_text()}") from None
        return backend


def _qemu_opt(value: object) -> str:
    return str(value).replace(",", ",,")  # QEMU option syntax escapes commas by doubling


class QemuStorageDaemon(BackendFactory):
    """QEMU's own vhost-user-blk export (the reference back-end).

    Its GET_ID serial is fixed ("vhost_user_blk"). The blockdevs use ``discard=unmap`` so guest
    discards punch holes in the image file.
    """

    name = "qemu-storage-daemon"
    capabilities = Capabilities(serial=False, discard_punches_holes=True)

    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        """qemu-storage-daemon with a file + raw blockdev and one export."""
        ro = ",read-only=on" if options.read_only else ""
        return [
            str(find_tool("qemu-storage-daemon")),
            "--blockdev",
            f"driver=file,node-name=file0,filename={_qemu_opt(image)},"
            f"cache.direct={'on' if options.direct else 'off'},discard=unmap{ro}"
            f"{f',aio={options.aio}' if options.aio else ''}"
            f"{'' if options.locking else ',locking=off'}",
            "--blockdev",
            f"driver=raw,node-name=disk0,file=file0,discard=unmap{ro}",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={_qemu_opt(socket)},writable={'off' if options.read_only else 'on'},"
            f"num-queues={options.num_queues},logical-block-size={options.logical_block_size}",
        ]


class Pyvirtio(BackendFactory):
    """This project's back-end: ``python -m pyvirtio blk``."""

    name = "pyvirtio"
    capabilities = Capabilities(serial=True, discard_punches_holes=True)

    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        """pyvirtio's blk command with the options."""
        cmd = [sys.executable, "-m", "pyvirtio", "blk", "--socket-path", str(socket)]
        cmd += ["--image", str(image), "--num-queues", str(options.num_queues)]
        cmd += ["--logical-block-size", str(options.logical_block_size)]
        if options.read_only:
            cmd.append("--read-only")
        if options.serial is not None:
            cmd += ["--serial", options.serial]
        if options.writethrough:
            cmd.append("--writethrough")
        if options.direct:
            cmd.append("--direct")
        if options.queue_size is not None:
            cmd += ["--queue-size", str(options.queue_size)]
        if options.io_threads:
            cmd += ["--io-threads", str(options.io_threads)]
        if options.seccomp:
            cmd.append("--seccomp")
        if options.io_engine is not None:
            cmd += ["--io-engine", options.io_engine]
        if options.poll_us:
            cmd += ["--poll-us", str(options.poll_us)]
        return [*cmd, "-v"]

    def environment(self) -> dict[str, str]:
        """The environment, with the repository's src/ importable even without installing."""
        env = dict(os.environ)
        src = REPO_ROOT / "src"
        if src.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        return env


BACKENDS: dict[str, BackendFactory] = {
    factory.name: factory for factory in (QemuStorageDaemon(), Pyvirtio())
}
