"""A domU whose virtio disk uses Xen grants: buffers addressed as ``(1 << 63) | gref << 12``
plus the offset (linux xen-grant-dma), so the backend must map them through /dev/xen/gntdev.

The domU boots :mod:`rigs.xen.grant_kernel` (Debian's linux-source-6.1, built with
``XEN_VIRTIO_FORCE_GRANT`` and a test-only patch that makes libxl's device tree nodes use
grants to dom0 too) with the usual domU initramfs; the kernel is built on first use and
cached. Such a guest refuses a virtio device that does not offer ``VIRTIO_F_ACCESS_PLATFORM``.
"""

from __future__ import annotations

import functools
import re

import pytest
from rigs import RigError
from rigs.xen.grant_kernel import GRANT_IMAGE_NAME, GrantKernel, ensure_grant_kernel

from pyvirtio.spec.features import Feature
from tests.xen.conftest import Runner
from tests.xen.test_disk import DOM0_CHECK_IMAGE, DOMU_FS, _assert_fs

pytestmark = pytest.mark.xen

#: The daemon's map statistics: guest-physical maps, grant maps (rings), grant copy calls.
GRANT_STATS = r"map cache: (\d+) maps, .*; (\d+) grant maps \(rings\), (\d+) grant copy calls"


@pytest.fixture(scope="session")
def grant_kernel() -> GrantKernel:
    """The grant domU kernel (built on first use, ~6 min, then cached)."""
    try:
        return ensure_grant_kernel()
    except (RigError, OSError) as exc:
        pytest.fail(f"cannot build the grant kernel: {exc}", pytrace=False)


@pytest.fixture
def grant_run(xen_run: Runner, grant_kernel: GrantKernel) -> Runner:
    """``xen_run`` with the grant kernel at /domu/Image-grants in dom0 (the dom0 script picks
    it with ``domu_kernel Image-grants``)."""
    return functools.partial(xen_run, domu_kernels={GRANT_IMAGE_NAME: grant_kernel.image})


# domU: what says the kernel is the grant one and its virtio devices use grants to dom0.
DOMU_GRANTS = r"""
result kernel "$(uname -r)"
[ -e /proc/modules ] && result modules 1 || result modules 0
dmesg >/tmp/dmesg.txt
grep -i -E 'xen|grant|virtio|hvc' /tmp/dmesg.txt | sed 's/^/dmesg| /'
result xen_found "$(grep -c 'Xen .* support found' /tmp/dmesg.txt)"
# grant-dma-ops.c: "<device>: Using dom0 as backend", once per virtio device it set up.
result dom0_backend "$(grep -c 'Using dom0 as backend' /tmp/dmesg.txt)"
result no_access_platform "$(grep -c 'must provide VIRTIO_F_ACCESS_PLATFORM' /tmp/dmesg.txt)"
for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev/features" ] || continue
    name=$(basename "$dev")
    f=$(cat "$dev/features")  # one character per feature bit, bit 0 first
    result "$name.features" "$f"
    result "$name.driver" "$(basename "$(readlink "$dev/driver" 2>/dev/null)")"
done
"""


def _assert_grant_guest(r: dict[str, str], dom: str) -> None:
    """The domU ran the grant kernel (built-in drivers, no modules) on Xen."""
    assert r[f"{dom}.kernel"].startswith("6.1."), r
    assert not r[f"{dom}.kernel"].endswith("-arm64"), f"Debian's kernel booted: {r}"
    assert r[f"{dom}.modules"] == "0", r
    assert r[f"{dom}.xen_found"] != "0", r


def test_grant_kernel_boots(grant_run: Runner) -> None:
    """The grant kernel boots as a domU without disks, with the usual initramfs (its /init
    skips insmod for a kernel without module support), and reports back."""
    dom0 = """
domu_kernel Image-grants
domu_run g0 grants 300
rc=$?
exit $rc
"""
    result = grant_run(dom0, {"grants": DOMU_GRANTS}, backend=None)
    r = result.results
    assert r["g0.exit"] == "0", r
    _assert_grant_guest(r, "g0")
    assert r["g0.dom0_backend"] == "0", r  # no virtio device, nothing set up
    assert "has no module support: drivers are built in" in result.console
    assert "@@GUEST-INIT insmod" not in result.console


def test_disk_through_grants(grant_run: Runner) -> None:
    """The grant domU writes and reads back patterns on /dev/vda, makes ext4 and fsck's it;
    dom0 finds it all in the image. The guest used grants for the disk (its virtio-mmio
    device got grant DMA ops with dom0 as backend, ACCESS_PLATFORM negotiated), the backend
    logged mapping grants, and it never mapped guest-physical memory."""
    dom0 = (
        DOM0_CHECK_IMAGE
        + r"""
backend_start
domu_kernel Image-grants
make_disk /tmp/a.img 64
domu_run g1 fs 300 "$(vdisk xvda /tmp/a.img)"
rc=$?
sleep 2  # the toolstack removes the disk; the daemon logs its map cache statistics
backend_check after_domu
check_image /tmp/a.img a
backend_log
exit $rc
"""
    )
    result = grant_run(dom0, {"fs": DOMU_GRANTS + DOMU_FS}, check=False)
    r = result.results
    guest = re.findall(r"^g1\| .*$", result.console, re.MULTILINE)
    assert r.get("g1.exit") == "0", "the domU failed:\n" + "\n".join(guest[-40:])
    _assert_grant_guest(r, "g1")
    assert r["g1.no_access_platform"] == "0", "the backend does not offer ACCESS_PLATFORM"
    assert r["g1.dom0_backend"] == "1", f"the disk did not get grant DMA ops: {r}"
    assert r["g1.virtio0.driver"] == "virtio_blk", r
    negotiated = r["g1.virtio0.features"]
    assert negotiated[Feature.VERSION_1] == "1", negotiated
    assert negotiated[Feature.ACCESS_PLATFORM] == "1", negotiated
    _assert_fs(r, "g1", "a")
    assert r["backend.after_domu"] == "1", "the pyvirtio daemon was not running after the domU"
    backend_lines = re.findall(r"^backend\| (.*)$", result.console, re.MULTILINE)
    assert any(re.search("grant", line) for line in backend_lines), (
        "the backend logged nothing about grants:\n" + "\n".join(backend_lines[-40:])
    )
    # Rings and buffers were all grants: the guest-physical map cache was never used.
    stats = re.search(GRANT_STATS, result.console)
    assert stats, "the daemon did not report its map cache"
    maps, ring_maps, copies = map(int, stats.groups())
    assert maps == 0, f"guest-physical mappings were made: {stats.group(0)}"
    # The ring is mapped once; pattern writes, mkfs and fsck: over a thousand requests, each
    # copying its buffers in or out.
    assert 1 <= ring_maps <= 6 and copies >= 100, stats.group(0)
