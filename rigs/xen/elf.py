"""Read the dynamic-linking facts of an ELF file (any architecture): DT_NEEDED, DT_SONAME,
DT_RUNPATH/DT_RPATH and PT_INTERP, from the program headers, without running anything."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 14, 15, 29


@dataclass(frozen=True)
class ElfInfo:
    """What the dynamic loader needs to know about one ELF object."""

    needed: tuple[str, ...] = ()
    soname: str | None = None
    runpath: tuple[str, ...] = ()
    interp: str | None = None
    machine: int = 0


def is_elf(path: Path) -> bool:
    """Whether ``path`` is a regular file starting with the ELF magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def read_elf(path: Path) -> ElfInfo:
    """Parse ``path``; static executables and objects without PT_DYNAMIC give empty fields."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        machine, phoff, phentsize, phnum = (
            struct.unpack_from(end + "H", data, 18)[0],
            struct.unpack_from(end + "Q", data, 32)[0],
            *struct.unpack_from(end + "HH", data, 54),
        )
        ph_fmt, dyn_fmt = end + "IIQQQQQQ", end + "qQ"
    else:
        machine, phoff, phentsize, phnum = (
            struct.unpack_from(end + "H", data, 18)[0],
            struct.unpack_from(end + "I", data, 28)[0],
            *struct.unpack_from(end + "HH", data, 42),
        )
        ph_fmt, dyn_fmt = end + "IIIIIIII", end + "iI"
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(phnum):
        fields = struct.unpack_from(ph_fmt, data, phoff + i * phentsize)
        if is64:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = fields[:6]
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = fields[:5]
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interp = data[p_offset : p_offset + p_filesz].split(b"\0")[0].decode()
    if dynamic is None:
        return ElfInfo(interp=interp, machine=machine)

    def file_offset(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        raise ValueError(f"{path}: address {vaddr:#x} is in no PT_LOAD segment")

    entries: list[tuple[int, int]] = []
    step = struct.calcsize(dyn_fmt)
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], step):
        tag, value = struct.unpack_from(dyn_fmt, data, pos)
        if tag == _DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((file_offset(v) for t, v in entries if t == _DT_STRTAB), None)
    if strtab is None:
        return ElfInfo(interp=interp, machine=machine)

    def string(offset: int) -> str:
        stop = data.index(b"\0", strtab + offset)
        return data[strtab + offset : stop].decode()

    needed = tuple(string(v) for t, v in entries if t == _DT_NEEDED)
    soname = next((string(v) for t, v in entries if t == _DT_SONAME), None)
    runpath: list[str] = []
    for t, v in entries:
        if t in (_DT_RUNPATH, _DT_RPATH):
            runpath += [p for p in string(v).split(":") if p]
    return ElfInfo(needed, soname, tuple(runpath), interp, machine)
