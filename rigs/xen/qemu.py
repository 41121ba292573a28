"""Boot Xen + dom0 in ``qemu-system-aarch64 -M virt,virtualization=on`` (TCG).

QEMU loads the hypervisor with ``-kernel``; dom0's kernel and initramfs come in through two
``guest-loader`` devices (they become the DT's xen,multiboot-module nodes). The serial console
(Xen's, which carries dom0's hvc0) is captured to a file; dom0's /init prints
``@@RESULT <key> <value>`` lines and a final ``@@EXIT <status>``, then powers the machine off.
A run without ``@@EXIT`` is a failure whose message ends with the console's tail.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rigs import RigError
from rigs.qemu import GuestError, GuestResult, GuestTimeout, QemuProcess

QEMU = "qemu-system-aarch64"
XEN_ARGS = ("dom0_mem=768M", "dom0_max_vcpus=1", "console=dtuart")
DOM0_ARGS = ("console=hvc0", "earlycon=xen", "rdinit=/init")
KERNEL_ADDR = 0x49000000
INITRD_ADDR = 0x50000000
DEFAULT_TIMEOUT = 900.0
EXIT_GRACE = 30.0  # after @@EXIT, how long QEMU may take to power off before it is killed
CONSOLE_TAIL_LINES = 60


class XenMachine(QemuProcess):
    """One qemu-system-aarch64 running Xen and dom0; :meth:`start` then :meth:`wait`, or use it
    as a context manager (QEMU is killed on exit). ``timeout`` is a hard wall-clock limit."""

    tail_lines = CONSOLE_TAIL_LINES
    install_hint = "apt-get install qemu-system-arm"

    def __init__(
        self,
        hypervisor: Path,
        kernel: Path,
        initrd: Path,
        *,
        xen_args: Sequence[str] = XEN_ARGS,
        dom0_args: Sequence[str] = (*DOM0_ARGS, "quiet"),
        memory_mib: int = 2048,
        smp: int = 2,
        timeout: float = DEFAULT_TIMEOUT,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        qemu: str = QEMU,
    ) -> None:
        self.hypervisor = hypervisor
        self.kernel = kernel
        self.initrd = initrd
        self.xen_args = list(xen_args)
        self.dom0_args = list(dom0_args)
        self.memory_mib = memory_mib
        self.smp = smp
        self.extra_args = list(extra_args)
        super().__init__(
            qemu, timeout, workdir or Path(tempfile.mkdtemp(prefix="rigs-xen-")), "XenMachine"
        )

    def command(self) -> list[str]:
        """The full QEMU command line."""
        for arg in self.dom0_args:
            if "," in arg:
                raise RigError(f"dom0 argument {arg!r}: commas do not survive -device")
        return [
            self.qemu,
            "-M", "virt,virtualization=on,gic-version=3",
            "-cpu", "cortex-a57",
            "-accel", "tcg",
            "-smp", str(self.smp),
            "-m", str(self.memory_mib),
            "-nographic",
            "-no-reboot",
            "-kernel", str(self.hypervisor),
            "-append", " ".join(self.xen_args),
            "-device", f"guest-loader,addr={KERNEL_ADDR:#x},kernel={self.kernel},"
                       f"bootargs={' '.join(self.dom0_args)}",
            "-device", f"guest-loader,addr={INITRD_ADDR:#x},initrd={self.initrd}",
            *self.extra_args,
        ]  # fmt: skip

    def _check_inputs(self) -> None:
        for path in (self.hypervisor, self.kernel, self.initrd):
            if not path.is_file():
                raise RigError(f"XenMachine: {path} does not exist")

    def wait(self, *, check: bool = True) -> GuestResult:
        """Wait for ``@@EXIT`` and QEMU's exit; return what dom0 reported.

        GuestTimeout (QEMU killed) past the hard limit; GuestError if QEMU exits without
        ``@@EXIT``, or (with ``check``) if the status is not 0. QEMU still running
        :data:`EXIT_GRACE` seconds after ``@@EXIT`` is killed (not an error)."""
        proc = self._proc
        if proc is None:
            raise RigError("XenMachine.wait: not started")
        deadline = self._started + self.timeout
        exit_seen: float | None = None
        while proc.poll() is None:
            now = time.monotonic()
            if exit_seen is None and "@@EXIT" in self.console_text():
                exit_seen = now
            if exit_seen is not None and now - exit_seen > EXIT_GRACE:
                self.kill()
                break
            if now > deadline:
                self.kill()
                raise GuestTimeout(
                    self._describe(f"no @@EXIT within {self.timeout:.0f} s; QEMU killed")
                )
            time.sleep(0.2)
        result = self._result(proc)
        if result.exit_code is None:
            raise GuestError(
                self._describe(f"dom0 ended without @@EXIT (QEMU status {proc.returncode})")
            )
        if check and result.exit_code != 0:
            raise GuestError(self._describe(f"the dom0 test exited with status {result.exit_code}"))
        return result
