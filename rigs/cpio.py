"""A writer for newc ("070701") cpio archives, the format Linux unpacks as initramfs.

Linux accepts several archives concatenated (each optionally compressed on its own), later
members overriding files of earlier ones: that is how per-test files are appended to a cached
base initramfs without rebuilding it.
"""

from __future__ import annotations

import gzip
import stat
from pathlib import PurePosixPath
from typing import BinaryIO, Protocol

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class Sink(Protocol):
    """Anything with a binary ``write`` (a file, a GzipFile, a BytesIO)."""

    def write(self, data: bytes, /) -> object:
        """Write bytes."""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Write entries of a newc archive to a binary stream; :meth:`close` writes the trailer.

    Parent directories are added automatically (the kernel does not create them), each once.
    """

    def __init__(self, out: Sink, *, first_inode: int = 1, mtime: int = 0) -> None:
        self._out = out
        self._ino = first_inode
        self._mtime = mtime
        self._dirs: set[str] = {""}
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,  # c_ino
            mode,  # c_mode
            0,  # c_uid
            0,  # c_gid
            2 if stat.S_ISDIR(mode) else 1,  # c_nlink
            self._mtime,  # c_mtime
            len(data),  # c_filesize
            0,  # c_devmajor
            0,  # c_devminor
            0,  # c_rdevmajor
            0,  # c_rdevminor
            len(encoded),  # c_namesize
            0,  # c_check
        )
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    @staticmethod
    def _norm(path: str) -> str:
        norm = str(PurePosixPath("/", path))[1:]
        if not norm or ".." in PurePosixPath(norm).parts:
            raise ValueError(f"bad archive path {path!r}")
        return norm

    def _parents(self, norm: str) -> None:
        for parent in reversed(PurePosixPath(norm).parents):
            self.mkdir(str(parent))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents) unless already added."""
        if path in ("", ".", "/"):
            return
        norm = self._norm(path)
        if norm in self._dirs:
            return
        self._parents(norm)
        self._dirs.add(norm)
        self._entry(norm, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given contents."""
        norm = self._norm(path)
        self._parents(norm)
        self._entry(norm, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path -> target``.

        Later paths through the link get no directory entry of their own: the kernel would
        replace the link with a directory.
        """
        norm = self._norm(path)
        self._parents(norm)
        self._dirs.add(norm)
        self._entry(norm, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, char: bool, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node (e.g. /dev/console, needed before devtmpfs is mounted)."""
        norm = self._norm(path)
        self._parents(norm)
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        name = norm.encode() + b"\0"
        fields = (self._ino, kind | mode, 0, 0, 1, self._mtime, 0, 0, 0, major, minor, len(name), 0)
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name + _pad4(len(header) + len(name)))

    def close(self) -> None:
        """Write the trailer entry (once)."""
        if not self._closed:
            self._entry(_TRAILER, 0)
            self._closed = True


def write_archive(
    out: BinaryIO,
    files: dict[str, bytes],
    *,
    compress: bool = True,
    mode: int = 0o755,
    first_inode: int = 1 << 24,
) -> None:
    """Write ``files`` (archive path -> contents) as one (gzip-compressed) newc archive."""
    if compress:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
            _write_files(gz, files, mode, first_inode)
    else:
        _write_files(out, files, mode, first_inode)


def _write_files(out: Sink, files: dict[str, bytes], mode: int, first_inode: int) -> None:
    writer = CpioWriter(out, first_inode=first_inode)
    for path, data in files.items():
        writer.add_file(path, data, mode)
    writer.close()
