"""apt for a foreign architecture (arm64) on a private state directory.

The host's apt configuration is left alone: the package lists, the package cache and a
sources file (the host's Debian mirrors, with ``deb-src`` added and ``Architectures: arm64``)
live under ``<cache>/xen/apt``. Downloaded .debs are kept under ``<cache>/xen/debs``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from rigs import RigError

LISTS_MAX_AGE = 24 * 3600.0  # refresh the lists once a day (PYVIRTIO_XEN_APT_UPDATE=1: always)

_FALLBACK_SOURCES = (
    ("http://deb.debian.org/debian", "bookworm bookworm-updates", ""),
    ("http://deb.debian.org/debian-security", "bookworm-security", ""),
)
_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _host_debian_sources() -> list[tuple[str, str, str]]:
    """(URI, suites, signed-by) of the host's enabled Debian ``deb`` sources."""
    found: list[tuple[str, str, str]] = []
    parts = Path("/etc/apt/sources.list.d")
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line and not line.startswith("#") and ":" in line:
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "main" not in fields.get("components", "").split():
                continue
            for uri in fields.get("uris", "").split():
                if "/debian" in uri:
                    found.append((uri, fields.get("suites", ""), fields.get("signed-by", "")))
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 4 and words[0] == "deb" and "/debian" in words[1]:
                found.append((words[1], words[2], ""))
    return found


def sources_text(arch: str) -> str:
    """A deb822 sources file: the host's Debian mirrors, ``deb`` and ``deb-src``, for ``arch``."""
    stanzas = []
    for uri, suites, signed in _host_debian_sources() or list(_FALLBACK_SOURCES):
        signed_by = signed or (_KEYRING if Path(_KEYRING).exists() else "")
        stanza = (
            f"Types: deb deb-src\nURIs: {uri}\nSuites: {suites}\nComponents: main\n"
            f"Architectures: {arch}\n"
        )
        if signed_by:
            stanza += f"Signed-By: {signed_by}\n"
        stanzas.append(stanza)
    return "\n".join(stanzas)


def backports_sources_text(arch: str) -> str:
    """A deb822 sources file with only the backports suite of the host's Debian release (e.g.
    ``bookworm-backports``), ``deb`` only, for ``arch``."""
    for uri, suites, signed in _host_debian_sources() or list(_FALLBACK_SOURCES):
        release = suites.split()[0] if suites.split() else ""
        if release and "-" not in release:
            signed_by = signed or (_KEYRING if Path(_KEYRING).exists() else "")
            stanza = (
                f"Types: deb\nURIs: {uri}\nSuites: {release}-backports\nComponents: main\n"
                f"Architectures: {arch}\n"
            )
            return stanza + (f"Signed-By: {signed_by}\n" if signed_by else "")
    raise RigError("no Debian release among the host's apt sources to take backports from")


def parse_depends(record: dict[str, str]) -> list[list[str]]:
    """Pre-Depends and Depends of a package record: alternatives (names, arch qualifiers
    and version constraints dropped)."""
    deps: list[list[str]] = []
    for key in ("Pre-Depends", "Depends"):
        for clause in record.get(key, "").split(","):
            alts = [a.strip().split(" ")[0].split(":")[0] for a in clause.split("|")]
            alts = [a.split("(")[0] for a in alts if a]
            if alts:
                deps.append(alts)
    return deps


def compare_versions(a: str, b: str) -> int:
    """Debian version comparison (dpkg --compare-versions): -1, 0 or 1."""
    if a == b:
        return 0
    lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode == 0
    return -1 if lt else 1


def newest_first(versions: Iterable[str]) -> list[str]:
    """Versions sorted newest first."""
    return sorted(set(versions), key=functools.cmp_to_key(compare_versions), reverse=True)


class ForeignApt:
    """apt-get / apt-cache for ``arch`` with private lists, cache and sources under ``root``."""

    def __init__(
        self, root: Path, debs: Path, arch: str = "arm64", sources: str | None = None
    ) -> None:
        """``sources``: the sources file's text (default: :func:`sources_text`)."""
        text = sources if sources is not None else sources_text(arch)
        self.root = root
        self.debs = debs
        self.arch = arch
        self.lists = root / "lists"
        self.parts = root / "sources.list.d"
        for d in (self.lists / "partial", root / "cache" / "archives" / "partial", self.parts):
            d.mkdir(parents=True, exist_ok=True)
        self.debs.mkdir(parents=True, exist_ok=True)
        (root / "status").touch()
        path = self.parts / "debian.sources"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            (self.lists / ".updated").unlink(missing_ok=True)

    def options(self) -> list[str]:
        """The -o options that make apt use the private state."""
        return [
            f"-oAPT::Architecture={self.arch}",
            f"-oAPT::Architectures={self.arch}",
            f"-oDir::State::Lists={self.lists}",
            f"-oDir::State::status={self.root / 'status'}",
            f"-oDir::Cache={self.root / 'cache'}",
            "-oDir::Cache::pkgcache=pkgcache.bin",
            "-oDir::Cache::srcpkgcache=srcpkgcache.bin",
            "-oDir::Etc::SourceList=/dev/null",
            f"-oDir::Etc::SourceParts={self.parts}",
            "-oAPT::Sandbox::User=root",
            "-oAcquire::Retries=3",
        ]

    def _run(self, tool: str, args: list[str], cwd: Path | None = None) -> str:
        cmd = [tool, *self.options(), *args]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RigError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def lists_time(self) -> float:
        """When the lists were last refreshed (0 if never)."""
        stamp = self.lists / ".updated"
        return stamp.stat().st_mtime if stamp.exists() else 0.0

    def update(self, max_age: float = LISTS_MAX_AGE) -> None:
        """``apt-get update`` unless the lists are younger than ``max_age`` seconds.

        A failed refresh of existing lists only warns (offline runs keep working)."""
        stamp = self.lists / ".updated"
        forced = os.environ.get("PYVIRTIO_XEN_APT_UPDATE") == "1"
        if not forced and stamp.exists() and time.time() - stamp.stat().st_mtime < max_age:
            return
        try:
            self._run("apt-get", ["-q", "update"])
        except RigError as err:
            if not stamp.exists():
                raise
            print(f"rigs.xen: apt-get update failed, using the old lists: {err}")
            return
        stamp.touch()

    def show(self, package: str, version: str | None = None) -> dict[str, str] | None:
        """The package record (candidate, or ``version``) as field -> value; None if there is
        no such real package (a virtual one, or a typo)."""
        spec = package if version is None else f"{package}={version}"
        cmd = ["apt-cache", *self.options(), "show", "--no-all-versions", spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        record: dict[str, str] = {}
        key = ""
        for line in proc.stdout.split("\n\n")[0].splitlines():
            if line.startswith((" ", "\t")) and key:
                record[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                record[key] = value.strip()
        return record

    def version(self, package: str) -> str:
        """The candidate version of ``package``; RigError if there is none."""
        record = self.show(package)
        if record is None or "Version" not in record:
            raise RigError(f"no {self.arch} package {package} in the lists")
        return record["Version"]

    def deb_path(self, package: str, version: str) -> Path:
        """Where :meth:`download` keeps ``package=version``."""
        return self.debs / f"{package}_{version.replace(':', '%3a')}_{self.arch}.deb"

    def download(self, pins: dict[str, str]) -> dict[str, Path]:
        """Download ``package -> version`` pairs not yet kept; return package -> .deb path."""
        wanted = {p: v for p, v in pins.items() if not self.deb_path(p, v).is_file()}
        for package, version in wanted.items():
            with tempfile.TemporaryDirectory(dir=self.debs, prefix=".dl-") as tmp:
                self._run("apt-get", ["-q", "download", f"{package}={version}"], cwd=Path(tmp))
                got = list(Path(tmp).glob("*.deb"))
                if len(got) != 1:
                    raise RigError(f"apt-get download {package}={version} left {got}")
                shutil.move(str(got[0]), self.deb_path(package, version))
        return {p: self.deb_path(p, v) for p, v in pins.items()}

    def source_versions(self, package: str) -> dict[str, list[str]]:
        """Version -> binary package names, for a source package in the deb-src lists,
        newest version first."""
        out = self._run("apt-cache", ["showsrc", package])
        found: dict[str, list[str]] = {}
        for record in out.split("\n\n"):
            version = re.search(r"^Version:\s*(\S+)", record, re.MULTILINE)
            binary = re.search(r"^Binary:\s*(.*(?:\n\s.*)*)", record, re.MULTILINE)
            if version:
                names = binary.group(1).replace("\n", " ").split(",") if binary else []
                found[version.group(1)] = [n.strip() for n in names if n.strip()]
        return {v: found[v] for v in newest_first(found)}

    def download_source(self, package: str, version: str, dest: Path) -> list[Path]:
        """``apt-get source --download-only package=version`` into ``dest``; the files got."""
        dest.mkdir(parents=True, exist_ok=True)
        self._run("apt-get", ["-q", "source", "--download-only", f"{package}={version}"], cwd=dest)
        return sorted(dest.iterdir())


def newest_source(
    apt: ForeignApt, package: str, into: Path, wanted: str
) -> tuple[str, list[str], Path]:
    """The newest source version of ``package`` whose files can be had: (version, its binary
    package names, its first file matching the glob ``wanted``, e.g. ``*.dsc``). Sources
    already downloaded into ``into/<version>`` are used as they are; versions the mirror cannot
    give (a 404, seen for superseded security uploads) are skipped, and not asked for again
    until the next ``apt-get update``."""
    versions = apt.source_versions(package)
    if not versions:
        raise RigError(f"no deb-src entry for {package}: are the deb-src lists updated?")
    errors: list[str] = []
    into.mkdir(parents=True, exist_ok=True)
    for version, binaries in versions.items():
        dest = into / version.replace(":", "%3a")
        found = sorted(dest.glob(wanted)) if dest.is_dir() else []
        failed = into / f".unavailable-{version.replace(':', '%3a')}"
        if not found and failed.exists() and failed.stat().st_mtime >= apt.lists_time():
            errors.append(f"{version}: failed before (since the last apt-get update)")
            continue
        if not found:
            with tempfile.TemporaryDirectory(dir=into, prefix=".src-") as tmp:
                try:
                    apt.download_source(package, version, Path(tmp))
                except RigError as err:
                    errors.append(f"{version}: {str(err)[-300:]}")
                    failed.write_text(str(err))
                    continue
                shutil.rmtree(dest, ignore_errors=True)
                Path(tmp).rename(dest)
                dest.chmod(0o755)
            found = sorted(dest.glob(wanted))
        if found:
            return version, binaries, found[0]
        errors.append(f"{version}: no {wanted} among the downloaded files")
    raise RigError(f"no {package} source version could be downloaded:\n" + "\n".join(errors))
