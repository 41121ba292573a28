"""A queue over asynchronous storage: requests complete in the order the storage finishes them,
a reset waits for those in flight, a storage bug does not leave them behind; and polling."""

from __future__ import annotations

import os
import threading
from collections.abc import Collection
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.shims.inprocess import InProcessMachine
from pyvirtio.spec.blk import BlkRequestType, BlkStatus
from pyvirtio.storage.base import Buffers, Completion
from pyvirtio.storage.raw import RawImage


class _Done:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(f"waited {self.name}")


class HeldStorage(RawImage):
    """A raw image whose requests are done when started but reported complete one at a time,
    the latest first (``release``: the blocking wait_any waits for it)."""

    queue_depth = 64

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.started: list[_Done] = []
        self.log: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_wait = False

    def _started(self, name: str) -> _Done:
        done = _Done(self.log, name)
        self.started.append(done)
        return done

    def start_readv(self, buffers: Buffers, offset: int) -> Completion:
        self.readv(buffers, offset)
        return self._started(f"read {offset}")

    def start_writev(self, buffers: Buffers, offset: int, *, dsync: bool = False) -> Completion:
        self.writev(buffers, offset, dsync=dsync)
        return self._started(f"write {offset}")

    def start_flush(self) -> Completion:
        return self._started("flush")

    def start_discard(self, offset: int, length: int) -> Completion:
        return self._started("discard")

    def start_write_zeroes(
        self, offset: int, length: int, *, unmap: bool, dsync: bool = False
    ) -> Completion:
        return self._started("zeroes")

    def wait_any(self, started: Collection[Completion], *, block: bool) -> list[Completion]:
        if not block or not started:
            return []
        if self.fail_wait:
            raise RuntimeError("a bug in the storage")
        self.release.wait()
        latest = [c for c in self.started if c in started][-1]
        return [latest]


@pytest.fixture
def held(image_path: Path) -> HeldStorage:
    return HeldStorage(str(image_path))


def test_requests_complete_in_the_order_the_storage_finishes_them(held: HeldStorage) -> None:
    machine = InProcessMachine(BlkDevice(held, queue_size=64))
    drv = BlkDriver(machine.driver())
    q = drv.transport.queues[0]
    blobs = [bytes([i + 1]) * 512 for i in range(6)]
    reqs = [
        drv.submit(BlkRequestType.OUT, i, data_out=b, indirect=False, kick=False)
        for i, b in enumerate(blobs)
    ]
    heads = [next(h for h, p in q._pending.items() if p.token is r) for r in reqs]
    drv.transport.notify(0)
    used = [q.used_elem(i)[0] for i in range(q.used_idx)]
    assert used == heads[::-1]
    drv.wait(reqs)
    assert [r.status for r in reqs] == [BlkStatus.OK] * 6
    with open(held.path, "rb") as f:
        assert f.read(6 * 512) == b"".join(blobs)
    assert held.log == [f"waited write {i * 512}" for i in reversed(range(6))]
    machine.close()


def test_reset_waits_for_the_requests_in_flight(held: HeldStorage) -> None:
    machine = InProcessMachine(BlkDevice(held, queue_size=64), threaded=True)
    drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
    held.release.clear()
    reqs = [drv.submit(BlkRequestType.IN, i * 8, in_len=4096, kick=False) for i in range(4)]
    drv.transport.notify(0)
    for _ in range(2000):
        if len(held.started) == 4:
            break
        threading.Event().wait(0.005)
    assert len(held.started) == 4
    events: list[str] = []

    def reset() -> None:
        drv.transport.reset()
        events.append("reset returned")

    t = threading.Thread(target=reset)
    t.start()
    t.join(0.3)
    events.append("storage released")
    held.release.set()
    t.join(20)
    assert not t.is_alive()
    assert events == ["storage released", "reset returned"]
    assert sorted(held.log) == sorted(f"waited read {i * 4096}" for i in range(4))
    assert all(r.status is None or r.status == BlkStatus.OK for r in reqs)
    drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
    assert drv.read(0, 512) == bytes(512)
    machine.close()


def test_a_storage_bug_waits_for_the_requests_in_flight(held: HeldStorage) -> None:
    """A bug of ours (not the guest's) stops the queue; the buffers of the requests in
    flight are let go only once the storage is done with them."""
    machine = InProcessMachine(BlkDevice(held, queue_size=64))
    drv = BlkDriver(machine.driver())
    held.fail_wait = True
    for i in range(3):
        drv.submit(BlkRequestType.IN, i * 8, in_len=512, kick=False)
    with pytest.raises(RuntimeError, match="a bug in the storage"):
        drv.transport.notify(0)
    assert sorted(held.log) == sorted(f"waited read {i * 4096}" for i in range(3))
    machine.close()


# -- polling -------------------------------------------------------------------------------------


def test_polling_queue_serves_requests(image_path: Path) -> None:
    device = BlkDevice(RawImage(str(image_path)), queue_size=64)
    device.use_polling(200)
    assert device.poll_ns == 200_000
    machine = InProcessMachine(device, threaded=True)
    drv = BlkDriver(machine.driver(), wait=machine.wait_interrupt)
    for i in range(50):
        data = os.urandom(4096)
        drv.write(i * 8, data)
        assert drv.read(i * 8, 4096) == data
    drv.transport.reset()  # a worker polling its ring stops at once
    machine.close()
    with pytest.raises(ValueError):
        device.use_polling(-1)


def test_poll_sees_new_buffers_and_stops_when_told(image_path: Path) -> None:
    device = BlkDevice(RawImage(str(image_path)), queue_size=64)
    machine = InProcessMachine(device)
    drv = BlkDriver(machine.driver())
    queue = device.queues[0]
    poll = device._VirtioDevice__poll  # type: ignore[attr-defined]
    assert not poll(queue, lambda: False, 1_000_000)  # nothing came: the deadline ends it
    drv.submit(BlkRequestType.IN, 0, in_len=512, kick=False)
    assert poll(queue, lambda: False, 10**12)
    assert not poll(queue, lambda: True, 10**12)  # told to stop: at once
    machine.close()
