"""An in-memory file tree for an initramfs, merged-/usr: files, symlinks and directories by
archive path, filled from unpacked .debs and written out with :class:`rigs.cpio.CpioWriter`.

Paths are canonical: ``bin``, ``sbin``, ``lib`` and ``lib64`` at the top are folded into
``usr/`` (the archive has ``bin -> usr/bin`` etc.), and symlink targets are stored absolute
and canonical, so a link keeps pointing at the same file after the fold.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rigs.cpio import CpioWriter

MERGED = ("bin", "sbin", "lib", "lib64")


def canonical(path: str) -> str:
    """The archive path (no leading slash) of ``path`` in a merged-/usr tree."""
    norm = posixpath.normpath("/" + path).lstrip("/")
    head, _, rest = norm.partition("/")
    if head in MERGED:
        return f"usr/{head}/{rest}" if rest else f"usr/{head}"
    return norm


@dataclass(frozen=True)
class Entry:
    """One archive member: a host file, literal bytes, or a symlink (``link`` set)."""

    mode: int = 0o644
    source: Path | None = None
    data: bytes | None = None
    link: str | None = None
    origin: str = ""  # the package (or "rig") it came from

    def content(self) -> bytes:
        """The file's bytes."""
        if self.data is not None:
            return self.data
        if self.source is None:
            raise ValueError("a symlink has no content")
        return self.source.read_bytes()


class FileTree:
    """Archive path -> :class:`Entry`; later additions replace earlier ones."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.dirs: set[str] = set()

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644, origin: str = "rig") -> None:
        """Add a file with literal contents."""
        self.entries[canonical(path)] = Entry(mode, data=data, origin=origin)

    def add_file(self, path: str, source: Path, mode: int | None = None, origin: str = "") -> None:
        """Add a host file (its mode unless ``mode`` is given)."""
        real = source.stat().st_mode & 0o7777 if mode is None else mode
        self.entries[canonical(path)] = Entry(real, source=source, origin=origin)

    def add_symlink(self, path: str, target: str, origin: str = "rig") -> None:
        """Add ``path -> target`` (a relative target is taken relative to ``path``'s folder)."""
        arc = canonical(path)
        if not target.startswith("/"):
            target = posixpath.join("/" + posixpath.dirname(path.lstrip("/")), target)
        self.entries[arc] = Entry(0o777, link="/" + canonical(target), origin=origin)

    def mkdir(self, path: str) -> None:
        """Add an (empty) directory."""
        self.dirs.add(canonical(path))

    def add_unpacked(self, root: Path, origin: str, exclude: Iterable[str] = ()) -> None:
        """Add everything under ``root`` (a dpkg -x tree) except paths matching ``exclude``
        (fnmatch patterns on canonical archive paths)."""
        patterns = tuple(exclude)
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            for name in [*filenames, *dirnames]:
                host = here / name
                rel = host.relative_to(root).as_posix()
                arc = canonical(rel)
                if any(fnmatch.fnmatchcase(arc, p) for p in patterns):
                    continue
                st = host.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(rel, os.readlink(host), origin)
                elif stat.S_ISREG(st.st_mode):
                    self.add_file(rel, host, origin=origin)

    def resolve(self, path: str) -> str | None:
        """Follow symlinks inside the tree; the canonical path of the file, or None."""
        arc = canonical(path)
        for _ in range(40):
            entry = self.entries.get(arc)
            if entry is None:
                return None
            if entry.link is None:
                return arc
            arc = canonical(entry.link)
        return None

    def files(self) -> Iterator[tuple[str, Entry]]:
        """Regular files (not symlinks), sorted by path."""
        for arc in sorted(self.entries):
            entry = self.entries[arc]
            if entry.link is None:
                yield arc, entry

    def write(self, cpio: CpioWriter) -> None:
        """Write the merged-/usr skeleton, directories, files and symlinks into ``cpio``."""
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
            cpio.mkdir(d)
        for link in MERGED:
            cpio.add_symlink(link, f"usr/{link}")
        for d in sorted(self.dirs):
            cpio.mkdir(d, 0o1777 if d == "tmp" else 0o755)
        for arc in sorted(self.entries):
            entry = self.entries[arc]
            if entry.link is not None:
                cpio.add_symlink(arc, entry.link)
            else:
                cpio.add_file(arc, entry.content(), entry.mode)
