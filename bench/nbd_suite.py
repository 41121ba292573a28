"""``pyvirtio blk --nbd`` over qemu-nbd against qemu-storage-daemon on the same qcow2, driven by
pyvirtio's load generator (no guest).

One qcow2 image, full of data. Each measurement starts its back-end afresh on it (the two
cannot hold the image open together: QEMU locks it), syncs, and runs one workload: pyvirtio
speaking NBD to ``qemu-nbd --cache=writeback --aio=threads``, or qemu-storage-daemon opening the
qcow2 itself (file driver, ``cache.direct=off``, ``aio=threads``, the same host page cache).
Who goes first alternates; figures are medians of per-round ratios. CPU is counted for
pyvirtio alone and for pyvirtio plus its qemu-nbd, against qemu-storage-daemon's. For scale,
the NBD hop's own ceiling: QEMU's NBD client (``qemu-img bench``, C, no vhost-user in between)
against the same qemu-nbd, same block sizes and depths (sequential offsets).

    python -m bench.nbd_suite [--rounds 3] [--runtime 3] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from rigs.backends import BlkOptions, QemuStorageDaemon, RunningBackend
from rigs.host import find_tool
from rigs.nbd import NbdServer, PyvirtioNbd, qemu_img, qemu_nbd

from bench.backends import QUEUE_SIZE, data_image
from bench.loadgen_suite import label
from pyvirtio.bench.loadgen import LoadGenerator, Workload, process_cpu_seconds

#: (rw, block size, iodepth)
WORKLOADS = [
    ("randread", 4096, 1),
    ("randread", 4096, 32),
    ("randwrite", 4096, 32),
    ("read", 65536, 16),
    ("write", 65536, 16),
    ("read", 1 << 20, 4),
    ("write", 1 << 20, 4),
]
IMAGE_SIZE = 512 << 20
OURS = "pyvirtio --nbd (qemu-nbd)"
THEIRS = "qemu-storage-daemon (qcow2)"


class Qcow2QemuStorageDaemon(QemuStorageDaemon):
    """qemu-storage-daemon with its own qcow2 driver on the image."""

    name = "qsd-qcow2"

    def command(self, image: Path, socket: Path, options: BlkOptions) -> list[str]:
        return [
            str(find_tool("qemu-storage-daemon")),
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},cache.direct=off,aio=threads,"
            "discard=unmap",
            "--blockdev",
            "driver=qcow2,node-name=disk0,file=file0,discard=unmap",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket},"
            f"writable=on,num-queues={options.num_queues},"
            f"logical-block-size={options.logical_block_size}",
        ]


def qcow2_image(work: Path) -> Path:
    """A fully allocated qcow2 full of data (so reads read and writes overwrite)."""
    raw = data_image(work / "data.raw", IMAGE_SIZE)
    image = work / "disk.qcow2"
    out = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    if out.returncode:
        raise RuntimeError(out.stderr)
    raw.unlink()
    os.sync()
    return image


def start(name: str, image: Path, work: Path) -> tuple[RunningBackend, NbdServer | None]:
    if name == THEIRS:
        return Qcow2QemuStorageDaemon().start(image, work / "qsd.sock"), None
    server = qemu_nbd(image, work / "nbd.sock").start()
    try:
        backend = PyvirtioNbd(server).start(
            image, work / "pyvirtio.sock", BlkOptions(queue_size=QUEUE_SIZE)
        )
    except BaseException:
        server.stop()
        raise
    return backend, server


def measure(
    backend: RunningBackend, server: NbdServer | None, rw: str, bs: int, depth: int, t: float
) -> dict[str, float]:
    gen = LoadGenerator(str(backend.socket), Workload(rw=rw, bs=bs, iodepth=depth, runtime=t))
    try:
        cpu0 = process_cpu_seconds(backend.pid)
        server0 = process_cpu_seconds(server.pid) if server else 0.0
        result = gen.run()
        cpu = process_cpu_seconds(backend.pid) - cpu0
        server_cpu = process_cpu_seconds(server.pid) - server0 if server else 0.0
    finally:
        gen.close()
    if result.errors:
        raise RuntimeError(f"{backend.name}: {result.errors} failed requests in {rw}")
    requests = max(1, result.completed)
    return {
        "iops": result.iops,
        "bw_bytes": result.bw_bytes,
        "p99_us": result.percentile(99) / 1000,
        "cpu_us_per_request": cpu / requests * 1e6,
        "all_cpu_us_per_request": (cpu + server_cpu) / requests * 1e6,
    }


def nbd_client_ceiling(image: Path, work: Path, runtime: float) -> dict[str, float]:
    """IOPS of QEMU's own NBD client against qemu-nbd on ``image``, per workload."""
    ceiling = {}
    server = qemu_nbd(image, work / "ceiling.sock").start()
    try:
        for rw, bs, depth in WORKLOADS:
            count = max(2000, int(runtime * (40000 if bs <= 65536 else 1500)))
            argv = [str(find_tool("qemu-img")), "bench", "-c", str(count), "-d", str(depth)]
            argv += ["-s", str(bs), *(["-w"] if "write" in rw else [])]
            argv += [
                "--image-opts",
                f"driver=nbd,server.type=unix,server.path={server.socket},export={server.export}",
            ]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            found = re.search(r"Run completed in ([0-9.]+) seconds", out)
            if found is None:
                raise RuntimeError(f"qemu-img bench: {out}")
            ceiling[label(rw, bs, depth)] = count / float(found[1])
    finally:
        server.stop()
    return ceiling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the table of a past run")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        print(render(saved["meta"], saved["summary"]), end="")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="pyvirtio-bench-")  # removed at exit
    work = Path(scratch.name)
    image = qcow2_image(work)

    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rnd in range(args.rounds):
        for i, (rw, bs, depth) in enumerate(WORKLOADS):
            key = label(rw, bs, depth)
            order = [OURS, THEIRS] if (rnd + i) % 2 == 0 else [THEIRS, OURS]
            for name in order:
                os.sync()
                backend, server = start(name, image, work)
                try:
                    figures = measure(backend, server, rw, bs, depth, args.runtime)
                finally:
                    backend.stop()
                    if server is not None:
                        server.stop()
                runs.setdefault(key, {}).setdefault(name, []).append(figures)
                print(
                    f"round {rnd + 1} {name:28} {key:18} {figures['iops']:9.0f} IOPS "
                    f"{figures['bw_bytes'] / 2**20:8.1f} MiB/s "
                    f"{figures['cpu_us_per_request']:7.1f} us CPU/req",
                    flush=True,
                )

    ceiling = nbd_client_ceiling(image, work, args.runtime)
    summary = []
    for key, by in runs.items():
        ours, theirs = by[OURS], by[THEIRS]

        def ratio(
            field: str,
            mine: str | None = None,
            ours: list[dict[str, float]] = ours,
            theirs: list[dict[str, float]] = theirs,
        ) -> float:
            return statistics.median(
                a[mine or field] / b[field] for a, b in zip(ours, theirs, strict=True) if b[field]
            )

        summary.append(
            {
                "workload": key,
                "pyvirtio_iops": statistics.median(r["iops"] for r in ours),
                "qsd_iops": statistics.median(r["iops"] for r in theirs),
                "iops_ratio": ratio("iops"),
                "cpu_per_request_ratio": ratio("cpu_us_per_request"),
                "all_cpu_per_request_ratio": ratio(
                    "cpu_us_per_request", mine="all_cpu_us_per_request"
                ),
                "qemu_nbd_client_iops": ceiling[key],
                "pyvirtio_p99_us": statistics.median(r["p99_us"] for r in ours),
                "qsd_p99_us": statistics.median(r["p99_us"] for r in theirs),
            }
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "rounds": args.rounds,
        "runtime_s": args.runtime,
        "image_mib": IMAGE_SIZE >> 20,
    }
    (args.out / "nbd.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1)
    )
    table = render(meta, summary)
    (args.out / "nbd.md").write_text(table)
    print(table)


def render(meta: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    """The Markdown table of a run (``python -m bench.nbd_suite --render out/bench/nbd.json``
    prints it again)."""
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}; "
        f"{meta['rounds']} interleaved rounds of {meta['runtime_s']:g} s per workload on a "
        f"{meta['image_mib']} MiB qcow2, medians of per-round ratios ({OURS} / {THEIRS}; "
        "for CPU lower is better). Last columns: QEMU's own NBD client against the same "
        "qemu-nbd (qemu-img bench, measured once), and pyvirtio's IOPS over it.",
        "",
        "| workload | pyvirtio IOPS | QSD IOPS | IOPS ratio | CPU/request ratio (pyvirtio) "
        "| CPU/request ratio (pyvirtio + qemu-nbd) | p99 pyvirtio / QSD (us) "
        "| QEMU NBD client IOPS | pyvirtio / QEMU NBD client |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        ours, client = s["pyvirtio_iops"], s["qemu_nbd_client_iops"]
        lines.append(
            f"| {s['workload']} | {ours:.0f} | {s['qsd_iops']:.0f} "
            f"| {s['iops_ratio']:.2f} | {s['cpu_per_request_ratio']:.2f} "
            f"| {s['all_cpu_per_request_ratio']:.2f} "
            f"| {s['pyvirtio_p99_us']:.0f} / {s['qsd_p99_us']:.0f} "
            f"| {client:.0f} | {ours / client:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
