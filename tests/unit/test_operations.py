"""Operating a running `pyvirtio blk`: readiness for systemd, `pyvirtio ctl` on its control
socket (query, resize, read-only, stop) and its metrics over HTTP, with a front-end doing I/O."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.vhost_user import VhostUserDriver
from pyvirtio.spec.blk import BlkRequestType, BlkStatus
from pyvirtio.spec.ids import DeviceId

MiB = 1 << 20


def _ctl(ctl: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", "ctl", "--socket", str(ctl), *words],
        capture_output=True,
        text=True,
        timeout=20,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_ctl_metrics_and_readiness(tmp_path: Path) -> None:
    image, sock, ctl = tmp_path / "d.img", tmp_path / "vu.sock", tmp_path / "ctl.sock"
    image.write_bytes(bytes(16 * MiB))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    port = _free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pyvirtio", "blk", "--socket-path", str(sock)),
            *("--image", str(image), "--control-socket", str(ctl), "--metrics-port", str(port)),
        ],
        env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert notify.recv(64) == b"READY=1"  # sent once the sockets accept
        assert json.loads(_ctl(ctl, "query").stdout) == {"devices": []}  # no front-end yet
        transport = VhostUserDriver(str(sock), DeviceId.BLOCK)
        drv = BlkDriver(transport, wait=transport.wait_interrupt)
        drv.write(0, b"z" * 65536)
        (device,) = json.loads(_ctl(ctl, "query").stdout)["devices"]
        assert device["type"] == "BlkDevice" and device["queues"][0]["requests"] == 1

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            families = {f.name: f for f in text_string_to_metric_families(page.read().decode())}
        assert any(s.value == 1 for s in families["pyvirtio_requests"].samples)
        assert "pyvirtio_request_seconds" in families
        assert "pyvirtio_requests" in _ctl(ctl, "metrics").stdout

        assert _ctl(ctl, "resize", "8m").returncode == 1  # shrinking needs --shrink
        grown = _ctl(ctl, "resize", "32m")
        assert grown.returncode == 0, grown.stderr
        assert image.stat().st_size == 32 * MiB and drv.capacity == 32 * MiB // 512

        assert _ctl(ctl, "read-only", "on").returncode == 0
        refused = drv.request(BlkRequestType.OUT, 0, data_out=b"w" * 512)
        assert refused.status == BlkStatus.IOERR
        assert _ctl(ctl, "read-only", "off").returncode == 0
        assert drv.request(BlkRequestType.OUT, 0, data_out=b"w" * 512).status == BlkStatus.OK

        bad = _ctl(ctl, "frobnicate")
        assert bad.returncode == 1 and "CommandNotFound" in bad.stderr
        transport.close()
        assert _ctl(ctl, "stop").returncode == 0
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        notify.close()
