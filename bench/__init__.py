"""Benchmark suites: `make bench` runs them (see docs/performance.md)."""
