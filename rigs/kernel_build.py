"""What the rig's kernel builders share: a small kernel from a Debian ``linux-source-X.Y``
package (arch all: the source tarball under ``/usr/src``), ``allnoconfig`` plus a list of
options that must all be built in.

* :func:`unpack_source` -- the source tree out of the package's .deb;
* :func:`cache_key` -- the key a build is cached under;
* :func:`allnoconfig` -- the .config, with the check that every option is ``=y``.

The builders (:mod:`rigs.peripheral_kernel` for x86_64, :mod:`rigs.xen.grant_kernel` for arm64)
add the architecture, the compiler, the make target and the layout of what they keep.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

from rigs import RigError
from rigs.host import find_tool
from rigs.xen.crossbuild import run_logged


def unpack_source(deb: Path, dest: Path, source_package: str) -> Path:
    """Stream ``source_package``'s tarball out of its .deb ``deb`` and unpack it into ``dest``
    (no copy of the tarball on disk); return the tree, which must have a Makefile."""
    tarball = f"./usr/src/{source_package}.tar.xz"
    deb_tar = subprocess.Popen(
        [str(find_tool("dpkg-deb")), "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE
    )
    inner = subprocess.Popen(["tar", "-xO", tarball], stdin=deb_tar.stdout, stdout=subprocess.PIPE)
    assert deb_tar.stdout is not None and inner.stdout is not None
    deb_tar.stdout.close()
    untar = subprocess.run(
        ["tar", "-xJ", "-C", str(dest)],
        stdin=inner.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    inner.stdout.close()
    if deb_tar.wait() != 0 or inner.wait() != 0 or untar.returncode != 0:
        raise RigError(f"cannot unpack {tarball} from {deb.name}: {untar.stderr.strip()[-500:]}")
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
        raise RigError(f"{deb.name}: the tarball does not unpack to one tree with a Makefile")
    return tops[0]


def cache_key(
    build_format: int,
    version: str,
    config: Sequence[str],
    compiler: str,
    patch: Path | None = None,
) -> str:
    """The cache key of a build of source ``version`` with ``config`` by the compiler whose
    ``--version`` is ``compiler`` (and with ``patch``); a new ``build_format`` rebuilds."""
    h = hashlib.sha256()
    for part in (str(build_format), version, "\n".join(config), compiler):
        h.update(part.encode() + b"\n")
    if patch is not None:
        h.update(patch.read_bytes())
    return h.hexdigest()[:12]


def allnoconfig(
    src: Path,
    make: Sequence[str],
    config: Sequence[str],
    log: Path,
    extra: Sequence[str] = (),
) -> str:
    """Configure the tree ``src`` with ``make`` (the command with its ARCH and CROSS_COMPILE):
    ``allnoconfig`` with ``CONFIG_<option>=y`` for each of ``config`` plus the ``extra`` lines
    as ``KCONFIG_ALLCONFIG`` (written beside the tree). Return the .config; RigError if an
    option of ``config`` is not ``=y`` in it (a dependency missing)."""
    fragment = src.parent / "fragment.config"
    fragment.write_text(
        "".join(f"CONFIG_{opt}=y\n" for opt in config) + "".join(f"{line}\n" for line in extra)
    )
    run_logged([*make, f"KCONFIG_ALLCONFIG={fragment}", "allnoconfig"], src, log, "allnoconfig")
    text = (src / ".config").read_text()
    lines = text.splitlines()
    missing = [o for o in config if f"CONFIG_{o}=y" not in lines]
    if missing:
        raise RigError(f"allnoconfig left these unset (dependencies?): {missing}")
    return text
