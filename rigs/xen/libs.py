"""Shared-library closure of a :class:`~rigs.xen.tree.FileTree`: which DT_NEEDED sonames (and
PT_INTERP loaders) of its ELF files the tree cannot satisfy, searched like ld.so does."""

from __future__ import annotations

import functools
import posixpath
import re
from pathlib import Path

from rigs.xen.elf import ElfInfo, is_elf, read_elf
from rigs.xen.tree import FileTree, canonical

TRIPLET = "aarch64-linux-gnu"
DEFAULT_DIRS = (f"usr/lib/{TRIPLET}", "usr/lib")


def ld_so_conf_dirs(tree: FileTree) -> list[str]:
    """Directories listed by etc/ld.so.conf.d/*.conf in the tree (need ldconfig at runtime)."""
    dirs: list[str] = []
    for arc, entry in tree.files():
        if arc.startswith("etc/ld.so.conf.d/") and arc.endswith(".conf"):
            for line in entry.content().decode(errors="replace").splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("/"):
                    dirs.append(canonical(line))
    return dirs


@functools.cache
def _parse(source: Path) -> ElfInfo | None:
    return read_elf(source) if is_elf(source) else None


def elf_files(tree: FileTree) -> dict[str, ElfInfo]:
    """Archive path -> parsed ELF for every ELF file in the tree (kernel modules excluded)."""
    found: dict[str, ElfInfo] = {}
    for arc, entry in tree.files():
        if arc.endswith(".ko") or entry.source is None:
            continue
        info = _parse(entry.source)
        if info is not None:
            found[arc] = info
    return found


def _search_dirs(arc: str, info: ElfInfo, extra: list[str]) -> list[str]:
    origin = "/" + posixpath.dirname(arc)
    dirs = [canonical(re.sub(r"\$\{?ORIGIN\}?", origin, p)) for p in info.runpath]
    return [*dirs, *DEFAULT_DIRS, *extra]


def missing(tree: FileTree) -> dict[str, list[str]]:
    """Unsatisfied soname (or loader path) -> the ELF files that need it."""
    extra = ld_so_conf_dirs(tree)
    gaps: dict[str, list[str]] = {}
    for arc, info in elf_files(tree).items():
        if info.interp and tree.resolve(info.interp) is None:
            gaps.setdefault(info.interp, []).append(arc)
        for soname in info.needed:
            dirs = _search_dirs(arc, info, extra)
            if not any(tree.resolve(f"{d}/{soname}") for d in dirs):
                gaps.setdefault(soname, []).append(arc)
    return gaps


def provides(tree: FileTree, sonames: set[str]) -> set[str]:
    """Which of ``sonames`` the tree has in the default or ld.so.conf directories."""
    dirs = [*DEFAULT_DIRS, *ld_so_conf_dirs(tree)]
    found = set()
    for name in sonames:
        paths = [name] if name.startswith("/") else [f"{d}/{name}" for d in dirs]
        if any(tree.resolve(p) for p in paths):
            found.add(name)
    return found
