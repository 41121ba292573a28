"""Choosing, downloading and unpacking the arm64 packages of a file tree, with the shared
libraries its ELF files need.

The caller names root packages; every ELF file's DT_NEEDED sonames (see :mod:`rigs.xen.libs`)
must then be found in the tree. A missing soname is looked for in the Depends of the package
that owns the needing file (then in their Depends), so only library packages that are really
loaded get in -- not the whole dependency closure (udev, perl, debconf, ...).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rigs import RigError
from rigs.xen.apt import ForeignApt, parse_depends
from rigs.xen.libs import missing, provides
from rigs.xen.tree import FileTree

MAX_DEPTH = 3  # how far down Depends a missing soname is looked for


@dataclass(frozen=True)
class Package:
    """A downloaded and unpacked .deb."""

    name: str
    version: str
    deb: Path
    root: Path  # the dpkg -x tree
    depends: tuple[tuple[str, ...], ...]

    @property
    def key(self) -> str:
        """``name=version``."""
        return f"{self.name}={self.version}"


def unpack(deb: Path, into: Path) -> Path:
    """``dpkg -x`` ``deb`` once into ``into/<deb stem>``; return that directory."""
    dest = into / deb.name.removesuffix(".deb")
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into, prefix=".x-") as tmp:
        tree = Path(tmp) / "t"
        proc = subprocess.run(
            ["dpkg", "-x", str(deb), str(tree)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RigError(f"dpkg -x {deb} failed: {proc.stderr.strip()}")
        (tree / ".complete").touch()
        tree.rename(dest)
    return dest


class Packages:
    """Package lookup with pinned versions, downloading and unpacking on first use."""

    def __init__(self, apt: ForeignApt, unpacked: Path, pins: Mapping[str, str]) -> None:
        self.apt = apt
        self.unpacked = unpacked
        self.pins = dict(pins)
        self._known: dict[str, Package | None] = {}

    def get(self, name: str) -> Package | None:
        """The package (pinned or candidate version), or None if there is no such package."""
        if name not in self._known:
            record = self.apt.show(name, self.pins.get(name))
            if record is None:
                self._known[name] = None
            else:
                version = record["Version"]
                deb = self.apt.download({name: version})[name]
                deps = tuple(tuple(alts) for alts in parse_depends(record))
                self._known[name] = Package(name, version, deb, unpack(deb, self.unpacked), deps)
        return self._known[name]

    def need(self, name: str) -> Package:
        """Like :meth:`get`, but a missing package is an error."""
        package = self.get(name)
        if package is None:
            raise RigError(f"no {self.apt.arch} package {name!r} (pinned: {self.pins.get(name)})")
        return package


def _candidates(packages: Packages, start: Package, skip: set[str]) -> Iterable[Package]:
    """Packages in ``start``'s Depends, breadth first, to MAX_DEPTH levels."""
    level = [start]
    seen = set(skip) | {start.name}
    for _ in range(MAX_DEPTH):
        following: list[Package] = []
        for package in level:
            for alts in package.depends:
                for name in alts:
                    if name in seen:
                        continue
                    seen.add(name)
                    found = packages.get(name)
                    if found is not None:
                        yield found
                        following.append(found)
        level = following


def _provider(
    packages: Packages,
    tree: FileTree,
    chosen: list[Package],
    soname: str,
    needers: list[str],
    exclude: Sequence[str],
) -> Package | None:
    """The first package down the needers' owners' Depends that has ``soname``."""
    owners = {tree.entries[n].origin for n in needers}
    skip = {p.name for p in chosen}
    for start in (p for p in chosen if p.name in owners):
        for candidate in _candidates(packages, start, skip):
            sub = FileTree()
            sub.add_unpacked(candidate.root, candidate.name, exclude)
            if provides(sub, {soname}):
                return candidate
    return None


def build_tree(
    packages: Packages,
    roots: Sequence[str],
    exclude: Sequence[str] = (),
) -> tuple[FileTree, list[Package]]:
    """A tree of the ``roots`` packages plus the library packages their ELF files need.

    ``exclude`` are fnmatch patterns of archive paths to leave out (documentation, unused
    programs); excluded files need no libraries. RigError names sonames no package provides.
    """
    tree = FileTree()
    chosen: list[Package] = []
    for name in roots:
        package = packages.need(name)
        tree.add_unpacked(package.root, package.name, exclude)
        chosen.append(package)
    while gaps := missing(tree):
        added = False
        for soname, needers in sorted(gaps.items()):
            if provides(tree, {soname}):
                continue  # a package added for an earlier soname brought it
            provider = _provider(packages, tree, chosen, soname, needers, exclude)
            if provider is not None:
                tree.add_unpacked(provider.root, provider.name, exclude)
                chosen.append(provider)
                added = True
        if not added:
            lines = [f"  {s} (needed by {', '.join(sorted(n)[:3])})" for s, n in gaps.items()]
            raise RigError("no package provides these libraries:\n" + "\n".join(lines))
    return tree, chosen
