"""virtio-rng through the in-process driver: where the bytes come from, the rate limit, and
what a hostile driver gets."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pyvirtio.devices.rng import MAX_REQUEST, RngDevice
from pyvirtio.driver.rng import RngDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.status import DeviceStatus


def _machine(device: RngDevice, threaded: bool = False) -> tuple[InProcessMachine, RngDriver]:
    machine = InProcessMachine(device, memory_size=1 << 20, threaded=threaded)
    wait = machine.wait_interrupt if threaded else None
    return machine, RngDriver(machine.driver(), wait=wait)


def test_bytes_come_from_the_source_in_a_loop(tmp_path: Path) -> None:
    source = tmp_path / "entropy"
    source.write_bytes(bytes(range(200)))
    device = RngDevice(source=str(source))
    machine, drv = _machine(device)
    try:
        assert drv.read(150) == bytes(range(150))
        assert drv.read(100) == bytes(range(150, 200)) + bytes(range(50))
        assert device.bytes_served == 250
    finally:
        machine.close()
        device.close()


def test_urandom_by_default_and_large_requests_are_capped() -> None:
    device = RngDevice()
    machine, drv = _machine(device)
    try:
        a, b = drv.read(64), drv.read(64)
        assert len(a) == len(b) == 64 and a != b
        assert len(drv.read(MAX_REQUEST * 2)) == MAX_REQUEST
    finally:
        machine.close()
        device.close()


def test_rate_limit_spreads_bytes_over_periods() -> None:
    device = RngDevice(period=0.2, max_bytes=100)
    machine, drv = _machine(device, threaded=True)
    try:
        start = time.monotonic()
        got = sum(len(drv.read(100)) for _ in range(3))
        assert got == 300
        assert time.monotonic() - start >= 0.35  # three budgets: two waits for a new period
    finally:
        machine.close()
        device.close()


def test_reset_does_not_wait_for_the_rate_limit() -> None:
    device = RngDevice(period=30, max_bytes=10)
    machine, drv = _machine(device, threaded=True)
    try:
        assert len(drv.read(10)) == 10
        waiting = threading.Thread(target=lambda: drv.read(10, timeout=60), daemon=True)
        waiting.start()
        time.sleep(0.2)
        start = time.monotonic()
        drv.transport.reset()
        assert time.monotonic() - start < 10  # the worker gave up its wait for the period
    finally:
        machine.close()
        device.close()


def test_readable_buffers_need_reset() -> None:
    device = RngDevice()
    machine, drv = _machine(device)
    try:
        q = drv.queue
        buf = drv.transport.allocator.alloc(16)
        q.add([(buf, 16)], [], "bad", indirect=False)
        drv.transport.notify(0)
        assert drv.transport.status & DeviceStatus.NEEDS_RESET
    finally:
        machine.close()
        device.close()


@pytest.mark.parametrize("kw", [{"period": 1.0}, {"max_bytes": 5}, {"period": 0, "max_bytes": 1}])
def test_bad_rate_limits_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RngDevice(**kw)  # type: ignore[arg-type]


def test_rng_command_serves_over_vhost_user(tmp_path: Path) -> None:
    import subprocess
    import sys

    from pyvirtio.driver.vhost_user import VhostUserDriver
    from pyvirtio.spec.ids import DeviceId

    source = tmp_path / "entropy"
    source.write_bytes(bytes(range(256)) * 4)
    sock = tmp_path / "rng.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvirtio",
            "rng",
            "--socket-path",
            str(sock),
            "--filename",
            str(source),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        transport = VhostUserDriver(str(sock), DeviceId.ENTROPY)
        try:
            drv = RngDriver(transport, wait=transport.wait_interrupt)
            assert drv.read(1000) == (bytes(range(256)) * 4)[:1000]
        finally:
            transport.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
