"""Boot the rig's guest in ``qemu-system-x86_64 -M microvm`` (TCG) with virtio-blk disks.

Disks are vhost-user-blk devices (a back-end on a UNIX socket) or QEMU's own virtio-blk on an
image file, all on virtio-mmio (``vhost-user-blk`` / ``virtio-blk-device``), enumerated by the
guest through ACPI. Guest RAM is a shared memfd, as vhost-user needs.

The guest reports through its serial console: ``@@RESULT <key> <value>`` lines and a final
``@@EXIT <status>`` (printed by the initramfs /init, see :mod:`rigs.initramfs`).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from rigs import RigError
from rigs.host import die_with_parent

# tsc_early_khz: a TCG guest may fail to calibrate its TSC against the PIT and hang silently.
# reboot=t: microvm's ACPI reset hangs the next boot in ~1 of 6 reboots under TCG (the vCPU
# ends up executing unmapped memory right after qboot); a triple fault resets reliably.
DEFAULT_APPEND = ("console=ttyS0", "tsc_early_khz=2000000", "quiet", "panic=-1", "reboot=t")
DEFAULT_TIMEOUT = 300.0
CONSOLE_TAIL_LINES = 40

_EXIT_RE = re.compile(r"@@EXIT (-?\d+)")
_RESULT_RE = re.compile(r"@@RESULT (\S+) ?(.*)$")


@dataclass(frozen=True)
class VhostUserBlk:
    """A vhost-user-blk disk served by a back-end listening on ``socket``."""

    socket: Path
    num_queues: int | None = None  # None: QEMU's default, 1 on virtio-mmio (not the back-end's)
    reconnect: int | None = None  # chardev reconnect=<seconds> (back-end restarts)
    properties: Mapping[str, str] = field(default_factory=dict)  # extra -device properties


@dataclass(frozen=True)
class QemuBlk:
    """QEMU's built-in virtio-blk on an image file (a reference for benchmarks)."""

    image: Path
    format: str = "raw"
    cache: str = "none"  # -drive cache=: none, writeback, directsync, unsafe, ...
    aio: str | None = None  # threads, native, io_uring
    read_only: bool = False
    num_queues: int | None = None
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VhostUserDevice:
    """Any other vhost-user device (``device``: QEMU's virtio-mmio device type, such as
    ``vhost-user-rng``) served by a back-end listening on ``socket``."""

    socket: Path
    device: str
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VhostUserNet:
    """A virtio-net NIC (QEMU's virtio-net-device with its MAC) on a vhost-user back-end."""

    socket: Path
    mac: str


Disk = VhostUserBlk | QemuBlk | VhostUserDevice | VhostUserNet


def _props(props: Mapping[str, object]) -> str:
    return "".join(f",{k}={v}" for k, v in props.items() if v is not None)


def disk_args(disks: Sequence[Disk]) -> list[str]:
    """QEMU arguments for the disks; the guest sees them as vda, vdb, ... in this order."""
    args: list[str] = []
    for i, disk in enumerate(disks):
        if isinstance(disk, VhostUserDevice):
            args += ["-chardev", f"socket,id=vu{i},path={disk.socket}"]
            args += ["-device", f"{disk.device},chardev=vu{i}" + _props(disk.properties)]
        elif isinstance(disk, VhostUserNet):
            args += ["-chardev", f"socket,id=vu{i},path={disk.socket}"]
            args += ["-netdev", f"vhost-user,id=net{i},chardev=vu{i}"]
            args += ["-device", f"virtio-net-device,netdev=net{i},mac={disk.mac}"]
        elif isinstance(disk, VhostUserBlk):
            chardev = f"socket,id=vu{i},path={disk.socket}"
            if disk.reconnect is not None:
                chardev += f",reconnect={disk.reconnect}"
            device = f"vhost-user-blk,chardev=vu{i}" + _props(
                {"num-queues": disk.num_queues, **disk.properties}
            )
            args += ["-chardev", chardev, "-device", device]
        else:
            drive = f"file={disk.image},if=none,id=drv{i},format={disk.format},cache={disk.cache}"
            drive += _props({"aio": disk.aio, "readonly": "on" if disk.read_only else None})
            device = f"virtio-blk-device,drive=drv{i}" + _props(
                {"num-queues": disk.num_queues, **disk.properties}
            )
            args += ["-drive", drive, "-device", device]
    return args


# QEMU stderr lines after which the guest cannot make progress (its I/O would hang until the
# timeout): fail at once instead.
FATAL_STDERR = ("vhost start failed",)
# A vhost-user back-end closed its socket: fatal unless the disks reconnect.
DISCONNECT_STDERR = (
    "Unexpected end-of-file before all data were read",
    "Failed to read msg header",
)


def default_fatal_stderr(disks: Sequence[Disk]) -> tuple[str, ...]:
    """:data:`FATAL_STDERR`, plus :data:`DISCONNECT_STDERR` when no disk has ``reconnect``."""
    reconnects = any(isinstance(d, VhostUserBlk) and d.reconnect for d in disks)
    return FATAL_STDERR if reconnects else FATAL_STDERR + DISCONNECT_STDERR


class GuestError(RigError):
    """The guest failed: QEMU error, no ``@@EXIT``, or a non-zero exit status."""


class GuestTimeout(GuestError):
    """The guest ran past its deadline and was killed."""


def _tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class GuestResult:
    """What a finished guest reported."""

    exit_code: int | None  # from @@EXIT; None if the guest never printed it
    results: dict[str, str]  # @@RESULT key value (the last value of a repeated key)
    console: str
    console_path: Path
    returncode: int  # QEMU's own exit status
    elapsed: float  # seconds from start to QEMU's exit

    def number(self, key: str) -> int:
        """A result as an integer (a clear error if it is missing)."""
        if key not in self.results:
            raise GuestError(f"guest printed no @@RESULT {key}\n{_tail(self.console)}")
        return int(self.results[key], 0)


def parse_console(text: str) -> tuple[int | None, dict[str, str]]:
    """Extract the last ``@@EXIT`` status and the ``@@RESULT`` pairs from console output."""
    exit_code: int | None = None
    results: dict[str, str] = {}
    for line in text.splitlines():
        if m := _EXIT_RE.search(line):
            exit_code = int(m.group(1))
        elif m := _RESULT_RE.search(line):
            results[m.group(1)] = m.group(2).strip()
    return exit_code, results


class QemuProcess:
    """One QEMU process in the background, its console and stderr captured to files in
    ``workdir``: what :class:`QemuGuest` and ``rigs.xen.qemu.XenMachine`` share. Subclasses
    give :meth:`command`; used as a context manager, QEMU is killed on exit."""

    #: How many lines of console and stderr an error message ends with.
    tail_lines = CONSOLE_TAIL_LINES
    #: What to install when QEMU is missing (for the error message).
    install_hint = "scripts/host-deps guest"

    def __init__(self, qemu: str, timeout: float, workdir: Path, prefix: str = "qemu") -> None:
        self.qemu = qemu
        self.timeout = timeout
        self.workdir = workdir
        self.console_path = self.workdir / "console.log"
        self.stderr_path = self.workdir / "qemu.stderr"
        self._name = prefix
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._ended: float | None = None

    def command(self) -> list[str]:
        """The full QEMU command line."""
        raise NotImplementedError

    def _check_inputs(self) -> None:
        """RigError if something the command line names is missing (before QEMU starts)."""

    def start(self) -> Self:
        """Start QEMU in the background; console output goes to :attr:`console_path`."""
        if self._proc is not None:
            raise RigError(f"{self._name}.start: already started")
        if shutil.which(self.qemu) is None:
            raise RigError(f"{self.qemu} is not installed ({self.install_hint})")
        self._check_inputs()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "cmdline").write_text(shlex.join(self.command()) + "\n")
        with self.console_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=die_with_parent,
            )
        self._started = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        """QEMU's process id once started."""
        return None if self._proc is None else self._proc.pid

    def running(self) -> bool:
        """Whether QEMU is still running."""
        return self._proc is not None and self._proc.poll() is None

    def console_text(self) -> str:
        """The console output so far (CRs removed)."""
        try:
            data = self.console_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace").replace("\r", "")

    def stderr_text(self) -> str:
        """QEMU's own stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _describe(self, what: str) -> str:
        parts = [f"{what} (console: {self.console_path})"]
        err = self.stderr_text().strip()
        if err:
            parts.append(f"--- qemu stderr ---\n{_tail(err, self.tail_lines)}")
        parts.append(f"--- console tail ---\n{_tail(self.console_text(), self.tail_lines)}")
        return "\n".join(parts)

    def _result(self, proc: subprocess.Popen[bytes]) -> GuestResult:
        """What the guest reported, once QEMU has exited (or been killed)."""
        if self._ended is None:
            self._ended = time.monotonic()
        console = self.console_text()
        exit_code, results = parse_console(console)
        return GuestResult(
            exit_code=exit_code,
            results=results,
            console=console,
            console_path=self.console_path,
            returncode=proc.returncode,
            elapsed=self._ended - self._started,
        )

    def kill(self) -> None:
        """Kill QEMU (if running) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
            self._ended = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class QemuGuest(QemuProcess):
    """One QEMU process running the guest; use :meth:`start` and :meth:`wait`, or as a context
    manager (which kills QEMU on exit).

    ``timeout`` is a hard wall-clock limit counted from :meth:`start`. QEMU is killed as soon
    as its stderr shows one of ``fatal_stderr`` (default :func:`default_fatal_stderr`).
    """

    def __init__(
        self,
        kernel: Path,
        initrd: Path,
        disks: Sequence[Disk] = (),
        *,
        smp: int = 1,
        memory_mib: int = 512,
        append: Sequence[str] = (),
        no_reboot: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        wait_disks: int | None = None,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        fatal_stderr: Sequence[str] | None = None,
        qemu: str = "qemu-system-x86_64",
    ) -> None:
        self.kernel = kernel
        self.initrd = initrd
        self.disks = list(disks)
        self.smp = smp
        self.memory_mib = memory_mib
        self.append = [*DEFAULT_APPEND, *append]
        if not any(a.startswith("rigs.disks=") for a in self.append):
            blocks = [d for d in self.disks if isinstance(d, VhostUserBlk | QemuBlk)]
            count = len(blocks) if wait_disks is None else wait_disks
            self.append.append(f"rigs.disks={count}")
        self.no_reboot = no_reboot
        self.extra_args = list(extra_args)
        self.fatal_stderr = (
            default_fatal_stderr(disks) if fatal_stderr is None else tuple(fatal_stderr)
        )
        self._own_workdir = workdir is None
        super().__init__(
            qemu, timeout, workdir or Path(tempfile.mkdtemp(prefix="rigs-qemu-")), "QemuGuest"
        )

    def command(self) -> list[str]:
        """The full QEMU command line."""
        mem = f"{self.memory_mib}M"
        cmd = [
            self.qemu,
            "-M", "microvm,acpi=on,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-global", "virtio-mmio.force-legacy=false",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", str(self.smp),
            "-m", mem,
            "-nographic",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", " ".join(self.append),
        ]  # fmt: skip
        if self.no_reboot:
            cmd.append("-no-reboot")
        return cmd + disk_args(self.disks) + self.extra_args

    def _check_fatal(self) -> None:
        if not self.fatal_stderr:
            return
        err = self.stderr_text()
        for pattern in self.fatal_stderr:
            if pattern in err:
                self.kill()
                raise GuestError(self._describe(f"QEMU reported {pattern!r}; guest killed"))

    def _deadline(self, timeout: float | None) -> float:
        hard = self._started + self.timeout
        return hard if timeout is None else min(hard, time.monotonic() + timeout)

    def wait_for_console(self, text: str, timeout: float | None = None) -> None:
        """Wait until ``text`` appears on the console; GuestTimeout (QEMU killed) if it does not
        within ``timeout`` (or the hard limit), GuestError if QEMU exits first."""
        if self._proc is None:
            raise RigError("QemuGuest.wait_for_console: not started")
        deadline = self._deadline(timeout)
        while text not in self.console_text():
            if self._proc.poll() is not None:
                raise GuestError(self._describe(f"QEMU exited before printing {text!r}"))
            self._check_fatal()
            if time.monotonic() > deadline:
                self.kill()
                raise GuestTimeout(self._describe(f"no {text!r} on the console in time"))
            time.sleep(0.05)

    def wait(self, timeout: float | None = None, *, check: bool = True) -> GuestResult:
        """Wait for QEMU to exit and return what the guest reported.

        After ``timeout`` seconds (or the hard limit) QEMU is killed and GuestTimeout raised.
        GuestError if QEMU failed, printed one of :attr:`fatal_stderr` (QEMU is killed), or the
        guest printed no ``@@EXIT``; with ``check``, also if the guest's exit status is not 0.
        """
        if self._proc is None:
            raise RigError("QemuGuest.wait: not started")
        deadline = self._deadline(timeout)
        while self._proc.poll() is None:
            self._check_fatal()
            if time.monotonic() > deadline:
                self.kill()
                elapsed = time.monotonic() - self._started
                raise GuestTimeout(
                    self._describe(f"guest still running after {elapsed:.0f}s, killed")
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(0.1)
        result = self._result(self._proc)
        if self._proc.returncode != 0:
            raise GuestError(self._describe(f"QEMU exited with status {self._proc.returncode}"))
        if result.exit_code is None:
            raise GuestError(self._describe("the guest ended without printing @@EXIT"))
        if check and result.exit_code != 0:
            raise GuestError(
                self._describe(f"the guest's test exited with status {result.exit_code}")
            )
        return result

    def cleanup(self) -> None:
        """Kill QEMU and remove the work directory if this object created it."""
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
