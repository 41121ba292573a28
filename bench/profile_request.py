"""Where one 4K read's time goes in the device, per I/O engine: the in-process datapath of
:mod:`bench.inprocess_suite` (pre-built requests drained again and again: ring walk, parsing,
the storage call, the used ring), timed bare and then under cProfile, the functions that take
the most time listed per request.

    python -m bench.profile_request [--seconds 2] [--depth 32] [--out out/bench]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from bench.backends import data_image
from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import REQ_HEADER, BlkRequestType
from pyvirtio.storage.raw import open_image

IMAGE_SIZE = 256 << 20
BS = 4096
TOP = 18


def drain(
    image: Path, engine: str, depth: int, seconds: float, profile: bool
) -> tuple[int, float, pstats.Stats | None]:
    device = BlkDevice(open_image(str(image), engine=engine), queue_size=256)
    machine = InProcessMachine(device, memory_size=depth * BS + (16 << 20))
    driver = BlkDriver(machine.driver(), queue_size=256)
    blocks = IMAGE_SIZE // BS
    for i in range(depth):
        driver.submit(BlkRequestType.IN, i * 8, in_len=BS, kick=False)
    queue = driver.queues[0]
    heads = list(queue._pending)
    headers = [
        machine.memory.buffers(p.token.buffers[0][0], REQ_HEADER.size, True)[0]
        for p in queue._pending.values()
    ]
    profiler = cProfile.Profile() if profile else None
    count = 0
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    while time.perf_counter() - start < seconds:
        for header in headers:
            REQ_HEADER.pack_into(header, 0, BlkRequestType.IN, 0, (count * 7919 % blocks) * 8)
            count += 1
        queue.publish_heads(heads)
        device.process_queue(0)
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - start
    machine.close()
    device.image.close()
    return count, elapsed, pstats.Stats(profiler) if profiler is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyvirtio-profile-") as work:
        image = data_image(Path(work) / "disk.img", IMAGE_SIZE)
        lines = [
            f"4K random reads, {args.depth} requests per drain, in-process (no VMM, no "
            "vhost-user socket, one thread: no GIL hand-off); us per request.",
            "",
        ]
        for engine in ("sync", "io_uring"):
            count, elapsed, _ = drain(image, engine, args.depth, args.seconds, False)
            pcount, _, stats = drain(image, engine, args.depth, args.seconds, True)
            assert stats is not None
            lines += [
                f"### {engine}: {elapsed / count * 1e6:.2f} us per request bare",
                "",
                "| function | calls/request | own us/request (profiled) |",
                "| --- | ---: | ---: |",
            ]
            entries = stats.stats  # type: ignore[attr-defined]
            total = sum(e[2] for e in entries.values())
            ranked = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)
            for (file, line, name), (_, calls, tottime, _, _) in ranked[:TOP]:
                where = f"{Path(file).name}:{line} {name}" if line else name
                lines.append(f"| `{where}` | {calls / pcount:.2f} | {tottime / pcount * 1e6:.2f} |")
            lines += ["", f"profiled total: {total / pcount * 1e6:.2f} us per request", ""]
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
