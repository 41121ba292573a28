"""The virtio-blk load generator behind ``pyvirtio bench``.

It plays a fast VMM and guest at once: guest memory is a memfd shared with the back-end over
vhost-user, and each queue is driven by one thread that keeps ``iodepth`` requests in flight.
Every request slot owns its header, data and status buffers and a fixed descriptor chain laid
out once, so submitting a request is writing its header and publishing its head: the per
request work in Python is a few stores and loads, which keeps the generator from being the
bottleneck it measures. Latency is taken from publishing the head to seeing its used element.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from pyvirtio.driver.blk import DRIVER_FEATURES
from pyvirtio.driver.vhost_user import VhostUserDriver
from pyvirtio.driver.virtqueue import DriverQueue
from pyvirtio.spec.blk import (
    CONFIG_SIZE_BASIC,
    REQ_HEADER,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)
from pyvirtio.spec.features import Feature, bit
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.ring import DescFlag

WORKLOADS = ("read", "write", "randread", "randwrite", "randrw")
_IN = int(BlkRequestType.IN)
_OUT = int(BlkRequestType.OUT)
_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_PATTERN = struct.Struct("<QQ")


class BenchError(Exception):
    """The workload cannot run as asked."""


@dataclass
class Workload:
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    num_queues: int = 1
    runtime: float | None = 10.0
    size: int | None = None
    verify: bool = False
    seed: int = 1
    busy_poll: bool = False


@dataclass
class QueueStats:
    completed: int = 0
    bytes: int = 0
    errors: int = 0
    verify_errors: int = 0
    latencies: list[int] = field(default_factory=list)


@dataclass
class Result:
    workload: Workload
    elapsed: float
    completed: int
    bytes: int
    errors: int
    verify_errors: int
    latencies_ns: list[int]

    @property
    def iops(self) -> float:
        return self.completed / self.elapsed if self.elapsed else 0.0

    @property
    def bw_bytes(self) -> float:
        return self.bytes / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> int:
        if not self.latencies_ns:
            return 0
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def pattern(offset: int, generation: int, length: int) -> bytes:
    """Data that says where it belongs: 16-byte tokens of (offset, generation)."""
    return _PATTERN.pack(offset, generation) * (length // 16)


class _Slot:
    """One request slot: its buffers and a fixed direct descriptor chain (3 descriptors)."""

    __slots__ = ("data", "head", "header", "is_write", "offset", "started", "status")

    def __init__(self, transport: VhostUserDriver, index: int, bs: int) -> None:
        alloc = transport.allocator
        self.header = alloc.alloc(REQ_HEADER.size, 16)
        self.data = alloc.alloc(bs, 4096)
        self.status = alloc.alloc(1, 1)
        self.head = 3 * index
        self.is_write = False
        self.offset = 0
        self.started = 0

    def lay_out(self, queue: DriverQueue, bs: int, is_write: bool) -> None:
        h = self.head
        queue.write_desc(h, self.header, REQ_HEADER.size, _NEXT, h + 1)
        queue.write_desc(h + 1, self.data, bs, _NEXT | (0 if is_write else _WRITE), h + 2)
        queue.write_desc(h + 2, self.status, 1, _WRITE, 0)
        self.is_write = is_write


class _QueueRunner(threading.Thread):
    """Keeps ``iodepth`` requests in flight on one queue until its phase is over."""

    def __init__(
        self,
        gen: LoadGenerator,
        index: int,
        region: tuple[int, int],
        stop_at: float,
        budget: int | None,
        phase: str,
    ) -> None:
        super().__init__(name=f"bench-q{index}", daemon=True)
        self.gen = gen
        self.index = index
        self.region = region
        self.stop_ns = int(stop_at * 1e9)
        self.budget = budget
        self.phase = phase
        self.stats = QueueStats()
        self.error: BaseException | None = None
        start, length = region
        bs = gen.workload.bs
        self.rng = random.Random(gen.workload.seed + index)
        self.next_block = 0
        self.blocks = length // bs
        if phase == "verify":
            self.targets = sorted(o for o in gen.written if start <= o < start + length)
        else:
            self.targets = []

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def _choose(self) -> tuple[int, bool] | None:
        """The next request's offset and direction, or None when the phase has no more."""
        phase, bs = self.phase, self.gen.workload.bs
        if phase == "verify":
            if self.next_block >= len(self.targets):
                return None
            self.next_block += 1
            return self.targets[self.next_block - 1], False
        start = self.region[0]
        if phase in ("read", "write"):
            block = self.next_block % self.blocks
            self.next_block += 1
        else:
            block = self.rng.randrange(self.blocks)
        is_write = phase in ("write", "randwrite") or (
            phase == "randrw" and self.rng.random() < 0.5
        )
        return start + block * bs, is_write

    def _run(self) -> None:
        gen, w = self.gen, self.gen.workload
        transport = gen.transport
        queue = transport.queues[self.index]
        views = gen.views[self.index]
        call_fd = transport.call_fds[self.index]
        kick_fd = transport.kick_fds[self.index]
        bs = w.bs
        stats = self.stats
        latencies = stats.latencies
        written = gen.written
        poller = select.poll()
        poller.register(call_fd, select.POLLIN)
        perf = time.perf_counter_ns
        pack_header = REQ_HEADER.pack_into
        in_flight: dict[int, _Slot] = {}
        busy: set[int] = set()
        idle = list(gen.slots[self.index])
        issued = 0
        stopping = False
        while True:
            now = perf()
            if (self.stop_ns and now >= self.stop_ns) or (
                self.budget is not None and issued >= self.budget
            ):
                stopping = True
            heads = []
            while idle and not stopping:
                choice = self._choose()
                if choice is None:
                    stopping = True
                    break
                offset, is_write = choice
                if offset in busy:
                    # Overlapping requests complete in any order: never issue one (as fio's
                    # serialize_overlap), so that --verify knows what each block holds.
                    # Wait for completions and take this block again.
                    self.next_block -= 1
                    break
                slot = idle.pop()
                if slot.is_write != is_write:
                    slot.lay_out(queue, bs, is_write)
                hview, dview, _ = views[slot.head]
                pack_header(hview, 0, _OUT if is_write else _IN, 0, offset >> 9)
                if is_write:
                    generation = written.get(offset, 0) + 1
                    written[offset] = generation
                    dview[:] = pattern(offset, generation, bs)
                slot.offset = offset
                slot.started = now
                busy.add(offset)
                in_flight[slot.head] = slot
                heads.append(slot.head)
                issued += bs
                if self.budget is not None and issued >= self.budget:
                    stopping = True
            if heads:
                queue.publish_heads(heads)
                if queue.kick_prepare():
                    os.eventfd_write(kick_fd, 1)
            if not in_flight:
                return
            queue.enable_interrupts()  # then look again: no lost wake-up (§2.7.10)
            if queue.used_idx == queue.last_used_idx and not w.busy_poll:
                if not poller.poll(5000):
                    raise BenchError(f"queue {self.index}: no completion within 5 s")
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call_fd)
            end = queue.used_idx
            done_at = perf()
            while queue.last_used_idx != end:
                head, _ = queue.used_elem(queue.last_used_idx)
                queue.last_used_idx = (queue.last_used_idx + 1) & 0xFFFF
                done = in_flight.pop(head, None)
                if done is None:
                    raise BenchError(
                        f"queue {self.index}: back-end returned head {head}, "
                        "which was not in flight"
                    )
                slot = done
                busy.discard(slot.offset)
                latencies.append(done_at - slot.started)
                _, dview, sview = views[head]
                if sview[0] != BlkStatus.OK:
                    stats.errors += 1
                else:
                    stats.completed += 1
                    stats.bytes += bs
                    if w.verify and not slot.is_write and slot.offset in written:
                        expected = pattern(slot.offset, written[slot.offset], bs)
                        if dview != expected:
                            stats.verify_errors += 1
                idle.append(slot)


class LoadGenerator:
    """Connects to a vhost-user-blk back-end and runs workloads against it."""

    def __init__(self, socket_path: str, workload: Workload, *, timeout: float = 5.0) -> None:
        self.workload = w = workload
        if w.rw not in WORKLOADS:
            raise BenchError(f"unknown workload {w.rw!r} (one of {', '.join(WORKLOADS)})")
        if w.bs < 512 or w.bs % 512:
            raise BenchError(f"block size {w.bs} is not a multiple of 512")
        if not 0 < w.iodepth <= 1024:
            raise BenchError(f"iodepth {w.iodepth} is not in 1..1024")
        if w.num_queues < 1:
            raise BenchError("at least one queue")
        queue_size = 1 << max(2, (3 * w.iodepth - 1).bit_length())
        if queue_size > 32768:
            raise BenchError(f"iodepth {w.iodepth} needs a queue of more than 32768")
        per_slot = -(-(w.bs + 4096 + 64) // 4096) * 4096
        memory = w.num_queues * (w.iodepth * per_slot + 64 * queue_size) + (4 << 20)
        self.transport = VhostUserDriver(
            socket_path, DeviceId.BLOCK, memory_size=memory, timeout=timeout
        )
        try:
            self._setup(queue_size)
        except BaseException:
            self.transport.close()
            raise

    def _setup(self, queue_size: int) -> None:
        w = self.workload
        features = DRIVER_FEATURES & ~bit(Feature.RING_INDIRECT_DESC)  # fixed direct chains
        self.transport.negotiate(features)
        self.config = BlkConfig.unpack(self.transport.read_config_bytes(CONFIG_SIZE_BASIC))
        queues = self.config.num_queues if self.transport.has(BlkFeature.MQ) else 1
        if w.num_queues > queues:
            raise BenchError(f"the back-end offers {queues} queues, {w.num_queues} asked")
        self.capacity = self.config.capacity * 512
        lbs = self.config.blk_size if self.transport.has(BlkFeature.BLK_SIZE) else 512
        if w.bs % lbs:
            raise BenchError(f"block size {w.bs} is not a multiple of the disk's {lbs}")
        span = self.capacity if w.size is None else min(self.capacity, w.size)
        if span < w.bs * w.num_queues:
            raise BenchError("the disk (or --size) is smaller than one block per queue")
        self.transport.setup_queues(w.num_queues, [queue_size] * w.num_queues)
        memory = self.transport.memory
        self.slots: list[list[_Slot]] = []
        self.views: list[dict[int, tuple[memoryview, memoryview, memoryview]]] = []
        for q in self.transport.queues:
            slots = [_Slot(self.transport, i, w.bs) for i in range(w.iodepth)]
            for slot in slots:
                slot.lay_out(q, w.bs, False)
            self.slots.append(slots)
            self.views.append(
                {
                    s.head: (
                        memory.buffers(s.header, REQ_HEADER.size, True)[0],
                        memory.buffers(s.data, w.bs, True)[0],
                        memory.buffers(s.status, 1, True)[0],
                    )
                    for s in slots
                }
            )
        self.written: dict[int, int] = {}

    def close(self) -> None:
        for views in self.views:
            for triple in views.values():
                for view in triple:
                    view.release()
        self.transport.close()

    def _regions(self) -> list[tuple[int, int]]:
        w = self.workload
        span = self.capacity if w.size is None else min(self.capacity, w.size)
        per = span // w.num_queues // w.bs * w.bs
        return [(i * per, per) for i in range(w.num_queues)]

    def run(self, progress: bool = False) -> Result:
        """Run the workload (with --verify: prefill for reads, then read everything back)."""
        w = self.workload
        phases = [w.rw]
        if w.verify:
            if w.rw in ("read", "randread"):
                phases.insert(0, "write")
            phases.append("verify")
        main: Result | None = None
        checks: list[Result] = []
        for phase in phases:
            result = self._run_phase(phase, progress and phase == w.rw)
            if phase == w.rw:
                main = result
            else:
                checks.append(result)
        assert main is not None
        for extra in checks:
            main.verify_errors += extra.verify_errors
            main.errors += extra.errors
        return main

    def _run_phase(self, phase: str, progress: bool) -> Result:
        w = self.workload
        regions = self._regions()
        stop_at = 0.0
        budget = None
        if phase == w.rw and w.runtime is not None:
            stop_at = time.perf_counter() + w.runtime
        elif phase != "verify":
            budget = regions[0][1]  # one pass over each queue's region
        runners = [
            _QueueRunner(self, i, regions[i], stop_at, budget, phase) for i in range(w.num_queues)
        ]
        started = time.perf_counter()
        for r in runners:
            r.start()
        show = progress and (w.runtime or 0) > 3
        while any(r.is_alive() for r in runners):
            runners[0].join(1.0)
            if show:
                done = sum(x.stats.completed for x in runners)
                elapsed = time.perf_counter() - started
                print(
                    f"\r{phase}: {elapsed:5.1f} s, {done / max(elapsed, 1e-9):9.0f} IOPS",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if show:
            print(file=sys.stderr)
        elapsed = time.perf_counter() - started
        for r in runners:
            r.join()
            if r.error is not None:
                raise BenchError(f"queue {r.index}: {r.error}") from r.error
        return Result(
            w,
            elapsed,
            completed=sum(r.stats.completed for r in runners),
            bytes=sum(r.stats.bytes for r in runners),
            errors=sum(r.stats.errors for r in runners),
            verify_errors=sum(r.stats.verify_errors for r in runners),
            latencies_ns=[x for r in runners for x in r.stats.latencies],
        )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
