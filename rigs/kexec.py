"""kexec-tools for the x86 guest: Debian's amd64 package, downloaded and unpacked once.

The package is never installed on the host (its postinst would change how the host reboots):
``apt-get download`` + ``dpkg -x`` into ``<cache>/kexec-tools-amd64_<version>/``. Debian links
``kexec`` against libxenctrl (for Xen dom0 kexec), so the library packages it needs that the
host lacks (libxenmisc4.17, libxencall1, ...) are unpacked into the same tree: the soname
``ldd`` cannot find is looked for in the Depends of the unpacked packages, breadth first.

:meth:`KexecTools.initramfs_files` gives ``kexec`` and its libraries as archive paths for
:meth:`rigs.x86_guest.X86Guest.guest` ``files=``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rigs import RigError
from rigs.cache import build_lock
from rigs.host import find_tool, run

PACKAGE = "kexec-tools"
LIB_DIR = "usr/lib/x86_64-linux-gnu"
MAX_PACKAGES = 40  # a bound on the Depends search (kexec-tools needs about 10)

_LDD_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_MISSING = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$")


@dataclass(frozen=True)
class KexecTools:
    """An unpacked kexec-tools (and the libraries the host lacks) in the cache."""

    version: str
    root: Path

    @property
    def kexec(self) -> Path:
        """The kexec binary."""
        return self.root / "sbin" / "kexec"

    def libraries(self) -> list[Path]:
        """Every shared library kexec loads (host or unpacked), as ldd resolves them."""
        found, missing = _ldd(self.kexec, self.root)
        if missing:
            raise RigError(f"{self.kexec}: libraries not found: {sorted(missing)}")
        return found

    def initramfs_files(self) -> dict[str, bytes]:
        """``usr/sbin/kexec`` and its libraries (archive path -> contents)."""
        files = {"usr/sbin/kexec": self.kexec.read_bytes()}
        for lib in self.libraries():
            if lib.is_relative_to(self.root):
                arc = f"{LIB_DIR}/{lib.name}"
            else:  # a host library: where the base initramfs keeps host files (merged /usr)
                arc = str(Path(os.path.realpath(lib.parent)) / lib.name).lstrip("/")
            files[arc] = lib.read_bytes()
        return files


def _ldd(binary: Path, root: Path) -> tuple[list[Path], set[str]]:
    """(libraries found, sonames missing) for ``binary``, with ``root``'s library folder
    searched first."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{root / LIB_DIR}:{root / 'lib' / 'x86_64-linux-gnu'}"
    proc = subprocess.run(
        [str(find_tool("ldd")), str(binary)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0 and "not found" not in proc.stdout:
        raise RigError(f"ldd {binary} failed: {proc.stderr.strip()}")
    found: list[Path] = []
    missing: set[str] = set()
    for line in proc.stdout.splitlines():
        if m := _LDD_MISSING.match(line):
            missing.add(m.group(1))
        elif m := _LDD_FOUND.match(line):
            found.append(Path(m.group(2)))
        elif m := _LDD_PLAIN.match(line):
            found.append(Path(m.group(1)))
    return found, missing


def _record(package: str, version: str | None = None) -> str:
    spec = package if version is None else f"{package}={version}"
    return run(["apt-cache", "show", "--no-all-versions", spec]).decode()


def _field(record: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(.*(?:\n\s.*)*)", record, re.MULTILINE)
    return match.group(1).replace("\n", " ") if match else ""


def _depends(record: str) -> list[list[str]]:
    """Pre-Depends and Depends: each clause's alternatives (versions and arch dropped)."""
    clauses = []
    for key in ("Pre-Depends", "Depends"):
        for clause in _field(record, key).split(","):
            alts = [a.strip().split(" ")[0].split(":")[0].split("(")[0] for a in clause.split("|")]
            if any(alts):
                clauses.append([a for a in alts if a])
    return clauses


def _installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def _download_into(package: str, tree: Path, work: Path) -> str | None:
    """apt-get download the candidate of ``package``, dpkg -x it into ``tree``; its record
    (None for a virtual package)."""
    try:
        record = _record(package)
    except RigError:
        return None
    version = _field(record, "Version")
    if not version:
        return None
    with tempfile.TemporaryDirectory(dir=work, prefix=".dl-") as tmp:
        run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RigError(f"apt-get download {package}={version} left {debs}")
        run(["dpkg", "-x", str(debs[0]), str(tree)])
    return record


def ensure_kexec_tools() -> KexecTools:
    """Download and unpack the candidate kexec-tools (and missing libraries) once."""
    version = _field(_record(PACKAGE), "Version")
    if not version:
        raise RigError(f"apt-cache show {PACKAGE}: no version (run apt-get update?)")
    with build_lock() as root:
        tools = KexecTools(version, root / f"kexec-tools-amd64_{version.replace(':', '%3a')}")
        if (tools.root / ".complete").exists():
            return tools
        shutil.rmtree(tools.root, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".kexec-") as tmp:
            work = Path(tmp)
            tree = work / "tree"
            record = _download_into(PACKAGE, tree, work)
            binary = tree / "sbin" / "kexec"
            if record is None or not binary.is_file():
                raise RigError(f"{PACKAGE} {version} has no sbin/kexec")
            queue = _depends(record)
            seen = {PACKAGE}
            while (missing := _ldd(binary, tree)[1]) and queue and len(seen) < MAX_PACKAGES:
                alts = queue.pop(0)
                if any(a in seen or _installed(a) for a in alts):
                    continue
                for package in alts:
                    seen.add(package)
                    record = _download_into(package, tree, work)
                    if record is not None:
                        queue += _depends(record)
                        break
            if missing:
                raise RigError(
                    f"{PACKAGE}: no package among {sorted(seen)} provides {sorted(missing)}"
                )
            shutil.rmtree(tree / "usr" / "share", ignore_errors=True)
            shutil.rmtree(tree / "etc", ignore_errors=True)
            (tree / ".complete").write_text(f"{PACKAGE} {version}\n{' '.join(sorted(seen))}\n")
            tree.rename(tools.root)
        return tools
