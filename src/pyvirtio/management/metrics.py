"""Metrics in Prometheus' text format, through prometheus_client.

A custom collector reads the devices' queue statistics (``stats.QueueStats``) when it is
scraped: the data path only adds to plain counters. Metrics per queue: requests, bytes each
way, errors by kind, requests in flight, and a latency histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pyvirtio.device import VirtioDevice
from pyvirtio.stats import LATENCY_BUCKETS


class DeviceCollector(Collector):
    def __init__(self, devices: Callable[[], list[VirtioDevice]]) -> None:
        self.devices = devices

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        labels = ["device", "queue"]
        requests = CounterMetricFamily("pyvirtio_requests", "Requests completed", labels=labels)
        data = CounterMetricFamily(
            "pyvirtio_bytes",
            "Bytes of completed requests: read from the driver, written to it",
            labels=[*labels, "direction"],
        )
        errors = CounterMetricFamily(
            "pyvirtio_errors", "Requests completed with an error", labels=[*labels, "kind"]
        )
        in_flight = GaugeMetricFamily(
            "pyvirtio_requests_in_flight", "Requests taken and not completed", labels=labels
        )
        latency = HistogramMetricFamily(
            "pyvirtio_request_seconds",
            "Time from taking a request off the ring to completing it",
            labels=labels,
        )
        for number, device in enumerate(self.devices()):
            for stats in device.stats:
                at = [f"{type(device).__name__}{number}", str(stats.index)]
                requests.add_metric(at, stats.requests)
                data.add_metric([*at, "read"], stats.bytes_read)
                data.add_metric([*at, "written"], stats.bytes_written)
                for kind, count in sorted(stats.errors.items()):
                    errors.add_metric([*at, kind], count)
                in_flight.add_metric(at, stats.in_flight)
                cumulative, buckets = 0, []
                for bound, count in zip(
                    [*map(str, LATENCY_BUCKETS), "+Inf"], stats.latency_buckets, strict=True
                ):
                    cumulative += count
                    buckets.append((bound, cumulative))
                latency.add_metric(at, buckets, stats.latency_sum_ns / 1e9)
        yield from (requests, data, errors, in_flight, latency)


def registry_for(devices: Callable[[], list[VirtioDevice]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeviceCollector(devices))
    return registry


def metrics_text(devices: list[VirtioDevice]) -> str:
    return generate_latest(registry_for(lambda: devices)).decode()
