"""NBD servers on UNIX sockets for tests and benchmarks: nbdkit and qemu-nbd (Debian packages).

A :class:`NbdServer` can be killed, paused (SIGSTOP) and started again on the same socket, which is
what the reconnection tests do to ``pyvirtio blk --nbd``; :class:`PyvirtioNbd` is the
:class:`~rigs.backends.BackendFactory` that serves an export as a vhost-user-blk back-end.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from rigs import RigError
from rigs.backends import BackendFactory, BlkOptions, Capabilities, Pyvirtio
from rigs.host import die_with_parent, find_tool


class NbdServer:
    """An NBD server process serving one export on a UNIX socket."""

    def __init__(self, argv: Sequence[str], sock: Path, export: str = "", log: Path | None = None):
        self.argv = list(argv)
        self.socket = sock
        self.export = export
        self.log_path = log or sock.with_name(sock.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The NBD URI of the export (what ``pyvirtio blk --nbd`` takes)."""
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> NbdServer:
        """Start the server; return once it accepts connections."""
        self.socket.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RigError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.socket))
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RigError(f"{self.argv[0]}: no socket {self.socket} after {timeout:g}s")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is flushed) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean exit), SIGKILL after ``timeout``; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and answers nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + 5
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # stopped, all threads
            if time.monotonic() > deadline:
                raise RigError(f"{self.argv[0]} did not stop")
            time.sleep(0.01)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def nbdkit(sock: Path, plugin: Sequence[str], filters: Sequence[str] = ()) -> NbdServer:
    """``nbdkit`` in the foreground: ``plugin`` is the plugin and its arguments (filters'
    arguments go there too)."""
    argv = [str(find_tool("nbdkit")), "-f", "--exit-with-parent", "-U", str(sock)]
    argv += [f"--filter={f}" for f in filters]
    return NbdServer([*argv, *plugin], sock)


def qemu_nbd(image: Path, sock: Path, fmt: str = "qcow2", export: str = "disk") -> NbdServer:
    """``qemu-nbd`` serving ``image`` (opened with its own format driver, as QEMU would) to any
    number of clients, with the host page cache and discard passed down."""
    argv = [
        str(find_tool("qemu-nbd")),
        f"--format={fmt}",
        f"--socket={sock}",
        f"--export-name={export}",
        "--persistent",
        "--shared=0",
        "--cache=writeback",
        "--aio=threads",
        "--discard=unmap",
        str(image),
    ]
    return NbdServer(argv, sock, export)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    """Run qemu-img, capturing its output."""
    return subprocess.run(
        [str(find_tool("qemu-img")), *args], capture_output=True, text=True, check=False
    )


class PyvirtioNbd(BackendFactory):
    """``pyvirtio blk --nbd`` on an NBD server's export; ``start``'s image is not used (the
    server serves it)."""

    name = "pyvirtio-nbd"
    capabilities = Capabilities(serial=True, discard_punches_holes=False)

    def __init__(self, server: NbdServer, timeout: float = 10.0) -> None:
        self.server = server
        self.timeout = timeout

    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        cmd = Pyvirtio().command(image, socket, options)
        at = cmd.index("--image")
        cmd[at : at + 2] = ["--nbd", self.server.uri, "--nbd-timeout", f"{self.timeout:g}"]
        return cmd

    def environment(self) -> dict[str, str]:
        return Pyvirtio().environment()
