"""Throughput of pyvirtio's other devices, seen from a real guest, against the device a user
would run instead: virtio-rng (`pyvirtio rng` vs QEMU's built-in virtio-rng on /dev/urandom),
virtio-net guest to host over a TAP (`pyvirtio net` vs QEMU's built-in virtio-net on the same
kind of TAP, without vhost-net, which this host lacks) and virtio-vsock guest to host
(`pyvirtio vsock`; the kernel's vhost-vsock is the peer where the host has /dev/vhost-vsock).

The same QEMU microvm guest (TCG) for every run, interleaved rounds, medians of per-round
ratios; the host samples each pyvirtio daemon's CPU time around the transfer.

    python -m bench.devices_suite [--rounds 3] [--out out/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from rigs.qemu import QemuGuest, VhostUserDevice, VhostUserNet
from rigs.x86_guest import ensure_guest

from pyvirtio.bench.loadgen import process_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
RNG_BYTES = 1 << 20
STREAM_MIB = 32
VSOCK_PORT = 5000
NET_PORT = 7000

RNG_SCRIPT = f"""
dd if=/dev/hwrng of=/dev/null bs=4096 count={RNG_BYTES // 4096} iflag=fullblock 2>/tmp/dd.err
echo "@@RESULT dd $(tail -n 1 /tmp/dd.err)"
"""
VSOCK_SCRIPT = f"""
dd if=/dev/zero bs=1M count={STREAM_MIB} 2>/dev/null | socat -u - VSOCK-CONNECT:2:{VSOCK_PORT}
"""
NET_SCRIPT = f"""
ip addr add 10.0.9.2/24 dev eth0 && ip link set eth0 up || exit 2
until ping -c 1 -W 1 10.0.9.1 >/dev/null 2>&1; do :; done
dd if=/dev/zero bs=1M count={STREAM_MIB} 2>/dev/null | socat -u - TCP:10.0.9.1:{NET_PORT}
"""


@contextlib.contextmanager
def daemon(args: list[str], log: Path, prefix: tuple[str, ...] = ()) -> Iterator[int]:
    """A pyvirtio daemon (its pid), until the block ends."""
    sock = Path(args[args.index("--socket-path") + 1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pyvirtio", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pyvirtio {args[0]} did not start:\n{log.read_text()}")
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(15)


def _sink(server: socket.socket, result: dict[str, float]) -> None:
    """Accept one stream, read it to its end; record bytes and seconds from first byte."""
    conn, _ = server.accept()
    with conn:
        total, start = 0, 0.0
        while data := conn.recv(1 << 20):
            if not total:
                start = time.monotonic()
            total += len(data)
        result["bytes"] = total
        result["seconds"] = time.monotonic() - start


def run_rng(kind: str, work: Path) -> dict[str, float]:
    rig = ensure_guest()
    sock = work / "rng.sock"
    with contextlib.ExitStack() as stack:
        pid = 0
        if kind == "pyvirtio":
            pid = stack.enter_context(daemon(["rng", "--socket-path", str(sock)], work / "rng.log"))
            devices: list[VhostUserDevice] = [VhostUserDevice(sock, "vhost-user-rng")]
            extra: list[str] = []
        else:
            devices = []
            extra = ["-object", "rng-random,id=rng0,filename=/dev/urandom"]
            extra += ["-device", "virtio-rng-device,rng=rng0"]
        cpu = process_cpu_seconds(pid) if pid else 0.0
        result = rig.run(RNG_SCRIPT, devices, workdir=work / f"rng-{kind}", extra_args=extra)
        cpu = process_cpu_seconds(pid) - cpu if pid else 0.0
    match = re.search(r"copied, ([0-9.]+) s", result.results.get("dd", ""))
    if not match:
        raise RuntimeError(f"no dd figures: {result.results}")
    seconds = float(match.group(1))
    return {"bytes_per_s": RNG_BYTES / seconds, "cpu_s_per_mib": cpu / (RNG_BYTES / 2**20)}


def run_vsock(work: Path) -> dict[str, float]:
    rig = ensure_guest()
    sock, uds = work / "vsock.sock", work / "v.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_{VSOCK_PORT}")
    server.listen(1)
    received: dict[str, float] = {}
    args = ["vsock", "--socket-path", str(sock), "--guest-cid", "3", "--uds-path", str(uds)]
    with server, daemon(args, work / "vsock.log") as pid:
        thread = threading.Thread(target=_sink, args=(server, received), daemon=True)
        thread.start()
        cpu = process_cpu_seconds(pid)
        rig.run(
            VSOCK_SCRIPT,
            [VhostUserDevice(sock, "vhost-user-vsock-device")],
            workdir=work / "vsock-guest",
        )
        cpu = process_cpu_seconds(pid) - cpu
        thread.join(30)
    os.unlink(f"{uds}_{VSOCK_PORT}")
    if received.get("bytes") != STREAM_MIB << 20:
        raise RuntimeError(f"vsock: the host received {received}")
    return {
        "bytes_per_s": received["bytes"] / received["seconds"],
        "cpu_s_per_mib": cpu / STREAM_MIB,
    }


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"pvb{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _netns_sink(ns: str) -> subprocess.Popen[str]:
    """A TCP sink in the namespace that prints bytes and seconds from its first byte."""
    code = (
        "import socket, time\n"
        f"s = socket.create_server(('10.0.9.1', {NET_PORT}))\n"
        "c, _ = s.accept()\n"
        "n, t0 = 0, 0.0\n"
        "while d := c.recv(1 << 20):\n"
        "    t0 = t0 or time.monotonic(); n += len(d)\n"
        "print(n, time.monotonic() - t0)\n"
    )
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )


def run_net(kind: str, work: Path) -> dict[str, float]:
    rig = ensure_guest()
    sock = work / "net.sock"
    mac = "52:54:00:00:09:02"
    with netns() as ns, contextlib.ExitStack() as stack:
        prefix = ("ip", "netns", "exec", ns)
        pid = 0
        if kind == "pyvirtio":  # the daemon makes the TAP
            args = ["net", "--socket-path", str(sock), "--tap", "tap0"]
            pid = stack.enter_context(daemon(args, work / "net.log", prefix))
            devices: list[VhostUserNet] = [VhostUserNet(sock, mac)]
            extra: list[str] = []
        else:  # a persistent TAP that QEMU attaches to
            subprocess.run([*prefix, "ip", "tuntap", "add", "tap0", "mode", "tap"], check=True)
            devices = []
            extra = ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"]
            extra += ["-device", f"virtio-net-device,netdev=n0,mac={mac}"]
        subprocess.run([*prefix, "ip", "addr", "add", "10.0.9.1/24", "dev", "tap0"], check=True)
        subprocess.run([*prefix, "ip", "link", "set", "tap0", "up"], check=True)
        guest: QemuGuest = rig.guest(
            NET_SCRIPT, devices, workdir=work / f"net-{kind}", extra_args=extra
        )
        if kind != "pyvirtio":  # QEMU opens the TAP itself: it runs in the namespace
            inner = guest.command
            guest.command = lambda: [*prefix, *inner()]  # type: ignore[method-assign]
        sink = _netns_sink(ns)
        time.sleep(0.3)  # the sink listens
        cpu = process_cpu_seconds(pid) if pid else 0.0
        with guest:
            guest.start()
            guest.wait()
        cpu = process_cpu_seconds(pid) - cpu if pid else 0.0
        out, _ = sink.communicate(timeout=30)
    size, seconds = out.split()
    if int(size) != STREAM_MIB << 20:
        raise RuntimeError(f"net: the host received {size} bytes")
    return {"bytes_per_s": int(size) / float(seconds), "cpu_s_per_mib": cpu / STREAM_MIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="pyvirtio-dbench-")
    work = Path(scratch.name)
    runs: dict[str, list[dict[str, float]]] = {}
    vsock_peer = (
        "vhost-vsock (not run by this suite yet)"
        if os.path.exists("/dev/vhost-vsock")
        else "none: this host has no /dev/vhost-vsock"
    )
    for rnd in range(args.rounds):
        for device, kind, run in (
            ("rng", "pyvirtio", lambda: run_rng("pyvirtio", work)),
            ("rng", "qemu", lambda: run_rng("qemu", work)),
            ("net", "pyvirtio", lambda: run_net("pyvirtio", work)),
            ("net", "qemu", lambda: run_net("qemu", work)),
            ("vsock", "pyvirtio", lambda: run_vsock(work)),
        )[:: 1 if rnd % 2 == 0 else -1]:
            figures = run()
            runs.setdefault(f"{device}/{kind}", []).append(figures)
            print(
                f"round {rnd + 1} {device:5} {kind:8} {figures['bytes_per_s'] / 2**20:8.2f} MiB/s"
            )

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    def ratio(device: str) -> float:
        pairs = zip(runs[f"{device}/pyvirtio"], runs[f"{device}/qemu"], strict=True)
        return statistics.median(a["bytes_per_s"] / b["bytes_per_s"] for a, b in pairs)

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rounds": args.rounds,
    }
    lines = [
        f"Measured {meta['date']} on {meta['machine']}: a QEMU microvm guest under TCG, "
        f"{args.rounds} interleaved rounds; medians, ratios per round (pyvirtio / peer).",
        "",
        "| device | workload | pyvirtio MiB/s | peer | peer MiB/s | ratio | pyvirtio CPU s/MiB |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
        f"| rng | guest reads {RNG_BYTES >> 20} MiB from /dev/hwrng "
        f"| {med('rng/pyvirtio', 'bytes_per_s') / 2**20:.2f} | QEMU virtio-rng (rng-random) "
        f"| {med('rng/qemu', 'bytes_per_s') / 2**20:.2f} | {ratio('rng'):.2f} "
        f"| {med('rng/pyvirtio', 'cpu_s_per_mib'):.3f} |",
        f"| net | guest sends {STREAM_MIB} MiB over TCP to the host (TAP) "
        f"| {med('net/pyvirtio', 'bytes_per_s') / 2**20:.2f} | QEMU virtio-net (tap, no vhost) "
        f"| {med('net/qemu', 'bytes_per_s') / 2**20:.2f} | {ratio('net'):.2f} "
        f"| {med('net/pyvirtio', 'cpu_s_per_mib'):.3f} |",
        f"| vsock | guest sends {STREAM_MIB} MiB to a host program "
        f"| {med('vsock/pyvirtio', 'bytes_per_s') / 2**20:.2f} "
        f"| {vsock_peer} "
        f"| - | - | {med('vsock/pyvirtio', 'cpu_s_per_mib'):.3f} |",
    ]
    (args.out / "devices.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (args.out / "devices.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
