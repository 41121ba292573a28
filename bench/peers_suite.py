"""pyvirtio against the strongest qemu-storage-daemon configurations, driven by the load
generator (no guest).

Peers on one page-cached image: qemu-storage-daemon with its default ``aio=threads``, with
``aio=io_uring``, and with ``aio=native,cache.direct=on`` (O_DIRECT). pyvirtio runs with
``--io-engine sync``, ``--io-engine io_uring``, io_uring with ``--poll-us``, and io_uring with
``--direct`` (compared with the O_DIRECT peer only). Every configuration runs every workload in
each round, in an order that alternates from round to round; each pyvirtio figure is divided by
the best peer's (the one with the most IOPS in that round) and the medians of those per-round
ratios are reported. Then both back-ends with 2 queues: IOPS with 2 queues over IOPS with 1, on
the same 2-queue export.

    python -m bench.peers_suite [--rounds 3] [--runtime 3] [--out out/bench]
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

from rigs.backends import BackendFactory, BlkOptions, RunningBackend

from bench.backends import PYVIRTIO, QSD, QUEUE_SIZE, data_image
from bench.loadgen_suite import label, measure

#: The issue's target workloads: (rw, block size, iodepth per queue).
WORKLOADS = [
    ("randread", 4096, 1),
    ("randread", 4096, 32),
    ("randread", 4096, 128),
    ("randwrite", 4096, 32),
    ("randwrite", 4096, 128),
    ("read", 1 << 20, 4),
    ("write", 1 << 20, 4),
]
MQ_WORKLOADS = [("randread", 4096, 32), ("randwrite", 4096, 32)]
IMAGE_SIZE = 512 << 20
POLL_US = 50
#: O_DIRECT on the file systems measured needs 4K alignment; both O_DIRECT back-ends export
#: 4K blocks (the workloads' requests are 4K-aligned anyway).
DIRECT_BLOCK = 4096

#: name: (factory, options, direct)
PEERS: dict[str, tuple[BackendFactory, BlkOptions]] = {
    "qsd threads": (QSD, BlkOptions()),
    "qsd io_uring": (QSD, BlkOptions(aio="io_uring")),
    "qsd native direct": (
        QSD,
        BlkOptions(aio="native", direct=True, logical_block_size=DIRECT_BLOCK),
    ),
}
OURS: dict[str, tuple[BackendFactory, BlkOptions]] = {
    "pyvirtio sync": (PYVIRTIO, BlkOptions(queue_size=QUEUE_SIZE, io_engine="sync")),
    "pyvirtio io_uring": (PYVIRTIO, BlkOptions(queue_size=QUEUE_SIZE, io_engine="io_uring")),
    f"pyvirtio io_uring poll {POLL_US}us": (
        PYVIRTIO,
        BlkOptions(queue_size=QUEUE_SIZE, io_engine="io_uring", poll_us=POLL_US),
    ),
    "pyvirtio io_uring direct": (
        PYVIRTIO,
        BlkOptions(
            queue_size=QUEUE_SIZE,
            io_engine="io_uring",
            direct=True,
            logical_block_size=DIRECT_BLOCK,
        ),
    ),
}
MQ: dict[str, tuple[BackendFactory, BlkOptions]] = {
    "qsd io_uring": (QSD, BlkOptions(aio="io_uring", num_queues=2)),
    "pyvirtio io_uring": (
        PYVIRTIO,
        BlkOptions(queue_size=QUEUE_SIZE, io_engine="io_uring", num_queues=2),
    ),
}


def is_direct(name: str) -> bool:
    return "direct" in name


def start(
    configs: dict[str, tuple[BackendFactory, BlkOptions]], image: Path, work: Path
) -> dict[str, RunningBackend]:
    started: dict[str, RunningBackend] = {}
    try:
        for i, (name, (factory, options)) in enumerate(configs.items()):
            started[name] = factory.start(image, work / f"b{i}.sock", options)
    except BaseException:
        for backend in started.values():
            backend.stop()
        raise
    return started


Runs = dict[str, dict[str, list[dict[str, float]]]]


def summarise(runs: Runs, rounds: int) -> list[dict[str, object]]:
    """Per workload and pyvirtio configuration: medians of per-round ratios to the best peer
    of that round (the O_DIRECT peer for pyvirtio --direct)."""
    rows: list[dict[str, object]] = []
    for key, by in runs.items():
        for ours in OURS:
            peers = [p for p in PEERS if is_direct(p) == is_direct(ours)]
            ratios: dict[str, list[float]] = {}
            best_names = []
            for r in range(rounds):
                best = max(peers, key=lambda p: by[p][r]["iops"])
                best_names.append(best)
                a, b = by[ours][r], by[best][r]
                for field in ("iops", "bw_bytes", "p99_us", "cpu_us_per_request", "cpu_s_per_gib"):
                    if b[field]:
                        ratios.setdefault(field, []).append(a[field] / b[field])
            rows.append(
                {
                    "workload": key,
                    "ours": ours,
                    "best_peer": max(set(best_names), key=best_names.count),
                    "iops": statistics.median(r["iops"] for r in by[ours]),
                    "peer_iops": {p: statistics.median(r["iops"] for r in by[p]) for p in peers},
                    "cpu_us_per_request": statistics.median(
                        r["cpu_us_per_request"] for r in by[ours]
                    ),
                    **{f"{f}_ratio": statistics.median(v) for f, v in ratios.items()},
                }
            )
    return rows


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

    runs: Runs = {}
    mq_runs: Runs = {}
    for rnd in range(args.rounds):
        backends = start({**PEERS, **OURS}, image, work)
        try:
            for i, (rw, bs, depth) in enumerate(WORKLOADS):
                key = label(rw, bs, depth)
                names = list(backends)
                for name in names if (rnd + i) % 2 == 0 else reversed(names):
                    os.sync()  # no dirty page cache left by the previous measurement
                    figures = measure(backends[name], rw, bs, depth, args.runtime)
                    runs.setdefault(key, {}).setdefault(name, []).append(figures)
                    print(
                        f"round {rnd + 1} {name:30} {key:16} {figures['iops']:9.0f} IOPS "
                        f"{figures['cpu_us_per_request']:7.1f} us CPU/req "
                        f"p99 {figures['p99_us']:6.0f} us",
                        flush=True,
                    )
        finally:
            for backend in backends.values():
                backend.stop()
        backends = start(MQ, image, work)
        try:
            for rw, bs, depth in MQ_WORKLOADS:
                for queues in (1, 2) if rnd % 2 == 0 else (2, 1):
                    key = f"{label(rw, bs, depth)} x{queues} queues"
                    for name in backends:
                        os.sync()
                        figures = measure(backends[name], rw, bs, depth, args.runtime, queues)
                        mq_runs.setdefault(key, {}).setdefault(name, []).append(figures)
                        print(
                            f"round {rnd + 1} {name:30} {key:26} {figures['iops']:9.0f} IOPS",
                            flush=True,
                        )
        finally:
            for backend in backends.values():
                backend.stop()

    rows = summarise(runs, args.rounds)
    scaling = []
    for rw, bs, depth in MQ_WORKLOADS:
        one, two = (mq_runs[f"{label(rw, bs, depth)} x{q} queues"] for q in (1, 2))
        scaling.append(
            {
                "workload": label(rw, bs, depth),
                **{
                    f"{name} scaling": statistics.median(
                        b["iops"] / a["iops"] for a, b in zip(one[name], two[name], strict=True)
                    )
                    for name in MQ
                },
                **{
                    f"{name} x2 iops": statistics.median(r["iops"] for r in two[name])
                    for name in MQ
                },
                "ratio x1": statistics.median(
                    a["iops"] / b["iops"]
                    for a, b in zip(one["pyvirtio io_uring"], one["qsd io_uring"], strict=True)
                ),
                "ratio x2": statistics.median(
                    a["iops"] / b["iops"]
                    for a, b in zip(two["pyvirtio io_uring"], two["qsd io_uring"], strict=True)
                ),
            }
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "rounds": args.rounds,
        "runtime_s": args.runtime,
    }
    (args.out / "peers.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "scaling": scaling, "runs": runs, "mq": mq_runs})
    )
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}; "
        f"{args.rounds} interleaved rounds of {args.runtime:g} s per workload; medians of "
        "per-round ratios to the best qemu-storage-daemon configuration of each round "
        "(buffered: aio=threads or aio=io_uring; for --direct: aio=native,cache.direct=on).",
        "",
        "| workload | pyvirtio | IOPS | best peer (its IOPS) | IOPS ratio | p99 ratio "
        "| CPU/request ratio | CPU/GiB ratio | CPU us/request |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        peer = str(row["best_peer"])
        peer_iops = row["peer_iops"]
        assert isinstance(peer_iops, dict)
        lines.append(
            f"| {row['workload']} | {str(row['ours']).removeprefix('pyvirtio ')} "
            f"| {row['iops']:.0f} | {peer} ({peer_iops[peer]:.0f}) "
            f"| {row.get('iops_ratio', 0):.2f} | {row.get('p99_us_ratio', 0):.2f} "
            f"| {row.get('cpu_us_per_request_ratio', 0):.2f} "
            f"| {row.get('cpu_s_per_gib_ratio', 0):.2f} | {row['cpu_us_per_request']:.1f} |"
        )
    lines += [
        "",
        "2 queues (each back-end exports 2 queues; the generator drives 1, then 2, at the "
        "same depth per queue): IOPS with 2 queues over IOPS with 1, and pyvirtio io_uring "
        "over qemu-storage-daemon io_uring.",
        "",
        "| workload | QSD io_uring x2/x1 | pyvirtio io_uring x2/x1 | QSD x2 IOPS "
        "| pyvirtio x2 IOPS | ratio 1 queue | ratio 2 queues |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in scaling:
        lines.append(
            f"| {s['workload']} | {s['qsd io_uring scaling']:.2f} "
            f"| {s['pyvirtio io_uring scaling']:.2f} | {s['qsd io_uring x2 iops']:.0f} "
            f"| {s['pyvirtio io_uring x2 iops']:.0f} | {s['ratio x1']:.2f} | {s['ratio x2']:.2f} |"
        )
    (args.out / "peers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
