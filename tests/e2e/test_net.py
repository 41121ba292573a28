"""virtio-net on unmodified Debian guests with `pyvirtio net`: two guests on a pyvirtio switch
(no host networking), and a guest on a TAP device in a network namespace the test makes.
Ping, and a TCP transfer each way whose bytes are checked; the daemons' counters show the
offloads at work (checksum offload on the switch, TSO both ways on the TAP)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rigs.qemu import VhostUserNet
from rigs.x86_guest import X86Guest

from tests.e2e.conftest import GUEST_TIMEOUT
from tests.e2e.test_rng import ROOT, _daemon

pytestmark = pytest.mark.e2e

MiB = 1 << 20

PEER_SCRIPT = """
ip link set lo up
ip addr add {me}/24 dev eth0 && ip link set eth0 up || exit 2
i=0
until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i + 1)); [ $i -gt 90 ] && exit 3; done
echo "@@RESULT ping $(ping -c 3 -W 2 {peer} | grep -c 'bytes from')"
dd if=/dev/urandom of=/tmp/out bs=1M count=4 2>/dev/null
echo "@@RESULT sent_sha $(sha256sum /tmp/out | cut -c1-64)"
socat -u TCP-LISTEN:7000,reuseaddr CREATE:/tmp/in &
rx=$!
i=0
until socat -u FILE:/tmp/out TCP:{peer}:7000 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 90 ] && exit 4; sleep 1
done
wait $rx || exit 5
echo "@@RESULT got_sha $(sha256sum /tmp/in | cut -c1-64)"
"""


def _stats(log: str) -> dict[str, int]:
    match = re.search(r"net: (tx \d+.*)", log)
    assert match, f"no counters in the daemon's log:\n{log[-2000:]}"
    words = match.group(1).replace(",", "").split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


def test_two_guests_on_a_switch(
    rig: X86Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the switch's directory
    switch = uuid.uuid4().hex[:8]
    macs = ["52:54:00:00:01:01", "52:54:00:00:01:02"]
    ips = ["10.0.0.1", "10.0.0.2"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    with (
        _daemon(["net", "--socket-path", str(socks[0]), "--switch", switch], logs[0]) as a,
        _daemon(["net", "--socket-path", str(socks[1]), "--switch", switch], logs[1]) as b,
    ):
        guests = [
            rig.guest(
                PEER_SCRIPT.format(me=ips[i], peer=ips[1 - i]),
                [VhostUserNet(socks[i], macs[i])],
                workdir=tmp_path / f"guest{i}",
                timeout=GUEST_TIMEOUT * 2,
            )
            for i in (0, 1)
        ]
        with contextlib.ExitStack() as stack:
            for guest in guests:
                stack.enter_context(guest)
                guest.start()
            results = [guest.wait() for guest in guests]
        assert a.poll() is None and b.poll() is None, "a daemon died"
    for i in (0, 1):
        print(results[i].results)
        assert results[i].results["ping"] == "3"
        assert results[i].results["got_sha"] == results[1 - i].results["sent_sha"]
    counters = [_stats(log.read_text()) for log in logs]
    print(counters)
    assert all(c["tx_csum"] > 0 for c in counters), "the guests did not use checksum offload"
    assert all(c["tx_gso"] == 0 for c in counters)  # no TSO offered on a switch


@contextlib.contextmanager
def _netns() -> Iterator[str]:
    name = f"pv{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot make a network namespace: {proc.stderr.strip()}", pytrace=False)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


TAP_SCRIPT = """
ip link set lo up
ip addr add 10.0.1.2/24 dev eth0 && ip link set eth0 up || exit 2
i=0
until ping -c 1 -W 1 10.0.1.1 >/dev/null 2>&1; do i=$((i + 1)); [ $i -gt 90 ] && exit 3; done
echo "@@RESULT ping $(ping -c 3 -W 2 10.0.1.1 | grep -c 'bytes from')"
dd if=/dev/urandom of=/tmp/out bs=1M count=8 2>/dev/null
echo "@@RESULT sent_sha $(sha256sum /tmp/out | cut -c1-64)"
socat -u FILE:/tmp/out TCP:10.0.1.1:7000 || exit 4
socat -u TCP-LISTEN:7001,reuseaddr CREATE:/tmp/in &
rx=$!
sleep 0.5
echo @@LISTENING
wait $rx || exit 5
echo "@@RESULT got_sha $(sha256sum /tmp/in | cut -c1-64)"
"""


def test_guest_on_a_tap_device(rig: X86Guest, tmp_path: Path) -> None:
    sock, log = tmp_path / "net.sock", tmp_path / "net.log"
    down = os.urandom(8 * MiB)
    (tmp_path / "down").write_bytes(down)
    with _netns() as ns:
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [
                    *_in(ns, sys.executable, "-m", "pyvirtio", "net"),
                    *("--socket-path", str(sock), "--tap", "tap0", "-v"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
            )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert daemon.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.05)
            for cmd in (
                ["ip", "addr", "add", "10.0.1.1/24", "dev", "tap0"],
                ["ip", "link", "set", "tap0", "up"],
            ):
                subprocess.run(_in(ns, *cmd), check=True)
            received_path = tmp_path / "up"
            up = subprocess.Popen(
                _in(ns, "socat", "-u", "TCP-LISTEN:7000,reuseaddr", f"CREATE:{received_path}")
            )
            guest = rig.guest(
                TAP_SCRIPT,
                [VhostUserNet(sock, "52:54:00:00:02:02")],
                workdir=tmp_path / "guest",
                timeout=GUEST_TIMEOUT,
            )
            with guest:
                guest.start()
                guest.wait_for_console("@@LISTENING", GUEST_TIMEOUT)
                subprocess.run(
                    _in(ns, "socat", "-u", f"FILE:{tmp_path / 'down'}", "TCP:10.0.1.2:7001"),
                    check=True,
                    timeout=120,
                )
                result = guest.wait()
            up.wait(timeout=30)
            received = received_path.read_bytes()
            assert daemon.poll() is None, "the daemon died"
        finally:
            daemon.terminate()
            daemon.wait(15)
    print(result.results)
    assert result.results["ping"] == "3"
    assert hashlib.sha256(received).hexdigest() == result.results["sent_sha"]
    assert result.results["got_sha"] == hashlib.sha256(down).hexdigest()
    counters = _stats(log.read_text())
    print(counters)
    assert counters["tx_gso"] > 0, "the guest did not send TSO frames"
    assert counters["rx_gso"] > 0, "the TAP did not hand the guest large segments"
