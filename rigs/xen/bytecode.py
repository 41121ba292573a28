"""Precompiled ``.pyc`` files for dom0's Python, made on the host.

Debian's python3.11 packages ship no bytecode (postinst compiles it), so dom0 would compile
every imported module at each boot, slowly under TCG. When the host runs the same Python
minor version (same bytecode magic), the sources are compiled here as unchecked-hash pycs
(valid whatever the file times in the archive). With another host version nothing is made
and dom0 compiles as before.
"""

from __future__ import annotations

import py_compile
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

TARGET = (3, 11)


def usable() -> bool:
    """Whether this interpreter writes bytecode the target Python can load."""
    return sys.version_info[:2] == TARGET


def pyc_path(arc: str) -> str:
    """Archive path of the cached bytecode for the source at archive path ``arc``."""
    path = PurePosixPath(arc)
    tag = f"cpython-{TARGET[0]}{TARGET[1]}"
    return str(path.parent / "__pycache__" / f"{path.stem}.{tag}.pyc")


def compile_sources(sources: Iterable[tuple[str, Path]]) -> dict[str, bytes]:
    """(archive path, host file) of .py sources -> {pyc archive path: bytecode}.

    Files that do not compile (e.g. Python 2 leftovers) are skipped; empty if not usable()."""
    if not usable():
        return {}
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="rigs-pyc-") as tmp:
        target = Path(tmp) / "out.pyc"
        for arc, source in sources:
            try:
                py_compile.compile(
                    str(source),
                    cfile=str(target),
                    dfile="/" + arc,
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
            except (py_compile.PyCompileError, SyntaxError, ValueError):
                continue
            out[pyc_path(arc)] = target.read_bytes()
    return out
