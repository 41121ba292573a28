"""Host tools: finding programs (also in sbin), running them, and shared-library closures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from rigs import RigError

_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_tool(name: str) -> Path:
    """The absolute path of a host program (PATH, then the sbin directories), or RigError."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_SBIN)
    found = shutil.which(name, path=path)
    if found is None:
        raise RigError(f"{name} is not installed on the host (try scripts/host-deps guest)")
    return Path(found)


def run(cmd: list[str], cwd: Path | None = None) -> bytes:
    """Run a host program (found by :func:`find_tool`); return stdout, RigError on failure."""
    argv = [str(find_tool(cmd[0])), *cmd[1:]]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise RigError(f"{' '.join(cmd)} failed with status {proc.returncode}: {err}")
    return proc.stdout


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def library_closure(binary: Path) -> list[Path]:
    """Shared libraries (and the dynamic loader) ``binary`` loads, as ``ldd`` resolves them.

    Static binaries give an empty list. A library ldd cannot find is an error.
    """
    proc = subprocess.run(
        [str(find_tool("ldd")), str(binary)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise RigError(f"ldd {binary} failed: {proc.stderr.strip()}")
    libs: list[Path] = []
    for line in proc.stdout.splitlines():
        if "not found" in line:
            raise RigError(f"ldd {binary}: {line.strip()}")
        match = _LDD_LINE.match(line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: have the child killed when its parent dies (no orphaned QEMU/back-end
    when pytest is killed before its fixtures' teardown)."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
