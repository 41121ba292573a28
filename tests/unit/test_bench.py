"""The load generator against pyvirtio, qemu-storage-daemon, and back-ends that misbehave."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.bench.loadgen import LoadGenerator, Workload

from .test_vhost_user import serve


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("rw", ["read", "write", "randread", "randwrite", "randrw"])
def test_workloads_verify_clean_against_pyvirtio(tmp_path: Path, rw: str) -> None:
    with serve(tmp_path, num_queues=2) as served:
        path = served.path
        gen = LoadGenerator(
            path,
            Workload(
                rw=rw, bs=8192, iodepth=8, num_queues=2, runtime=None, size=2 << 20, verify=True
            ),
        )
        try:
            result = gen.run()
        finally:
            gen.close()
    assert result.errors == 0 and result.verify_errors == 0
    assert result.completed == (2 << 20) // 8192
    assert len(result.latencies_ns) == result.completed
    if "write" in rw or rw == "randrw" or rw in ("read", "randread"):
        assert gen.written  # verify laid down or wrote data it then read back


def test_verify_catches_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(tmp_path) as served:
        path = served.path
        original = served.image.readv

        def corrupting(buffers, offset):  # type: ignore[no-untyped-def]
            original(buffers, offset)
            if offset == 8192:
                buffers[0][0] ^= 0xFF

        monkeypatch.setattr(served.image, "readv", corrupting)
        gen = LoadGenerator(
            path,
            Workload(rw="write", bs=4096, iodepth=4, runtime=None, size=64 * 1024, verify=True),
        )
        try:
            result = gen.run()
        finally:
            gen.close()
    assert result.verify_errors == 1


def test_cli_json_with_backend_cpu(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 << 20))
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "blk", "--image", str(img), "--socket-path", str(sock)]
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        out = bench(
            "--socket",
            str(sock),
            "--rw",
            "randrw",
            "--bs",
            "4k",
            "--iodepth",
            "16",
            "--runtime",
            "1",
            "--verify",
            "--backend-pid",
            str(proc.pid),
            "--json",
        )
    finally:
        proc.terminate()
        proc.wait(10)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["iops"] > 0 and report["bw_bytes"] > 0 and report["errors"] == 0
    assert report["verify_errors"] == 0
    assert set(report["lat_ns"]) == {"p50", "p99", "p999"}
    assert report["lat_ns"]["p50"] <= report["lat_ns"]["p99"] <= report["lat_ns"]["p999"]
    assert report["backend_cpu_s"] > 0


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[tuple[str, int]]:
    exe = shutil.which("qemu-storage-daemon")
    assert exe, "qemu-storage-daemon is missing: make test installs qemu-system-common"
    img = tmp_path / "q.img"
    img.write_bytes(bytes(16 << 20))
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen(
        [
            exe,
            "--blockdev",
            f"driver=file,node-name=f0,filename={img},cache.direct=off",
            "--blockdev",
            "driver=raw,node-name=d0,file=f0",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=2",
        ]
    )
    for _ in range(500):
        if sock.exists():
            break
        time.sleep(0.02)
    yield str(sock), proc.pid
    proc.terminate()
    proc.wait(10)


def test_against_qemu_storage_daemon(qsd: tuple[str, int]) -> None:
    sock, pid = qsd
    out = bench(
        "--socket",
        sock,
        "--rw",
        "randwrite",
        "--bs",
        "4k",
        "--iodepth",
        "32",
        "--num-queues",
        "2",
        "--size",
        "4m",
        "--verify",
        "--backend-pid",
        str(pid),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["completed"] == 1024 and report["verify_errors"] == 0


def _fake_backend(path: Path, behaviour: str) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        conn, _ = listener.accept()
        listener.close()
        if behaviour == "silent":
            time.sleep(8)
        elif behaviour == "garbage":
            conn.recv(12)
            conn.sendall(b"\xff" * 64)
            time.sleep(2)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "behaviour, message",
    [
        ("silent", "no reply within"),
        ("garbage", "GET_FEATURES"),
        ("vanish", "GET_FEATURES"),
    ],
)
def test_misbehaving_backends_get_a_clear_error_in_bounded_time(
    tmp_path: Path, behaviour: str, message: str
) -> None:
    sock = tmp_path / "fake.sock"
    _fake_backend(sock, behaviour)
    started = time.monotonic()
    out = bench("--socket", str(sock), "--runtime", "1", timeout=30)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert time.monotonic() - started < 20


def test_no_backend_at_all(tmp_path: Path) -> None:
    out = bench("--socket", str(tmp_path / "none.sock"))
    assert out.returncode == 2 and "cannot connect" in out.stderr


def test_backend_dying_mid_run_is_an_error(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 << 20))
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "blk", "--image", str(img), "--socket-path", str(sock)]
    )
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.02)
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvirtio",
            "bench",
            "--socket",
            str(sock),
            "--runtime",
            "30",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 1
    assert "no completion" in err
    os.unlink(sock)


def test_peers_suite_compares_with_the_best_peer_of_each_round() -> None:
    """bench.peers_suite: each pyvirtio figure over the round's best peer (by IOPS), the
    O_DIRECT configuration compared with the O_DIRECT peer only."""
    from bench import peers_suite

    def fig(iops: float) -> dict[str, float]:
        return {
            "iops": iops,
            "bw_bytes": iops * 4096,
            "p99_us": 100.0,
            "cpu_us_per_request": 10.0,
            "cpu_s_per_gib": 1.0,
        }

    by = {
        "qsd threads": [fig(100), fig(300)],
        "qsd io_uring": [fig(200), fig(150)],
        "qsd native direct": [fig(50), fig(50)],
        **{name: [fig(100), fig(150)] for name in peers_suite.OURS},
    }
    rows = peers_suite.summarise({"randread 4K QD1": by}, 2)
    ratios = {row["ours"]: row["iops_ratio"] for row in rows}
    assert ratios["pyvirtio sync"] == pytest.approx((100 / 200 + 150 / 300) / 2)
    assert ratios["pyvirtio io_uring direct"] == pytest.approx(2.5)
    assert {row["best_peer"] for row in rows if row["ours"] == "pyvirtio io_uring direct"} == {
        "qsd native direct"
    }
