"""Guest memory mapping on Xen: a small map cache that must evict, and static mapping.

Both run the same domU workload as test_disk (patterns, ext4, fsck; dom0 checks the image).
"""

from __future__ import annotations

import re

import pytest

from tests.xen.conftest import BACKEND, Runner
from tests.xen.test_disk import DOM0_CHECK_IMAGE, DOMU_FS, _assert_fs

pytestmark = pytest.mark.xen

DOM0 = (
    DOM0_CHECK_IMAGE
    + r"""
backend_start
make_disk /tmp/a.img 64
domu_run d1 fs 600 "$(vdisk xvda /tmp/a.img)"
rc=$?
sleep 2  # the toolstack removes the disk; the daemon logs its map cache statistics
check_image /tmp/a.img a
backend_log
exit $rc
"""
)


def test_small_map_cache_evicts_and_stays_bounded(xen_run: Runner) -> None:
    """4 buckets (8 MiB of dom0 address space) for a domU that touches far more: buffers are
    mapped on demand, buckets evicted, and the cache never grows past its bound (requests
    that find every bucket held map their own pages; rings have mappings of their own)."""
    result = xen_run(DOM0, {"fs": DOMU_FS}, backend=f"{BACKEND} --map-cache-pages 2048")
    _assert_fs(result.results, "d1", "a")
    stats = re.search(
        r"map cache: (\d+) maps, (\d+) evictions, at most (\d+) pages mapped \(bound (\d+)\); "
        r"(\d+) page maps for requests that found it full",
        result.console,
    )
    assert stats, "the daemon did not report its map cache"
    maps, evictions, peak, bound, _ = map(int, stats.groups())
    assert bound == 2048
    assert evictions > 0 and maps > 4
    assert peak <= bound, stats.group(0)
    print(f"map cache: {stats.group(0)}")


def test_static_mapping(xen_run: Runner) -> None:
    """--mapping static maps the domU's RAM once (found by asking Xen) and serves from it."""
    result = xen_run(DOM0, {"fs": DOMU_FS}, backend=f"{BACKEND} --mapping static")
    _assert_fs(result.results, "d1", "a")
    mapped = re.search(r"statically mapped (\d+) MiB of guest RAM", result.console)
    assert mapped, "the daemon did not map the guest statically"
    assert 100 <= int(mapped.group(1)) <= 1024
