"""Cross-building for the arm64 rig with Debian's aarch64 toolchain: the compiler's identity
(part of each build's cache key) and build steps logged to one file."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rigs import RigError
from rigs.host import find_tool

CROSS_COMPILE = "aarch64-linux-gnu-"


def compiler_version() -> str:
    """``aarch64-linux-gnu-gcc --version``: a new compiler makes a new build."""
    gcc = find_tool(f"{CROSS_COMPILE}gcc")
    return subprocess.run([str(gcc), "--version"], capture_output=True, text=True).stdout


def run_logged(cmd: list[str], cwd: Path, log: Path, what: str) -> None:
    """Run ``cmd`` with its output appended to ``log``; RigError with the log's tail if it
    fails."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RigError(f"{what} failed (log: {log}):\n{tail}")
