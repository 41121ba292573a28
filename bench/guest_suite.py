"""fio in a real guest against pyvirtio blk, qemu-storage-daemon (aio=threads and aio=io_uring)
and QEMU's built-in virtio-blk.

The same QEMU microvm guest (TCG) and the same image, one back-end at a time, in interleaved
rounds. The guest runs each fio job and reports what it saw (bandwidth, IOPS, latency
percentiles); the host samples each back-end's CPU time around every job, which gives CPU
seconds per GiB and per 100k requests (not for the built-in device: its CPU is QEMU's, vCPUs
included). Under TCG the guest itself is slow, so these figures say what a guest sees, not
what a back-end can do: ``bench.loadgen_suite`` measures that.

    python -m bench.guest_suite [--rounds 2] [--runtime 3] [--out out/bench]
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
from rigs.qemu import QemuBlk, VhostUserBlk
from rigs.x86_guest import ensure_guest

from bench.backends import data_image, start_pyvirtio, start_qsd
from pyvirtio.bench.loadgen import process_cpu_seconds

#: (name, rw, block size, iodepth)
JOBS = [
    ("seqread-4k", "read", "4k", 1),
    ("seqread-64k", "read", "64k", 16),
    ("seqread-256k", "read", "256k", 16),
    ("seqread-1m", "read", "1m", 16),
    ("seqwrite-4k", "write", "4k", 1),
    ("seqwrite-64k", "write", "64k", 16),
    ("seqwrite-256k", "write", "256k", 16),
    ("seqwrite-1m", "write", "1m", 16),
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
]
IMAGE_SIZE = 256 << 20
BACKENDS = ("pyvirtio", "qemu-storage-daemon", "qsd-io_uring", "qemu-virtio-blk")
#: The best peer of a round and job: the better qemu-storage-daemon configuration.
QSD_CONFIGS = ("qemu-storage-daemon", "qsd-io_uring")


def guest_script(runtime: float) -> str:
    lines = ["for f in /sys/block/vda/queue/scheduler; do echo none > $f; done"]
    for name, rw, bs, depth in JOBS:
        lines += [
            f"echo '@@JOB start {name}'",
            f"fio --name={name} --filename=/dev/vda --ioengine=libaio --direct=1 --rw={rw} "
            f"--bs={bs} --iodepth={depth} --size=192m --time_based --runtime={runtime:g} "
            "--percentile_list=50:99:99.9 --output-format=json > /tmp/out.json 2>&1",
            f"echo '@@JOB end {name}'",
            "echo '@@JSON-BEGIN'; cat /tmp/out.json; echo '@@JSON-END'",
        ]
    return "\n".join(lines) + "\n"


def parse_jobs(console: str) -> dict[str, dict[str, float]]:
    results = {}
    for chunk in console.split("@@JSON-BEGIN")[1:]:
        text = chunk.split("@@JSON-END")[0]
        data = json.loads(text[text.index("{") :])
        job = data["jobs"][0]
        side = job["read"] if job["read"]["io_bytes"] else job["write"]
        pct = side["clat_ns"].get("percentile", {})
        results[job["jobname"]] = {
            "bw_bytes": float(side["bw_bytes"]),
            "iops": float(side["iops"]),
            "io_bytes": float(side["io_bytes"]),
            "requests": float(side["total_ios"]),
            "p50_us": pct.get("50.000000", 0) / 1000,
            "p99_us": pct.get("99.000000", 0) / 1000,
            "p999_us": pct.get("99.900000", 0) / 1000,
            "errors": float(job["error"]),
        }
    return results


def run_one(kind: str, image: Path, work: Path, runtime: float) -> dict[str, dict[str, float]]:
    rig = ensure_guest()
    backend: RunningBackend | None = None
    if kind == "pyvirtio":
        backend = start_pyvirtio(image, work / "b.sock")
        disk: VhostUserBlk | QemuBlk = VhostUserBlk(work / "b.sock", num_queues=1)
    elif kind == "qemu-storage-daemon":
        backend = start_qsd(image, work / "b.sock")
        disk = VhostUserBlk(work / "b.sock", num_queues=1)
    elif kind == "qsd-io_uring":
        backend = start_qsd(image, work / "b.sock", aio="io_uring")
        disk = VhostUserBlk(work / "b.sock", num_queues=1)
    else:
        disk = QemuBlk(image, cache="writeback", aio="threads")
    cpu: dict[str, float] = {}
    try:
        guest = rig.guest(
            guest_script(runtime),
            [disk],
            workdir=work / f"guest-{kind}",
            timeout=120 + len(JOBS) * (runtime + 40),  # fio's JSON is slow on a TCG console
        )
        with guest:
            guest.start()
            for name, *_ in JOBS:
                guest.wait_for_console(f"@@JOB start {name}", timeout=120)
                before = process_cpu_seconds(backend.pid) if backend else 0.0
                guest.wait_for_console(f"@@JOB end {name}", timeout=runtime + 120)
                if backend:
                    cpu[name] = process_cpu_seconds(backend.pid) - before
            result = guest.wait()
    finally:
        if backend is not None:
            backend.stop()
    jobs = parse_jobs(result.console)
    for name, figures in jobs.items():
        if name in cpu:
            figures["cpu_s"] = cpu[name]
            figures["cpu_s_per_gib"] = cpu[name] / max(figures["io_bytes"] / (1 << 30), 1e-9)
            figures["cpu_s_per_100k"] = cpu[name] / max(figures["requests"] / 1e5, 1e-9)
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio job")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument(
        "--report-only", action="store_true", help="report OUT/guest.json again, measure nothing"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((args.out / "guest.json").read_text())
        report(saved["runs"], saved["meta"], args.out)
        return
    scratch = tempfile.TemporaryDirectory(prefix="pyvirtio-gbench-")  # removed at exit
    work = Path(scratch.name)
    image = data_image(work / "disk.img", IMAGE_SIZE)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rnd in range(args.rounds):
        order = list(BACKENDS) if rnd % 2 == 0 else list(reversed(BACKENDS))
        for kind in order:
            os.sync()
            jobs = run_one(kind, image, work, args.runtime)
            for name, figures in jobs.items():
                runs.setdefault(name, {}).setdefault(kind, []).append(figures)
                print(
                    f"round {rnd + 1} {kind:20} {name:18} {figures['bw_bytes'] / 2**20:8.1f} "
                    f"MiB/s {figures['iops']:8.0f} IOPS",
                    flush=True,
                )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rounds": args.rounds,
        "runtime_s": args.runtime,
    }
    (args.out / "guest.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    report(runs, meta, args.out)


def report(
    runs: dict[str, dict[str, list[dict[str, float]]]], meta: dict[str, object], out: Path
) -> None:
    """guest.md (and guest.png with matplotlib) from what :func:`main` measured."""

    def med(name: str, kind: str, field: str) -> float:
        return statistics.median(r.get(field, 0.0) for r in runs[name][kind])

    def ratio(name: str, field: str, peers: tuple[str, ...] = ("qemu-storage-daemon",)) -> float:
        """Median of per-round ratios of pyvirtio to the best of ``peers`` in that round."""
        rounds = zip(runs[name]["pyvirtio"], *(runs[name][p] for p in peers), strict=True)
        ratios = []
        for ours, *theirs in rounds:
            values = [t[field] for t in theirs if t.get(field)]
            if values:
                ratios.append(ours[field] / max(values))
        return statistics.median(ratios) if ratios else float("nan")

    lines = [
        f"Measured {meta['date']} on {meta['machine']}: a QEMU microvm guest under TCG, "
        f"{meta['rounds']} interleaved rounds of {meta['runtime_s']:g} s fio jobs; medians. "
        "Ratios are medians of per-round ratios: pyvirtio / qemu-storage-daemon (aio=threads), "
        "for bandwidth also pyvirtio / the better qemu-storage-daemon configuration of the "
        "round (aio=threads or aio=io_uring) and pyvirtio / QEMU's built-in virtio-blk; "
        "CPU (lower is better) against aio=threads.",
        "",
        "| job | pyvirtio MiB/s | QSD MiB/s | QSD io_uring MiB/s | QEMU virtio-blk MiB/s "
        "| bw ratio | bw ratio to best QSD | bw ratio to QEMU virtio-blk | IOPS ratio "
        "| p99 us (pyvirtio / QSD / QSD io_uring / QEMU) | CPU s/GiB ratio "
        "| CPU s/100k req ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, *_ in JOBS:
        if name not in runs:
            continue
        p99 = " / ".join(f"{med(name, kind, 'p99_us'):.0f}" for kind in BACKENDS)
        lines.append(
            f"| {name} | {med(name, 'pyvirtio', 'bw_bytes') / 2**20:.1f} "
            f"| {med(name, 'qemu-storage-daemon', 'bw_bytes') / 2**20:.1f} "
            f"| {med(name, 'qsd-io_uring', 'bw_bytes') / 2**20:.1f} "
            f"| {med(name, 'qemu-virtio-blk', 'bw_bytes') / 2**20:.1f} "
            f"| {ratio(name, 'bw_bytes'):.2f} | {ratio(name, 'bw_bytes', QSD_CONFIGS):.2f} "
            f"| {ratio(name, 'bw_bytes', ('qemu-virtio-blk',)):.2f} "
            f"| {ratio(name, 'iops'):.2f} "
            f"| {p99} "
            f"| {ratio(name, 'cpu_s_per_gib'):.2f} | {ratio(name, 'cpu_s_per_100k'):.2f} |"
        )
    (out / "guest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        chart(runs, out / "guest.png")
    except ImportError:
        print("matplotlib is not installed: no chart")


def chart(runs: dict[str, dict[str, list[dict[str, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = ["4k", "64k", "256k", "1m"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("seqread", "seqwrite"), strict=True):
        for backend in BACKENDS:
            ys = [
                statistics.median(r["bw_bytes"] for r in runs[f"{kind}-{s}"][backend]) / 2**20
                for s in sizes
            ]
            ax.plot(sizes, ys, marker="o", label=backend)
        ax.set_title(f"guest {kind} (fio, TCG guest)")
        ax.set_xlabel("block size")
        ax.set_ylabel("MiB/s (median)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
