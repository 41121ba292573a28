"""pyvirtio blk against qemu-storage-daemon, driven by pyvirtio's load generator (no guest).

Both back-ends serve the same image; each workload runs on one, then the other (who goes first
alternates), after a sync so that neither pays for the other's writeback. Each workload's
figures are compared as per-round ratios and the medians of those ratios are reported. The
generator's own ceiling is measured against qemu-storage-daemon's null-co device (no I/O).
Requests of 1 MiB also run against ``pyvirtio blk --io-threads 2`` (they are copied on two
more threads while the queue's thread goes on).

    python -m bench.loadgen_suite [--rounds 3] [--runtime 3] [--out out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rigs.backends import RunningBackend

from bench.backends import data_image, start_null, start_pyvirtio, start_qsd
from pyvirtio.bench.loadgen import LoadGenerator, Workload, process_cpu_seconds
from pyvirtio.device import VirtioDevice

#: (rw, block size, iodepth)
WORKLOADS = [
    ("randread", 4096, 1),
    ("randread", 4096, 32),
    ("randread", 4096, 128),
    ("randwrite", 4096, 1),
    ("randwrite", 4096, 32),
    ("randwrite", 4096, 128),
    ("read", 65536, 16),
    ("write", 65536, 16),
    ("read", 1 << 20, 4),
    ("write", 1 << 20, 4),
]
IMAGE_SIZE = 512 << 20
#: The threaded variant runs the workloads whose requests it hands to its threads.
IO_THREADS = 2
THREADED = f"pyvirtio --io-threads {IO_THREADS}"
PARALLEL_THRESHOLD = VirtioDevice.parallel_threshold


def label(rw: str, bs: int, depth: int) -> str:
    size = f"{bs >> 20}M" if bs >= 1 << 20 else f"{bs >> 10}K"
    return f"{rw} {size} QD{depth}"


def measure(
    backend: RunningBackend, rw: str, bs: int, depth: int, runtime: float, queues: int = 1
) -> dict[str, float]:
    w = Workload(rw=rw, bs=bs, iodepth=depth, num_queues=queues, runtime=runtime)
    gen = LoadGenerator(str(backend.socket), w)
    try:
        cpu0 = process_cpu_seconds(backend.pid)
        result = gen.run()
        cpu = process_cpu_seconds(backend.pid) - cpu0
    finally:
        gen.close()
    if result.errors:
        raise RuntimeError(f"{backend.name}: {result.errors} failed requests in {rw}")
    requests = max(1, result.completed)
    return {
        "iops": result.iops,
        "bw_bytes": result.bw_bytes,
        "p50_us": result.percentile(50) / 1000,
        "p99_us": result.percentile(99) / 1000,
        "p999_us": result.percentile(99.9) / 1000,
        "cpu_s": cpu,
        "cpu_us_per_request": cpu / requests * 1e6,
        "cpu_s_per_gib": cpu / (result.bytes / (1 << 30)) if result.bytes else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="pyvirtio-bench-")  # removed at exit
    work = Path(scratch.name)
    image = data_image(work / "disk.img", IMAGE_SIZE)

    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rnd in range(args.rounds):
        backends = {
            "pyvirtio": start_pyvirtio(image, work / "pyvirtio.sock"),
            "qemu-storage-daemon": start_qsd(image, work / "qsd.sock"),
            THREADED: start_pyvirtio(image, work / "threaded.sock", io_threads=IO_THREADS),
        }
        try:
            for i, (rw, bs, depth) in enumerate(WORKLOADS):
                key = label(rw, bs, depth)
                here = [n for n in backends if n != THREADED or bs >= PARALLEL_THRESHOLD]
                # Alternate who goes first; start each measurement with no dirty page cache
                # left by the previous one, so that neither pays for the other's writeback.
                for name in here if (rnd + i) % 2 == 0 else reversed(here):
                    os.sync()
                    figures = measure(backends[name], rw, bs, depth, args.runtime)
                    runs.setdefault(key, {}).setdefault(name, []).append(figures)
                    print(
                        f"round {rnd + 1} {name:20} {key:18} {figures['iops']:9.0f} "
                        f"IOPS {figures['bw_bytes'] / 2**20:8.1f} MiB/s "
                        f"{figures['cpu_us_per_request']:7.1f} us CPU/req",
                        flush=True,
                    )
        finally:
            for backend in backends.values():
                backend.stop()

    ceiling = {}
    null = start_null(work / "null.sock")
    try:
        for rw, bs, depth in (
            ("randread", 4096, 32),
            ("randread", 4096, 128),
            ("read", 1 << 20, 4),
        ):
            ceiling[label(rw, bs, depth)] = measure(null, rw, bs, depth, args.runtime)
    finally:
        null.stop()

    summary = []
    for key, by_backend in runs.items():
        ours, theirs = by_backend["pyvirtio"], by_backend["qemu-storage-daemon"]

        def ratio(
            field: str, ours: list[dict[str, float]] = ours, theirs: list[dict[str, float]] = theirs
        ) -> float:
            return statistics.median(
                a[field] / b[field] for a, b in zip(ours, theirs, strict=True) if b[field]
            )

        threaded = by_backend.get(THREADED)
        summary.append(
            {
                "workload": key,
                "threaded_iops_ratio": (
                    statistics.median(
                        a["iops"] / b["iops"] for a, b in zip(threaded, theirs, strict=True)
                    )
                    if threaded
                    else None
                ),
                "threaded_cpu_per_gib_ratio": (
                    statistics.median(
                        a["cpu_s_per_gib"] / b["cpu_s_per_gib"]
                        for a, b in zip(threaded, theirs, strict=True)
                    )
                    if threaded
                    else None
                ),
                "pyvirtio_iops": statistics.median(r["iops"] for r in ours),
                "qsd_iops": statistics.median(r["iops"] for r in theirs),
                "iops_ratio": ratio("iops"),
                "bw_ratio": ratio("bw_bytes"),
                "cpu_per_request_ratio": ratio("cpu_us_per_request"),
                "cpu_per_gib_ratio": ratio("cpu_s_per_gib"),
                "pyvirtio_p99_us": statistics.median(r["p99_us"] for r in ours),
                "qsd_p99_us": statistics.median(r["p99_us"] for r in theirs),
                "pyvirtio_cpu_us_per_request": statistics.median(
                    r["cpu_us_per_request"] for r in ours
                ),
                "qsd_cpu_us_per_request": statistics.median(
                    r["cpu_us_per_request"] for r in theirs
                ),
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
    (args.out / "loadgen.json").write_text(
        json.dumps(
            {"meta": meta, "summary": summary, "runs": runs, "generator_ceiling": ceiling}, indent=1
        )
    )
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}; "
        f"{args.rounds} interleaved rounds of {args.runtime:g} s per workload, medians of "
        "per-round ratios (pyvirtio / qemu-storage-daemon; for CPU lower is better).",
        "",
        "| workload | pyvirtio IOPS | QSD IOPS | IOPS ratio | CPU/request ratio | CPU/GiB ratio "
        "| p99 pyvirtio / QSD (us) | CPU us/request pyvirtio / QSD |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {s['workload']} | {s['pyvirtio_iops']:.0f} | {s['qsd_iops']:.0f} "
            f"| {s['iops_ratio']:.2f} | {s['cpu_per_request_ratio']:.2f} "
            f"| {s['cpu_per_gib_ratio']:.2f} | {s['pyvirtio_p99_us']:.0f} / {s['qsd_p99_us']:.0f} "
            f"| {s['pyvirtio_cpu_us_per_request']:.1f} / {s['qsd_cpu_us_per_request']:.1f} |"
        )
    lines += [
        "",
        f"`{THREADED}` (requests of {PARALLEL_THRESHOLD >> 20} MiB and more on its threads), "
        "against qemu-storage-daemon in the same rounds:",
        "",
        "| workload | IOPS ratio | CPU/GiB ratio |",
        "| --- | ---: | ---: |",
    ]
    for s in summary:
        if s["threaded_iops_ratio"] is not None:
            lines.append(
                f"| {s['workload']} | {s['threaded_iops_ratio']:.2f} "
                f"| {s['threaded_cpu_per_gib_ratio']:.2f} |"
            )
    lines += ["", "Generator ceiling (qemu-storage-daemon null-co, no I/O):", ""]
    for key, f in ceiling.items():
        lines.append(f"- {key}: {f['iops']:.0f} IOPS, {f['bw_bytes'] / 2**20:.0f} MiB/s")
    (args.out / "loadgen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        chart(summary, runs, args.out / "loadgen.png")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")


def chart(
    summary: list[dict[str, float | str | None]],
    runs: dict[str, dict[str, list[dict[str, float]]]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [str(s["workload"]) for s in summary]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7))
    width = 0.4
    xs = range(len(keys))
    for i, name in enumerate(("pyvirtio", "qemu-storage-daemon")):
        iops = [statistics.median(r["iops"] for r in runs[k][name]) for k in keys]
        cpu = [statistics.median(r["cpu_us_per_request"] for r in runs[k][name]) for k in keys]
        ax1.bar([x + (i - 0.5) * width for x in xs], iops, width, label=name)
        ax2.bar([x + (i - 0.5) * width for x in xs], cpu, width, label=name)
    ax1.set_ylabel("IOPS (median)")
    ax2.set_ylabel("back-end CPU us / request")
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
        ax.legend()
    ax1.set_title("vhost-user-blk back-ends driven by pyvirtio bench (no guest)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
