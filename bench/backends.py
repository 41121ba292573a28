"""The vhost-user-blk back-ends the benchmarks compare, started on the same image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Backend:
    name: str
    proc: subprocess.Popen[bytes]
    socket: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def data_image(path: Path, size: int) -> Path:
    """A raw image full of data (so that reads are reads, not holes), flushed to disk."""
    with path.open("wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
        os.fsync(f.fileno())
    return path


def _wait_for(sock: Path, proc: subprocess.Popen[bytes], name: str) -> None:
    for _ in range(500):
        if sock.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{name} did not create {sock}")


def start_pyvirtio(
    image: Path, sock: Path, num_queues: int, direct: bool = False, io_threads: int = 0
) -> Backend:
    args = [
        sys.executable,
        "-m",
        "pyvirtio",
        "blk",
        "--image",
        str(image),
        "--socket-path",
        str(sock),
        "--num-queues",
        str(num_queues),
        "--queue-size",
        "1024",
    ]
    if direct:
        args.append("--direct")
    if io_threads:
        args += ["--io-threads", str(io_threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(args, env=env)
    _wait_for(sock, proc, "pyvirtio blk")
    return Backend(f"pyvirtio --io-threads {io_threads}" if io_threads else "pyvirtio", proc, sock)


def start_qsd(image: Path | None, sock: Path, num_queues: int, direct: bool = False) -> Backend:
    """qemu-storage-daemon's vhost-user-blk export; ``image=None`` exports a null-co device."""
    exe = shutil.which("qemu-storage-daemon")
    if exe is None:
        raise RuntimeError("qemu-storage-daemon not found (Debian: qemu-system-common)")
    if image is None:
        blockdev = ["--blockdev", "driver=null-co,node-name=disk0,size=1073741824,read-zeroes=on"]
        name = "qsd-null"
    else:
        blockdev = [
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},"
            f"cache.direct={'on' if direct else 'off'},aio=threads",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
        ]
        name = "qemu-storage-daemon"
    proc = subprocess.Popen(
        [
            exe,
            *blockdev,
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
            f"writable=on,num-queues={num_queues}",
        ]
    )
    _wait_for(sock, proc, name)
    return Backend(name, proc, sock)
