"""The talk's deployment measured: a virtio disk served by ``pyvirtio xen`` in a driver domain
against Xen's PV block driver (``xen-blkback`` in the same driver domain's kernel,
``xen-blkfront`` in the domU's) on the same image, on the arm64 Xen rig (TCG).

One boot: Xen with Flask (the rig's policy; the foreign mapping of guests allowed through its
``pyvirtio_domd_map_guests`` boolean, for the variants that need it), a driver domain
(``rigs.xen.domd_kernel``: Linux 6.12 with privcmd irqfd, PV block backend) that
owns a 128 MiB image full of data, and one domU per variant and round, each running O_DIRECT
``dd`` (busybox: one request at a time) at 4K, 64K, 256K and 1M, reads and writes. Variants,
interleaved (the order reverses every round):

* ``pv``: PV block, Debian's domU kernel; ``dynamic`` and ``static``: pyvirtio's mapping
  choices, Debian's domU kernel (guest-physical addresses: its kernel lacks XEN_VIRTIO);
* ``pv-g``: PV block, the grant kernel (:mod:`rigs.xen.grant_kernel`); ``grants``: pyvirtio,
  the grant kernel (every buffer a grant); ``grants-ioreq``: the same with ``--notify ioreq``
  (the interrupt through the daemon's dm_op instead of the kernel's irqfd).

Each pyvirtio variant is compared with PV block on the same guest kernel: medians of
per-round ratios. The driver domain's CPU time (Xen's count for its vCPU: kernel, blkback and
the daemon alike) is sampled from dom0 around each job, less its idle rate (sampled over
IDLE_SAMPLE_S just before) for the part of the window the job did not run; the daemon's own
statistics (IOREQs, interrupts, map calls, request times, its user and system CPU) through
``kill -USR1``, and the domU measures the round trip of a virtio-mmio register read (a sysfs
read of the device status against one of the cached features). Results: ``out/bench/xen.{json,md}``.

    python -m bench.xen_suite [--rounds 3] [--out out/bench] [--variants pv,dynamic,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rigs.qemu import parse_console
from rigs.xen.build import ensure_rig
from rigs.xen.domd_kernel import DOMD_IMAGE_NAME, ensure_domd_kernel
from rigs.xen.grant_kernel import GRANT_IMAGE_NAME, ensure_grant_kernel
from rigs.xen.harness import XenTest

MIB = 1 << 20
IMAGE_MIB = 128
WRITE_AT_MIB = 64  # writes go to the second half of the image
#: (name, rw, block size in KiB, count): long enough for /proc/uptime's 10 ms ticks to time PV
#: block's fastest job to a few percent
JOBS = [
    (f"{rw}-{bs}k", rw, bs, (mib * 1024) // bs)
    for rw in ("read", "write")
    for bs, mib in ((4, 4), (64, 32), (256, 64), (1024, 64))
]
IDLE_SAMPLE_S = 1.5  # the driver domain's idle CPU is sampled over this, before each job
RTT_READS = 2000
DOMD_LABEL = "system_u:system_r:pyvirtio_domd_t"


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: str  # the domU's kernel in dom0's /domu
    daemon: str | None  # pyvirtio xen's options, None: PV block
    baseline: str  # the PV variant it is compared with


VARIANTS = [
    Variant("pv", "Image", None, "pv"),
    Variant("dynamic", "Image", "--map-cache-pages 8192", "pv"),
    Variant("static", "Image", "--mapping static", "pv"),
    Variant("pv-g", GRANT_IMAGE_NAME, None, "pv-g"),
    Variant("grants", GRANT_IMAGE_NAME, "", "pv-g"),
    Variant("grants-ioreq", GRANT_IMAGE_NAME, "--notify ioreq", "pv-g"),
]

# dom0: the driver domain's CPU time in ns (Xen's count for its vCPUs), for each line read.
CPU_PY = r"""
import ctypes, sys
xc = ctypes.CDLL("libxenctrl.so.4.17")
xc.xc_interface_open.restype = ctypes.c_void_p
xc.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
class VcpuInfo(ctypes.Structure):  # struct xen_domctl_getvcpuinfo (public/domctl.h)
    _fields_ = [("vcpu", ctypes.c_uint32), ("online", ctypes.c_uint8),
                ("blocked", ctypes.c_uint8), ("running", ctypes.c_uint8),
                ("cpu_time", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]
xc.xc_vcpu_getinfo.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                               ctypes.POINTER(VcpuInfo)]
handle = xc.xc_interface_open(None, None, 0)
for _ in sys.stdin:  # one sample per line asked for
    total, vcpu, info = 0, 0, VcpuInfo()
    while xc.xc_vcpu_getinfo(handle, int(sys.argv[1]), vcpu, ctypes.byref(info)) == 0:
        total += info.cpu_time
        vcpu += 1
    print(total if vcpu else -1, flush=True)
"""

# DomD: the daemon's statistics now, as results "stats.TAG {json}" (one guest at a time).
DOMD_STATS = r"""
backend_stats() {
    _n=$(grep -c ': stats {' "$BACKEND_LOG")
    kill -USR1 "$BACKEND_PID"
    _t=0
    while [ "$(grep -c ': stats {' "$BACKEND_LOG")" -le "$_n" ] && [ "$_t" -lt 100 ]; do
        usleep 50000
        _t=$((_t + 1))
    done
    grep ': stats {' "$BACKEND_LOG" | tail -n 1 | sed "s/^.*: stats /@@GUEST stats.$1 /"
}
"""


def domu_script() -> str:
    jobs = []
    for name, rw, bs, count in JOBS:
        if rw == "read":
            dd = f'dd if="$dev" of=/dev/null bs={bs}k count={count} iflag=direct'
        else:
            seek = WRITE_AT_MIB * 1024 // bs
            dd = f'dd if=/dev/zero of="$dev" bs={bs}k count={count} seek={seek} oflag=direct'
        jobs.append(
            f"result job-start.{name} 1\nsleep 5\nresult job-go.{name} 1\n"
            f"t0=$(cut -d' ' -f1 /proc/uptime)\n{dd} 2>/tmp/dd.err || fail \"dd {name}\"\n"
            f'result job-end.{name} "$(seconds_since "$t0")"'
        )
    return (
        r"""
dev=
n=0
while [ -z "$dev" ] && [ "$n" -lt 600 ]; do
    for d in vda xvda; do [ -b "/dev/$d" ] && dev=/dev/$d; done
    n=$((n + 1))
    usleep 100000
done
[ -n "$dev" ] || fail "no disk"
name=${dev#/dev/}
echo none >"/sys/block/$name/queue/scheduler" 2>/dev/null
result dev "$name"
result max_sectors_kb "$(cat /sys/block/$name/queue/max_sectors_kb)"
seconds_since() {  # UPTIME: seconds since then (busybox dd does not say how long it took)
    awk -v a="$1" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.2f", b - a }'
}
loops() {  # FILE N: seconds for N reads of FILE by the shell itself (no process started)
    t0=$(cut -d' ' -f1 /proc/uptime)
    i=0
    while [ "$i" -lt "$2" ]; do read -r x <"$1"; i=$((i + 1)); done
    seconds_since "$t0"
}
v=/sys/bus/virtio/devices/virtio0
if [ -e "$v/status" ]; then  # a register read (status) against cached features: no trap
    for k in 1 2 3; do
        result "rtt.status.$k" "$(loops "$v/status" """
        + str(RTT_READS)
        + r""")"
        result "rtt.features.$k" "$(loops "$v/features" """
        + str(RTT_READS)
        + r""")"
    done
fi
"""
        + "\n".join(jobs)
        + "\n"
    )


def dom0_script(rounds: int, variants: list[Variant]) -> str:
    job_names = " ".join(name for name, *_ in JOBS)
    lines = [
        f"cat >/etc/rigs/cpu.py <<'PY'\n{CPU_PY}\nPY",
        f"cat >/etc/rigs/stats.sh <<'SH'\n{DOMD_STATS}\nSH",
        r"""
flask_mode
flask-set-bool pyvirtio_domd_map_guests 1 || fail "flask-set-bool"
result flask.map_guests "$(flask-get-bool pyvirtio_domd_map_guests)"
DOMD_KERNEL=/domu/"""
        + DOMD_IMAGE_NAME
        + r"""
DOMD_MEMORY=640
DOMU_MEMORY=256
domd_start domd 'seclabel = """
        + f'"{DOMD_LABEL}"'
        + r"""' || fail "no driver domain"
D=$(xl domid domd)
domd_sh domd "dd if=/dev/urandom of=/tmp/bench.img bs=1M count="""
        + str(IMAGE_MIB)
        + r""" 2>/dev/null; ls -l /tmp/bench.img; free -m" \
    || fail "no image"
# The driver domain runs the PV block disks' hotplug script itself: xl devd.
domd_sh domd 'xl devd; sleep 1; pidof xl >/dev/null' || fail "no xl devd in the driver domain"
mkfifo /tmp/cpu.ask /tmp/cpu.answer
python3 /etc/rigs/cpu.py "$D" </tmp/cpu.ask >/tmp/cpu.answer &
exec 3>/tmp/cpu.ask 4</tmp/cpu.answer
domd_cpu() { echo >&3; read -r _cpu <&4; echo "$_cpu"; }
wait_marker() {  # DOMU TEXT: until the domU's console has TEXT (180 s of dom0's clock)
    _until=$(($(cut -d. -f1 /proc/uptime) + 180))
    until grep -q "$2" "$CONSOLE_DIR/guest-$1.log" 2>/dev/null; do
        [ "$(cut -d. -f1 /proc/uptime)" -gt "$_until" ] && return 1
        domu_exists "$1" || return 1
        usleep 50000
    done
}
bench_fail() {  # MESSAGE: what each side holds now, the domU's and the driver domain's consoles
    # The daemon's view (IOREQ slots, ring indices), Xen's (vCPUs, event channels: printed on
    # its console), the driver domain kernel's interrupt counts.
    domd_sh domd ". /etc/rigs/stats.sh; backend_stats stalled" 60
    xl debug-keys q
    xl debug-keys e
    domd_sh domd "grep -i -E 'evtchn|ioeventfd|xen' /proc/interrupts" 30
    domu_console b
    domd_sh domd backend_log 30
    domu_console domd | tail -n 300
    fail "$*"
}
run_variant() {  # ROUND NAME KERNEL DAEMON-ARGS|pv
    _r=$1 _v=$2
    if [ "$4" = pv ]; then
        _disk=$(pvdisk xvda /tmp/bench.img domd)
        DOMU_EXTRA="quiet rigs.disks=0"
    else
        domd_sh domd "backend_stop >/dev/null; backend_start $4" || fail "backend $_v"
        _disk=$(vdisk xvda /tmp/bench.img rw domd)
        DOMU_EXTRA="quiet"
    fi
    domu_kernel "$3"
    domu_config b bench "$_disk"
    domu_create b || { domd_sh domd backend_log; fail "xl create ($_v)"; }
    for _j in """
        + job_names
        + r"""; do
        wait_marker b "job-start.$_j " || bench_fail "$_v: no job $_j"
        [ "$4" = pv ] || domd_sh domd ". /etc/rigs/stats.sh; backend_stats $_r.$_v.$_j.before" 60 \
            || bench_fail "$_v: no statistics from the daemon ($_j, before)"
        _c0=$(domd_cpu) _t0=$(now)
        usleep """
        + str(int(IDLE_SAMPLE_S * 1e6))
        + r"""
        _ci=$(domd_cpu) _ti=$(now)
        grep -q "job-go.$_j " "$CONSOLE_DIR/guest-b.log" && result "$_r.$_v.$_j.late" 1
        wait_marker b "job-end.$_j " || bench_fail "$_v: job $_j did not end"
        _c1=$(domd_cpu) _t1=$(now)
        [ "$4" = pv ] || domd_sh domd ". /etc/rigs/stats.sh; backend_stats $_r.$_v.$_j.after" 60 \
            || bench_fail "$_v: no statistics from the daemon ($_j, after)"
        result "$_r.$_v.$_j.cpu_ns" $((_c1 - _ci))
        result "$_r.$_v.$_j.idle_ns" $((_ci - _c0))
        result "$_r.$_v.$_j.idle_s" "$(awk -v a="$_t0" -v b="$_ti" 'BEGIN { print b - a }')"
        result "$_r.$_v.$_j.window_s" "$(awk -v a="$_ti" -v b="$_t1" 'BEGIN { print b - a }')"
    done
    domu_wait b 300
    _rc=$?
    domu_results b "$_r.$_v"
    [ "$_rc" = 0 ] || bench_fail "$_v: the domU failed ($_rc)"
    domu_destroy b >/dev/null 2>&1
    sleep 2
}
""",
    ]
    for rnd in range(rounds):
        order = variants if rnd % 2 == 0 else list(reversed(variants))
        for v in order:
            daemon = "pv" if v.daemon is None else f"'{v.daemon}'" if v.daemon else "''"
            lines.append(f"run_variant r{rnd} {v.name} {v.kernel} {daemon}")
    lines += [
        "domd_sh domd 'backend_stop >/dev/null; backend_log | grep -v \": stats {\"'",
        "xl dmesg | grep 'avc:' | sed 's/^/avc| /'",
        "domu_console domd | grep -v '@@GUEST stats'",
        "domu_results domd",
        "exit 0",
    ]
    return "\n".join(lines) + "\n"


def _seconds(text: str) -> float:
    if not re.fullmatch(r"[0-9]+\.[0-9]+", text):
        raise RuntimeError(f"not a job's seconds: {text!r}")
    return float(text)


def _diff(after: dict[str, object], before: dict[str, object]) -> dict[str, object]:
    """after - before, for the nested counters of a stats record."""
    out: dict[str, object] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _diff(value, old)
        elif isinstance(value, list) and isinstance(old, list) and _numbers(value + old):
            out[key] = [a - b for a, b in zip(value, old, strict=True)]
        elif isinstance(value, int | float) and isinstance(old, int | float):
            out[key] = value - old
        else:
            out[key] = value
    return out


def _numbers(values: list[object]) -> bool:
    return all(isinstance(v, int | float) for v in values)


def collect(
    results: dict[str, str], rounds: int, variants: list[Variant]
) -> dict[str, dict[str, list[dict[str, object]]]]:
    """variant -> job -> per-round figures: bytes, seconds, requests (dd's), the driver
    domain's CPU ns, the daemon's statistics over the job, and the register read round trip."""
    runs: dict[str, dict[str, list[dict[str, object]]]] = {}
    for rnd in range(rounds):
        for v in variants:
            prefix = f"r{rnd}.{v.name}"
            rtt: dict[str, float] = {}
            for what in ("status", "features"):
                values = [results.get(f"{prefix}.rtt.{what}.{k}") for k in (1, 2, 3)]
                if all(values):
                    rtt[what] = statistics.median(float(x or 0) for x in values) / RTT_READS
            for name, _, bs, count in JOBS:
                key = f"{prefix}.{name}"
                figures: dict[str, object] = {
                    "bytes": bs * 1024 * count,
                    "requests": count,
                    "seconds": _seconds(results[f"{prefix}.job-end.{name}"]),
                    "rtt": rtt,
                }
                if not results.get(f"{key}.late"):  # else dom0 sampled after the job began
                    figures["cpu_ns"] = job_cpu_ns(results, key, _f(figures, "seconds"))
                before = results.get(f"domd.stats.{key}.before")
                after = results.get(f"domd.stats.{key}.after")
                if before and after:
                    figures["daemon"] = _diff(json.loads(after), json.loads(before))
                runs.setdefault(v.name, {}).setdefault(name, []).append(figures)
    return runs


def job_cpu_ns(results: dict[str, str], key: str, seconds: float) -> int:
    """The driver domain's CPU time for one job: its CPU over the window from the end of the
    idle sample to the end of the job, less its idle rate (over the sample just before) for
    the part of the window the job did not run."""
    window_ns = int(results[f"{key}.cpu_ns"])
    idle_rate = int(results[f"{key}.idle_ns"]) / float(results[f"{key}.idle_s"])
    outside = max(0.0, float(results[f"{key}.window_s"]) - seconds)
    return max(0, round(window_ns - idle_rate * outside))


def _f(figures: dict[str, object], key: str) -> float:
    value = figures[key]
    assert isinstance(value, int | float)
    return float(value)


def mib_s(figures: dict[str, object]) -> float:
    return _f(figures, "bytes") / MIB / _f(figures, "seconds")


def cpu_per_mib(figures: dict[str, object]) -> float:
    return _f(figures, "cpu_ns") / 1e9 / (_f(figures, "bytes") / MIB)


def report(runs: dict[str, dict[str, list[dict[str, object]]]], meta: dict[str, object]) -> str:
    def usable(f: dict[str, object], fn: object) -> bool:
        return fn is not cpu_per_mib or "cpu_ns" in f

    def med(variant: str, job: str, fn: object) -> float:
        assert callable(fn)
        values = [fn(f) for f in runs[variant][job] if usable(f, fn)]
        return statistics.median(values) if values else float("nan")

    def ratio(variant: str, baseline: str, job: str, fn: object) -> float:
        assert callable(fn)
        pairs = zip(runs[variant][job], runs[baseline][job], strict=True)
        # a baseline of 0 (its CPU all within the idle rate subtracted) has no ratio
        values = [fn(a) / fn(b) for a, b in pairs if usable(a, fn) and usable(b, fn) and fn(b)]
        return statistics.median(values) if values else float("nan")

    late = sum("cpu_ns" not in f for jobs in runs.values() for fs in jobs.values() for f in fs)

    lines = [
        f"Measured {meta['date']} on {meta['machine']}: Xen 4.17 on arm64 under TCG "
        f"(qemu-system-aarch64, 2 vCPUs for dom0, the driver domain and the domU), "
        f"{meta['rounds']} interleaved rounds; busybox dd with O_DIRECT in the domU (one "
        "request at a time); medians, ratios per round against PV block on the same domU "
        "kernel; CPU is the driver domain's, from Xen.",
        "",
        "| job | variant | MiB/s | PV MiB/s | bandwidth ratio | CPU s/MiB | PV CPU s/MiB "
        "| CPU/MiB ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, *_ in JOBS:
        for v in VARIANTS:
            if v.daemon is None or v.name not in runs or v.baseline not in runs:
                continue
            lines.append(
                f"| {name} | {v.name} | {med(v.name, name, mib_s):.2f} "
                f"| {med(v.baseline, name, mib_s):.2f} "
                f"| {ratio(v.name, v.baseline, name, mib_s):.2f} "
                f"| {med(v.name, name, cpu_per_mib):.3f} "
                f"| {med(v.baseline, name, cpu_per_mib):.3f} "
                f"| {ratio(v.name, v.baseline, name, cpu_per_mib):.2f} |"
            )
    if late:
        lines += ["", f"({late} job(s) without CPU figures: dom0 sampled after they began.)"]
    lines += ["", *breakdown(runs)]
    return "\n".join(lines) + "\n"


def _per(total: float, count: float) -> float:
    return total / count if count else 0.0


def breakdown(runs: dict[str, dict[str, list[dict[str, object]]]]) -> list[str]:
    """Per request, from the daemon's statistics: where the time and CPU of one request go."""
    lines = [
        "Per request (medians over rounds; us unless said; IOREQ and interrupt times are the "
        "daemon's, from its wake-up to its notification of Xen):",
        "",
        "| variant | job | guest us/request | register read round trip | IOREQs/request "
        "(notify, status, ack; kernel) | us per IOREQ | interrupts/request, us each "
        "| map calls/request, us each | grant copy calls/request, us each | device us/request "
        "| daemon user / system us/request "
        "| daemon user ms/MiB | driver domain CPU us/request |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for v in VARIANTS:
        if v.daemon is None or v.name not in runs:
            continue
        for job in ("read-4k", "write-4k", "read-1024k", "write-1024k"):
            rows = [f for f in runs[v.name][job] if "daemon" in f]
            if not rows:
                continue
            cells: dict[str, list[float]] = defaultdict(list)
            for f in rows:
                d = f["daemon"]
                assert isinstance(d, dict)
                n = _f(f, "requests")
                io = d["ioreq"]
                served, ns = io["served"], io["ns"]
                cells["guest"].append(_f(f, "seconds") * 1e6 / n)
                rtt = f["rtt"]
                assert isinstance(rtt, dict)
                if "status" in rtt and "features" in rtt:
                    cells["rtt"].append((rtt["status"] - rtt["features"]) * 1e6)
                for kind in ("notify", "interrupt_status", "interrupt_ack"):
                    cells[kind].append(served[kind] / n)
                cells["kernel"].append(io["kernel"] / n)
                total = sum(served.values())
                cells["ioreq_us"].append(_per(sum(ns.values()), total) / 1e3)
                irq = d["interrupts"]
                cells["irqs"].append(irq["raised"] / n)
                cells["irq_us"].append(_per(irq["ns"], irq["raised"]) / 1e3)
                maps = d["maps"]
                calls = sum(maps[k][0] for k in ("foreign", "grant", "grant_unmap"))
                cells["maps"].append(calls / n)
                cells["map_us"].append(_per(sum(maps[k][1] for k in maps), calls) / 1e3)
                copies, copy_ns = d.get("grant_copy", [0, 0])
                cells["copies"].append(copies / n)
                cells["copy_us"].append(_per(copy_ns, copies) / 1e3)
                cells["device"].append(_per(d["request_ns"], d["requests"]) / 1e3)
                cells["user"].append(d["cpu"]["user"] * 1e6 / n)
                cells["system"].append(d["cpu"]["system"] * 1e6 / n)
                cells["user_mib"].append(d["cpu"]["user"] * 1e3 / (_f(f, "bytes") / MIB))
                if "cpu_ns" in f:
                    cells["domd"].append(_f(f, "cpu_ns") / 1e3 / n)
            m = {k: statistics.median(vs) for k, vs in cells.items()}
            rtt_cell = f"{m['rtt']:.0f}" if "rtt" in m else "-"
            lines.append(
                f"| {v.name} | {job} | {m['guest']:.0f} | {rtt_cell} "
                f"| {m['notify']:.2f}, {m['interrupt_status']:.2f}, {m['interrupt_ack']:.2f}; "
                f"{m['kernel']:.2f} | {m['ioreq_us']:.0f} | {m['irqs']:.2f}, {m['irq_us']:.0f} "
                f"| {m['maps']:.2f}, {m['map_us']:.0f} | {m['copies']:.2f}, {m['copy_us']:.0f} "
                f"| {m['device']:.0f} "
                f"| {m['user']:.0f} / {m['system']:.0f} | {m['user_mib']:.1f} "
                f"| {m.get('domd', float('nan')):.0f} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--keep", type=Path, help="keep the rig's files (console log) here")
    ap.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS),
        help="comma-separated, of: %(default)s",
    )
    ap.add_argument(
        "--report-from",
        type=Path,
        metavar="CONSOLE",
        help="report the results in a kept run's console log (--keep) again, measure nothing",
    )
    args = ap.parse_args()
    names = args.variants.split(",")
    variants = [v for v in VARIANTS if v.name in names]
    unknown = set(names) - {v.name for v in variants}
    missing = {v.baseline for v in variants} - {v.name for v in variants}
    if unknown or missing:
        ap.error(
            f"unknown variants {sorted(unknown)} or their PV baselines missing {sorted(missing)}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        _, results = parse_console(args.report_from.read_text(errors="replace"))
        write_report(collect(results, args.rounds, variants), args)
        return
    rig = ensure_rig()
    kernels = {
        GRANT_IMAGE_NAME: ensure_grant_kernel().image,
        DOMD_IMAGE_NAME: ensure_domd_kernel().image,
    }
    test = XenTest(
        dom0_script(args.rounds, variants),
        {"bench": domu_script()},
        backend="python3 -m pyvirtio xen -v",
        timeout=1800.0 * args.rounds,
        xen_args=("xsm=flask",),
        domu_kernels=kernels,
    )
    scratch = tempfile.TemporaryDirectory(prefix="pyvirtio-xbench-")
    work = args.keep or Path(scratch.name)
    started = time.monotonic()
    result = test.run(rig, work, check=False)
    print(f"xen bench: {time.monotonic() - started:.0f} s, console {result.console_path}")
    if result.exit_code != 0:
        tail = "\n".join(result.console.splitlines()[-60:])
        sys.exit(f"the Xen bench failed (status {result.exit_code}):\n{tail}")
    write_report(collect(result.results, args.rounds, variants), args)


def write_report(
    runs: dict[str, dict[str, list[dict[str, object]]]], args: argparse.Namespace
) -> None:
    """out/xen.{json,md} from the collected runs, and the table on stdout."""
    variants = [v for v in VARIANTS if v.name in runs]
    ended = args.report_from.stat().st_mtime if args.report_from else time.time()
    meta: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ended)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rounds": args.rounds,
        "variants": [v.name for v in variants],
        "jobs": JOBS,
    }
    text = report(runs, meta)
    (args.out / "xen.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (args.out / "xen.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
