"""A device other than a disk on the Xen rig: virtio-rng served by `pyvirtio xen` to an
unmodified domU, beside a disk.

Xen 4.17's xl describes only virtio disks, but the node it writes for one is device-type
agnostic (``virtio,mmio``, a window and an SPI): the guest reads the device ID from the
device. A disk entry whose target is a device description (``rng.pyvirtio``: ``device = rng``,
``source = FILE``) is served as an entropy device, and the domU's stock virtio-rng driver reads
FILE's bytes through /dev/hwrng.
"""

from __future__ import annotations

import itertools

import pytest

from tests.xen.conftest import Runner

pytestmark = pytest.mark.xen

DOM0 = r"""
backend_start
make_disk /tmp/a.img 64
python3 -c "import sys; sys.stdout.buffer.write(bytes(range(0, 256, 2)) * 64)" >/tmp/entropy
printf 'device = rng\nsource = /tmp/entropy\n' >/tmp/rng.pyvirtio
domu_run d1 rng 600 "$(vdisk xvda /tmp/a.img)" "$(vdisk xvdb /tmp/rng.pyvirtio)"
rc=$?
backend_log
exit $rc
"""

DOMU = r"""
result vda.size "$(blockdev --getsize64 /dev/vda)"
result rng.available "$(cat /sys/class/misc/hw_random/rng_available)"
result rng.bytes "$(head -c 16 /dev/hwrng | od -An -tu1 | tr -s ' ' | sed 's/^ //')"
"""


def test_entropy_device_beside_a_disk(xen_run: Runner) -> None:
    result = xen_run(DOM0, {"rng": DOMU})
    r = result.results
    assert r["d1.exit"] == "0", r
    assert r["d1.vda.size"] == str(64 << 20), r
    assert r["d1.rng.available"].startswith("virtio_rng"), r
    run = [int(b) for b in r["d1.rng.bytes"].split()]
    assert len(run) == 16 and all(b % 2 == 0 for b in run), run  # the file's even bytes...
    assert {(b - a) % 256 for a, b in itertools.pairwise(run)} == {2}, run  # ...in order
    assert "serving rng from /tmp/entropy" in result.console
