"""The device's datapath alone (in-process, no VMM, no guest) next to the host's own ceiling.

For each block size, the in-process driver lays out ``depth`` read requests once; then the
same heads are published again and again and the device drains them, so what is timed is the
device side only: ring walk, request parsing, preadv into guest memory, used ring. The ceiling
is fio with the psync engine on the same file, and a bare Python preadv loop into one buffer.

    python -m bench.inprocess_suite [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.backends import data_image
from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import REQ_HEADER, BlkRequestType
from pyvirtio.storage.raw import RawImage

SIZES = [4096, 65536, 262144, 1 << 20]
IMAGE_SIZE = 512 << 20
DEPTH = 8


def device_rate(image: Path, bs: int, seconds: float) -> tuple[float, float]:
    """(bytes/s, requests/s) of the device draining pre-built read requests."""
    device = BlkDevice(RawImage(str(image)), queue_size=256)
    machine = InProcessMachine(device, memory_size=DEPTH * bs + (16 << 20))
    driver = BlkDriver(machine.driver(), queue_size=256)
    driver.segment_size = bs
    blocks = IMAGE_SIZE // bs
    for i in range(DEPTH):
        driver.submit(BlkRequestType.IN, (i * 7919 % blocks) * bs // 512, in_len=bs, kick=False)
    queue = driver.queues[0]
    heads = list(queue._pending)
    headers = [
        machine.memory.buffers(p.token.buffers[0][0], REQ_HEADER.size, True)[0]
        for p in queue._pending.values()
    ]
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for header in headers:  # a new random block for every request, as fio does
            REQ_HEADER.pack_into(
                header, 0, BlkRequestType.IN, 0, (count * 7919 % blocks) * bs // 512
            )
            count += 1
        queue.publish_heads(heads)
        device.process_queue(0)
    elapsed = time.perf_counter() - start
    machine.close()
    device.image.close()
    return count * bs / elapsed, count / elapsed


def preadv_rate(image: Path, bs: int, seconds: float) -> float:
    fd = os.open(image, os.O_RDONLY)
    buf = memoryview(mmap.mmap(-1, bs))
    blocks = IMAGE_SIZE // bs
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        os.preadv(fd, [buf], (count * 7919 % blocks) * bs)
        count += 1
    buf.release()
    elapsed = time.perf_counter() - start
    os.close(fd)
    return count * bs / elapsed


def fio_rate(image: Path, bs: int, seconds: float) -> float:
    out = subprocess.run(
        [
            "fio",
            "--name=host",
            f"--filename={image}",
            "--rw=randread",
            f"--bs={bs}",
            "--ioengine=psync",
            "--invalidate=0",  # the file is in the page cache: keep it there
            "--fadvise_hint=0",
            "--norandommap",
            "--time_based",
            f"--runtime={seconds:g}",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout)["jobs"][0]["read"]["bw_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("fio is needed (Debian: fio)")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="pyvirtio-ibench-")  # removed at exit
    image = data_image(Path(scratch.name) / "disk.img", IMAGE_SIZE)
    rows = []
    for bs in SIZES:
        # Best of three for everyone: a ceiling is a maximum, and the host is shared.
        dev_bw, dev_rps = max(device_rate(image, bs, args.seconds) for _ in range(3))
        py_bw = max(preadv_rate(image, bs, args.seconds) for _ in range(3))
        fio_bw = max(fio_rate(image, bs, args.seconds) for _ in range(3))
        ceiling = max(py_bw, fio_bw)
        rows.append(
            {
                "bs": bs,
                "device_bw": dev_bw,
                "device_rps": dev_rps,
                "preadv_bw": py_bw,
                "fio_psync_bw": fio_bw,
                "ratio_to_ceiling": dev_bw / ceiling,
            }
        )
        print(
            f"bs {bs:>8}: device {dev_bw / 1e9:6.2f} GB/s ({dev_rps:8.0f} req/s), "
            f"python preadv {py_bw / 1e9:6.2f} GB/s, fio psync {fio_bw / 1e9:6.2f} GB/s, "
            f"device / ceiling {dev_bw / ceiling:.2f}",
            flush=True,
        )
    (args.out / "inprocess.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| block size | device GB/s | device requests/s | Python preadv GB/s | fio psync GB/s "
        "| device / best of both |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['bs'] >> 10}K | {r['device_bw'] / 1e9:.2f} | {r['device_rps']:.0f} "
            f"| {r['preadv_bw'] / 1e9:.2f} | {r['fio_psync_bw'] / 1e9:.2f} "
            f"| {r['ratio_to_ceiling']:.2f} |"
        )
    (args.out / "inprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
