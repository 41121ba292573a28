"""What each queue of a device did: requests, bytes, errors by kind, requests in flight, and a
latency histogram.

The queue's worker updates its own :class:`QueueStats` (one writer per queue, no lock on the
data path); readers (the management socket, metrics scrapes) take a consistent-enough
snapshot with :meth:`QueueStats.snapshot`. Latency is from the moment a request is taken from
the ring to the moment its used element is written, in the worker's monotonic clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Upper bounds of the latency buckets, in seconds (the last bucket is +Inf).
LATENCY_BUCKETS = (
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BUCKETS)


@dataclass
class QueueStats:
    index: int
    requests: int = 0
    bytes_read: int = 0  # device-readable bytes of the requests (the driver's data out)
    bytes_written: int = 0  # bytes the device wrote into the requests
    in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS_NS) + 1))
    latency_sum_ns: int = 0

    def taken(self) -> None:
        self.in_flight += 1

    def completed(self, read: int, written: int, elapsed_ns: int) -> None:
        self.in_flight -= 1
        self.requests += 1
        self.bytes_read += read
        self.bytes_written += written
        self.latency_buckets[bisect.bisect_left(_BOUNDS_NS, elapsed_ns)] += 1
        self.latency_sum_ns += elapsed_ns

    def error(self, kind: str) -> None:
        """A request the device completed with an error of ``kind`` (its own name for it)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def snapshot(self) -> dict[str, object]:
        return {
            "index": self.index,
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "in_flight": self.in_flight,
            "errors": dict(self.errors),
            "latency_buckets": dict(
                zip([*LATENCY_BUCKETS, float("inf")], list(self.latency_buckets), strict=True)
            ),
            "latency_sum_s": self.latency_sum_ns / 1e9,
        }
