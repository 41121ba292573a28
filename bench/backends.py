"""What the benchmarks serve: a data image, the back-ends of :mod:`rigs.backends` set up for
speed, and qemu-storage-daemon's null-co device (the load generator's ceiling)."""

from __future__ import annotations

import os
from pathlib import Path

from rigs.backends import BlkOptions, Pyvirtio, QemuStorageDaemon, RunningBackend
from rigs.host import find_tool

PYVIRTIO = Pyvirtio()
QSD = QemuStorageDaemon()
#: pyvirtio's largest ring, so that the front-end's queue size is never what limits it.
QUEUE_SIZE = 1024


def data_image(path: Path, size: int) -> Path:
    """A raw image full of data (so that reads are reads, not holes), flushed to disk."""
    with path.open("wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
        os.fsync(f.fileno())
    return path


def start_pyvirtio(image: Path, sock: Path, io_threads: int = 0) -> RunningBackend:
    return PYVIRTIO.start(image, sock, BlkOptions(queue_size=QUEUE_SIZE, io_threads=io_threads))


def start_qsd(image: Path, sock: Path, aio: str | None = None) -> RunningBackend:
    return QSD.start(image, sock, BlkOptions(aio=aio))


class NullQemuStorageDaemon(QemuStorageDaemon):
    """qemu-storage-daemon exporting a 1 GiB null-co device that reads zeros (no I/O at all);
    the image it is started with is not used."""

    name = "qsd-null"

    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        return [
            str(find_tool("qemu-storage-daemon")),
            "--blockdev",
            "driver=null-co,node-name=disk0,size=1073741824,read-zeroes=on",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},"
            f"writable=on,num-queues={options.num_queues}",
        ]


def start_null(sock: Path) -> RunningBackend:
    return NullQemuStorageDaemon().start(Path(os.devnull), sock)
